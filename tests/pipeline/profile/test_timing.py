"""pipeline.profile.timing and pipeline.profile.reference_models on a tiny ResNet-18-FPN (CPU, seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fpn import build_detector
from pipeline.config import ConfigError, params_from_dict
from pipeline.profile.reference_models import (
    ReferenceError,
    detections_at_threshold,
    reference_config,
    reference_pair,
    torchvision_reference,
)
from pipeline.profile.timing import (
    INFERENCE_PARTS,
    OUR_COMPONENTS,
    TORCHVISION_COMPONENTS,
    TRAIN_STEP_PARTS,
    CpuClock,
    InferenceWorkload,
    ProfilingError,
    Timing,
    TrainStepWorkload,
    compare_detections,
    make_clock,
    measure_alternating,
    model_bytes,
    peak_call_bytes,
    synthetic_images,
    synthetic_targets,
)
from tests.detection_samples import TINY_PROFILE_CONFIG as TINY


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    ours, theirs, notes = reference_pair(TINY, seed=0)
    assert notes == []
    return ours, theirs


def test_timing_statistics() -> None:
    timing = Timing(batch_size=2, seconds=[0.4, 0.1, 0.2, 0.3, 0.5], parts={"a": [0.1] * 5, "b": [0.3] * 5})
    assert timing.median_s == pytest.approx(0.3)
    assert timing.p90_s == pytest.approx(0.46)
    assert timing.images_per_s == pytest.approx(2 / 0.3)
    split = timing.split_s()
    assert sum(split.values()) == pytest.approx(timing.median_s)
    assert split["b"] == pytest.approx(3 * split["a"])


def test_inference_split_covers_the_call(pair) -> None:
    ours, theirs = pair
    images = synthetic_images(1, TINY.min_size, TINY.max_size, seed=0)
    with (
        InferenceWorkload(ours, images, components=OUR_COMPONENTS) as a,
        InferenceWorkload(theirs, images, components=TORCHVISION_COMPONENTS) as b,
    ):
        timings = measure_alternating(
            {"ours": a, "tv": b}, device="cpu", batch_size=1, warmup=1, iterations=3
        )
    for timing in timings.values():
        assert len(timing.seconds) == 3 and all(s > 0 for s in timing.seconds)
        assert set(timing.parts) == set(INFERENCE_PARTS)
        for part in ("backbone", "neck", "rpn", "roi_heads", "postprocess"):
            assert min(timing.parts[part]) > 0, part
        covered = []
        for i, total in enumerate(timing.seconds):
            hooked = sum(timing.parts[p][i] for p in INFERENCE_PARTS if p != "other")
            assert hooked <= total * 1.0001
            covered.append(hooked / total)
        # The hooked modules account for the call: the rest (Python glue) is small. Judged on the
        # best call: on a loaded machine a preemption between two hooks lands in "other".
        assert max(covered) > 0.8, covered


def test_reference_pair_detects_the_same(pair) -> None:
    ours, theirs = pair
    images = synthetic_images(2, TINY.min_size, TINY.max_size, seed=4)
    a, b = detections_at_threshold([ours, theirs], images)
    assert ours.roi_heads.score_thresh == theirs.roi_heads.score_thresh == TINY.box_score_thresh  # restored
    diff = compare_detections(a, b)
    assert diff["detections"] == 2 * TINY.detections_per_image
    assert diff["unmatched"] == 0
    assert diff["max_box_diff"] < 1e-2 and diff["max_score_diff"] < 1e-4


def test_hooks_are_removed_on_close(pair) -> None:
    ours, _ = pair
    images = synthetic_images(1, TINY.min_size, TINY.max_size)
    with InferenceWorkload(ours, images, components=OUR_COMPONENTS):
        assert ours.backbone._forward_hooks
    assert not ours.backbone._forward_hooks and not ours.backbone._forward_pre_hooks


def test_train_step_updates_weights_and_splits() -> None:
    torch.manual_seed(0)
    model = build_detector(TINY)
    images = synthetic_images(2, TINY.min_size, TINY.max_size, seed=1)
    targets = synthetic_targets(images, TINY.num_classes, seed=0)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # an empty image
    before = model.roi_heads.predictor.cls_score.weight.detach().clone()
    step = TrainStepWorkload(model, images, targets)
    timings = measure_alternating(
        {"step": step}, device="cpu", batch_size=2, warmup=0, iterations=2, parts=TRAIN_STEP_PARTS
    )
    assert model.training
    assert torch.isfinite(torch.tensor(step.last_loss))
    assert not torch.equal(before, model.roi_heads.predictor.cls_score.weight)
    parts = timings["step"].parts
    assert min(parts["forward"]) > 0 and min(parts["backward"]) > 0 and min(parts["optimizer"]) > 0


def test_synthetic_targets_are_valid_boxes() -> None:
    images = synthetic_images(3, 64, 96, seed=3)
    assert all(im.shape == (3, 64, 96) and im.min() >= 0 and im.max() <= 1 for im in images)
    for target in synthetic_targets(images, num_classes=5, boxes_per_image=6):
        boxes = target["boxes"]
        assert boxes.shape == (6, 4)
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 0::2] <= 96).all() and (boxes[:, 1::2] <= 64).all() and (boxes >= 0).all()
        assert ((target["labels"] >= 1) & (target["labels"] <= 5)).all()


def test_peak_memory_sees_a_large_allocation() -> None:
    def allocate(_clock: CpuClock) -> list:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        assert float(block[-1]) == 1.0
        return []

    def nothing(_clock: CpuClock) -> list:
        return []

    big, small = peak_call_bytes(allocate, "cpu"), peak_call_bytes(nothing, "cpu")
    assert big >= 60 * 2**20, big
    assert small < 16 * 2**20, small


def test_model_bytes_counts_parameters_and_buffers() -> None:
    layer = torch.nn.BatchNorm2d(8)  # weight, bias, running_mean, running_var (8 floats), num_batches_tracked
    assert model_bytes(layer) == 4 * 8 * 4 + 8


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ProfilingError, match="iterations"):
        measure_alternating({}, device="cpu", batch_size=1, warmup=0, iterations=0)
    with pytest.raises(ProfilingError, match="only cpu and cuda"):
        make_clock("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ProfilingError, match="CUDA is not available"):
            make_clock("cuda")


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_compare_detections_matches_regardless_of_order() -> None:
    a = _dets([[0, 0, 10, 10], [5, 5, 20, 20]], [0.5, 0.5], [1, 2])
    b = _dets([[5, 5, 20, 20.004], [0, 0, 10, 10]], [0.50001, 0.5], [2, 1])  # swapped near-tie
    diff = compare_detections([a], [b])
    assert diff["unmatched"] == 0 and diff["detections"] == 2
    assert diff["max_box_diff"] == pytest.approx(0.004, abs=1e-5)
    assert diff["max_score_diff"] == pytest.approx(1e-5, abs=1e-6)
    moved = _dets([[5, 5, 20, 22], [0, 0, 10, 10]], [0.5, 0.5], [2, 1])
    relabelled = _dets([[5, 5, 20, 20], [0, 0, 10, 10]], [0.5, 0.5], [3, 1])
    assert compare_detections([a], [moved])["unmatched"] == 2
    assert compare_detections([a], [relabelled])["unmatched"] == 2
    assert compare_detections([a], [_dets([], [], [])])["unmatched"] == 2


def test_reference_config_names_what_torchvision_cannot_do() -> None:
    cfg, notes = reference_config(dataclasses.replace(TINY, pyramid="single_c4", shared_rpn_head=False))
    assert cfg.pyramid == "fpn" and cfg.shared_rpn_head
    assert notes == ["pyramid: single_c4 -> fpn", "shared_rpn_head: False -> True"]
    with pytest.raises(ReferenceError, match="pyramid"):
        torchvision_reference(dataclasses.replace(TINY, pyramid="p2_only"))


def test_reference_trains_the_same_parameters(pair) -> None:
    ours, theirs = pair
    count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert count[0] == count[1] > 0
    frozen = torchvision_reference(dataclasses.replace(TINY, norm="frozen_bn", trainable_stages=3))
    assert not frozen.backbone.body.conv1.weight.requires_grad
    assert frozen.backbone.body.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"batch_sizes": [1, 0]}, "batch_sizes"),
        ({"batch_sizes": []}, "batch_sizes"),
        ({"iterations": 0}, "iterations"),
        ({"devices": ["tpu"]}, "devices"),
        ({"batch_sizes": "one"}, "profile.batch_sizes"),
    ],
)
def test_bad_profile_params_are_named(section: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        params_from_dict({"profile": section})
