"""Compare two detection lists as sets, not sequences.

Two runs of the same model that differ only in float rounding (another thread count, another
process, another kernel) give the same detections, but two of near-equal score may come out
in either order, and at a top-k cap the last kept one may be a different near-tie. Comparing
rows in order then fails on a correct result (it did on an Intel Xeon, 2026-11-30). This
matches every row of one list to a row of the other with the same label and the same box and
score within a tolerance; rows left over are allowed only at the cut-off (scores within the
tolerance of the lowest kept score, when both lists are at the same length).
"""

from __future__ import annotations

import numpy as np


def assert_same_detections(
    boxes_a: np.ndarray,
    scores_a: np.ndarray,
    boxes_b: np.ndarray,
    scores_b: np.ndarray,
    labels_a: np.ndarray | None = None,
    labels_b: np.ndarray | None = None,
    *,
    atol: float = 1e-4,
    score_atol: float = 1e-4,
) -> None:
    """Assert that (N, 4) boxes with (N,) scores and optional (N,) labels are the same set.

    Each row of A must match exactly one row of B: equal label, every box coordinate within
    ``atol``, score within ``score_atol``. Unmatched rows may only be cut-off ties (see module).
    """
    boxes_a, boxes_b = np.asarray(boxes_a, np.float64), np.asarray(boxes_b, np.float64)
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    assert boxes_a.shape == boxes_b.shape, f"{boxes_a.shape[0]} vs {boxes_b.shape[0]} detections"
    if boxes_a.shape[0] == 0:
        return
    # (Na, Nb): the worst coordinate/score difference between each pair, inf across labels.
    cost = np.maximum(
        np.abs(boxes_a[:, None, :] - boxes_b[None, :, :]).max(-1) / atol,
        np.abs(scores_a[:, None] - scores_b[None, :]) / score_atol,
    )
    if labels_a is not None and labels_b is not None:
        cost[np.asarray(labels_a)[:, None] != np.asarray(labels_b)[None, :]] = np.inf
    best = cost.argmin(1)
    matched = cost[np.arange(len(best)), best] <= 1.0
    assert len(set(best[matched].tolist())) == int(matched.sum()), "two detections matched one"
    unmatched_b = np.setdiff1d(np.arange(len(scores_b)), best[matched])
    cutoff = max(scores_a.min(), scores_b.min()) + score_atol
    left_a, left_b = scores_a[~matched], scores_b[unmatched_b]
    assert (left_a <= cutoff).all() and (left_b <= cutoff).all(), (
        f"{int((~matched).sum())} of {len(scores_a)} detections differ beyond the cut-off: "
        f"first unmatched box {boxes_a[~matched][:1].tolist()} score {left_a[:1].tolist()}"
    )
