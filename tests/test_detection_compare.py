"""tests.detection_compare: set comparison of detections tolerates order, not different results."""

from __future__ import annotations

import numpy as np
import pytest

from tests.detection_compare import assert_same_detections

BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], dtype=np.float32)
SCORES = np.array([0.9, 0.50001, 0.5], dtype=np.float32)
LABELS = np.array([1, 2, 2])


def test_swapped_near_ties_are_the_same() -> None:
    order = [0, 2, 1]
    assert_same_detections(BOXES, SCORES, BOXES[order], SCORES[order], LABELS, LABELS[order])


def test_a_moved_box_or_changed_label_is_not() -> None:
    moved = BOXES.copy()
    moved[0, 2] += 0.01
    with pytest.raises(AssertionError, match="differ beyond the cut-off"):
        assert_same_detections(BOXES, SCORES, moved, SCORES, LABELS, LABELS)
    with pytest.raises(AssertionError):
        assert_same_detections(BOXES, SCORES, BOXES, SCORES, LABELS, np.array([3, 2, 2]))
    with pytest.raises(AssertionError, match="3 vs 2 detections"):
        assert_same_detections(BOXES, SCORES, BOXES[:2], SCORES[:2])


def test_only_the_lowest_score_may_differ_at_a_cap() -> None:
    other = BOXES.copy()
    other[2] = [60, 60, 70, 70]  # another near-tie kept at the cut-off
    assert_same_detections(BOXES, SCORES, other, SCORES, LABELS, LABELS)
