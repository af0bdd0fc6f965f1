"""The profile stage's measurements: our trained detector, torchvision's reference beside it,
the single-scale baseline, and training steps, on every configured device that is present.

Subjects (the names used in metrics, plots and the table):

* ``model``: the trained model as loaded from its file; ``model_channels_last``,
  ``model_compile``, ``model_bf16``: the same with one speed-up each (profile.channels_last:
  NHWC convolutions, for a model whose config does not use them already; profile.compile:
  torch.compile of backbone, neck, RPN and RoI heads; profile.bf16: autocast to bfloat16 where
  the device has native bf16), reported separately.
* ``ref_ours`` / ``ref_torchvision``: ours and torchvision's FasterRCNN with the same random
  weights at the model's sizes (`pipeline.profile.reference_models.reference_pair`), so the ratio
  ours / torchvision compares the implementations on identical work; their detections at
  score threshold 0 are compared too (``unmatched``, ``max_box_diff``...).
* ``single_c4``: ours with the single-scale C4 pyramid and the model's other settings (the
  paper's baseline: FPN should cost about as much at test time).

On each device, for each batch size, all inference subjects run alternately on the same
seeded images (model.min_size, the last of a list: the test size, x model.max_size); then the
training-step subjects alternately at train.batch_size with the same seeded targets (in training
mode, so a list of min_size draws each image's size as training does).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpn import ModelConfig, build_detector
from pipeline.config import ProfileConfig
from pipeline.profile.reference_models import detections_at_threshold, reference_pair, single_scale_baseline
from pipeline.profile.timing import (
    INFERENCE_PARTS,
    OUR_COMPONENTS,
    TORCHVISION_COMPONENTS,
    TRAIN_STEP_PARTS,
    InferenceWorkload,
    Timing,
    TrainStepWorkload,
    compare_detections,
    machine_description,
    make_clock,
    measure_alternating,
    model_bytes,
    peak_call_bytes,
    synthetic_images,
    synthetic_targets,
)

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """One subject on one device: an inference at ``timing.batch_size`` or a training step."""

    device: str
    subject: str
    kind: str  # "inference" | "train_step"
    timing: Timing
    weights_bytes: int
    working_bytes: int  # peak memory of one call beyond what was allocated before it; -1 unknown

    @property
    def memory_bytes(self) -> int:
        """Weights + working set: what running it needs; -1 when the peak could not be read."""
        return -1 if self.working_bytes < 0 else self.weights_bytes + self.working_bytes


@dataclass
class ProfileResult:
    """Everything the stage measured."""

    machine: dict[str, str]
    measurements: list[Measurement] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)  # "<device>.bs<b>.<name>" -> value
    notes: list[str] = field(default_factory=list)

    def find(self, device: str, subject: str, kind: str, batch_size: int | None = None) -> Measurement | None:
        for m in self.measurements:
            if (m.device, m.subject, m.kind) == (device, subject, kind) and (
                batch_size is None or m.timing.batch_size == batch_size
            ):
                return m
        return None


@dataclass
class _Subject:
    model: nn.Module
    components: Mapping[str, str]
    autocast: torch.dtype | None = None
    # Untimed calls before the common warmup (torch.compile: compile, then recompile dynamic).
    extra_warmup: int = 0


def available_devices(wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(devices to measure, notes on the ones skipped)."""
    devices, notes = [], []
    for device in wanted:
        if device == "cuda" and not torch.cuda.is_available():
            notes.append("cuda: no GPU here, skipped")
            continue
        devices.append(device)
    return devices, notes


def bf16_supported(device: str) -> bool:
    """True where bf16 matrix work is native: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _compiled(model: nn.Module) -> nn.Module:
    """A copy whose backbone, neck, RPN and RoI heads are each `torch.compile`d (the transform's
    per-image Python stays eager); hooks then sit on the compiled wrappers, outside the graphs."""
    model = copy.deepcopy(model)
    for name in ("backbone", "neck", "rpn", "roi_heads"):
        setattr(model, name, torch.compile(getattr(model, name)))
    return model


def _model_subjects(
    model: nn.Module, cfg: ModelConfig, profile: ProfileConfig, device: str, notes: list[str]
) -> dict[str, _Subject]:
    subjects = {"model": _Subject(copy.deepcopy(model).to(device).eval(), OUR_COMPONENTS)}
    if profile.channels_last:
        if cfg.channels_last:
            notes.append(
                "model_channels_last skipped: the model runs channels_last already (model.channels_last)"
            )
        else:
            nhwc = build_detector(dataclasses.replace(cfg, channels_last=True))
            nhwc.load_state_dict(model.state_dict())
            subjects["model_channels_last"] = _Subject(nhwc.to(device).eval(), OUR_COMPONENTS)
    if profile.compile:
        subjects["model_compile"] = _Subject(
            _compiled(model).to(device).eval(), OUR_COMPONENTS, extra_warmup=2
        )
    if profile.bf16:
        if bf16_supported(device):
            subjects["model_bf16"] = _Subject(
                copy.deepcopy(model).to(device).eval(), OUR_COMPONENTS, torch.bfloat16
            )
        else:
            notes.append(f"{device}: bf16 not supported natively, model_bf16 skipped")
    return subjects


def _reference_subjects(
    cfg: ModelConfig, profile: ProfileConfig, device: str, notes: list[str]
) -> tuple[dict[str, _Subject], dict[str, nn.Module]]:
    """Inference subjects beside the model, and the (ours, torchvision) pair for training."""
    subjects: dict[str, _Subject] = {}
    pair: dict[str, nn.Module] = {}
    if profile.compare_torchvision:
        ours, theirs, changes = reference_pair(cfg, seed=profile.seed)
        if changes and device == "cpu":
            notes.append(f"reference pair differs from the model: {'; '.join(changes)}")
        pair = {"ref_ours": ours, "ref_torchvision": theirs}
        subjects["ref_ours"] = _Subject(ours.to(device).eval(), OUR_COMPONENTS)
        subjects["ref_torchvision"] = _Subject(theirs.to(device).eval(), TORCHVISION_COMPONENTS)
    if profile.single_scale_baseline and cfg.pyramid != "single_c4":
        baseline = single_scale_baseline(cfg, seed=profile.seed)
        subjects["single_c4"] = _Subject(baseline.to(device).eval(), OUR_COMPONENTS)
    return subjects, pair


def _measure_inference(
    subjects: Mapping[str, _Subject],
    profile: ProfileConfig,
    cfg: ModelConfig,
    device: str,
    result: ProfileResult,
) -> None:
    for batch_size in profile.batch_sizes:
        images = synthetic_images(
            batch_size, cfg.test_min_size, cfg.max_size, seed=profile.seed, device=device
        )
        with ExitStack() as stack:
            workloads = {
                name: stack.enter_context(
                    InferenceWorkload(s.model, images, components=s.components, autocast=s.autocast)
                )
                for name, s in subjects.items()
            }
            clock = make_clock(device)
            for name, s in subjects.items():
                for _ in range(s.extra_warmup):
                    workloads[name](clock)
            timings = measure_alternating(
                workloads,
                device=device,
                batch_size=batch_size,
                warmup=profile.warmup,
                iterations=profile.iterations,
                parts=INFERENCE_PARTS,
                desc=f"profile {device} inference bs{batch_size}",
            )
            models = {name: s.model for name, s in subjects.items()}
            _record(result, "inference", device, models, workloads, timings, profile.iterations)
        if "ref_ours" in subjects and "ref_torchvision" in subjects:
            ours, theirs = detections_at_threshold(
                [subjects["ref_ours"].model, subjects["ref_torchvision"].model], images
            )
            for key, value in compare_detections(ours, theirs).items():
                result.checks[f"{device}.bs{batch_size}.{key}"] = value


def _measure_train_steps(
    models: Mapping[str, nn.Module],
    profile: ProfileConfig,
    cfg: ModelConfig,
    batch_size: int,
    device: str,
    result: ProfileResult,
) -> None:
    images = synthetic_images(
        batch_size, cfg.test_min_size, cfg.max_size, seed=profile.seed + 1, device=device
    )
    targets = synthetic_targets(images, cfg.num_classes, seed=profile.seed)
    workloads = {name: TrainStepWorkload(model.to(device), images, targets) for name, model in models.items()}
    timings = measure_alternating(
        workloads,
        device=device,
        batch_size=batch_size,
        warmup=profile.warmup,
        iterations=profile.iterations,
        parts=TRAIN_STEP_PARTS,
        desc=f"profile {device} train step bs{batch_size}",
    )
    _record(result, "train_step", device, models, workloads, timings, profile.iterations)


def _record(
    result: ProfileResult,
    kind: str,
    device: str,
    models: Mapping[str, nn.Module],
    workloads: Mapping[str, Any],
    timings: Mapping[str, Any],
    iterations: int,
) -> None:
    """One `Measurement` per subject: its timing, weight bytes and the peak working set of a call."""
    for name, workload in workloads.items():
        result.measurements.append(
            Measurement(
                device=device,
                subject=name,
                kind=kind,
                timing=timings[name],
                weights_bytes=model_bytes(models[name]),
                working_bytes=peak_call_bytes(workload, device, repeats=min(3, iterations)),
            )
        )


def run_profile(
    model: nn.Module,
    cfg: ModelConfig,
    profile: ProfileConfig,
    *,
    train_batch_size: int,
) -> ProfileResult:
    """Measure everything `ProfileConfig` asks for (see the module docstring).

    ``model`` (any device, not modified) is the trained detector built from ``cfg``.
    """
    if train_batch_size < 1:
        raise ValueError(f"train.batch_size: must be >= 1, got {train_batch_size}")
    if profile.threads:
        torch.set_num_threads(profile.threads)
    torch.set_flush_denormal(True)  # random and trained weights alike: no denormal slow path
    devices, notes = available_devices(profile.devices)
    if not devices:
        raise ValueError(f"profile.devices: none of {list(profile.devices)} is present here")
    result = ProfileResult(machine=machine_description(devices[-1]), notes=notes)
    model = model.cpu()
    for device in devices:
        subjects = _model_subjects(model, cfg, profile, device, result.notes)
        extra, pair = _reference_subjects(cfg, profile, device, result.notes)
        _measure_inference({**subjects, **extra}, profile, cfg, device, result)
        del subjects, extra
        if profile.train_step:
            trainees = {"model": copy.deepcopy(model), **pair}
            _measure_train_steps(trainees, profile, cfg, train_batch_size, device, result)
    return result
