"""Shared by the benchmark scripts: the cases (ours vs torchvision on the same work) and the
printout of the machine and the figures.

Cases: torchvision's ``fasterrcnn_resnet50_fpn`` settings (`fpn.ModelConfig.torchvision()`,
91 outputs, frozen BN, 3 trainable stages) with
    r50_800   ResNet-50-FPN, images 800 x 1333 (the paper's test size)
    r18_320   ResNet-18-FPN, images 320 x 320
Implementations, all with the same random weights (torchvision's, loaded into ours by
`fpn.load_torchvision_weights`) and the same seeded inputs, run alternately:
    ours         our detector with our default execution settings (channels_last, ...)
    ours_as_tv   ours with ModelConfig.torchvision()'s execution settings: torchvision's
                 arithmetic op for op (NCHW, ...), so the gap to torchvision is the code's
    torchvision  torchvision's FasterRCNN
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
from torch import nn

from fpn import ModelConfig, build_detector, load_torchvision_weights
from pipeline.profile.reference_models import reference_pair
from pipeline.profile.timing import OUR_COMPONENTS, TORCHVISION_COMPONENTS, Timing, machine_description

# name -> (backbone, image height, image width)
CASES: dict[str, tuple[str, int, int]] = {
    "r50_800": ("resnet50", 800, 1333),
    "r18_320": ("resnet18", 320, 320),
}


# ModelConfig fields that choose how the same function is computed, not what it is.
EXECUTION_FIELDS = ("channels_last", "fold_frozen_bn")


def _execution(source: ModelConfig) -> dict[str, object]:
    return {name: getattr(source, name) for name in EXECUTION_FIELDS if hasattr(source, name)}


def case_config(name: str) -> tuple[ModelConfig, int, int]:
    """(config, image height, image width) of a case: torchvision's model at that size, with
    our default execution settings."""
    backbone, height, width = CASES[name]
    cfg = dataclasses.replace(
        ModelConfig.torchvision(),
        backbone=backbone,
        min_size=height,
        max_size=max(height, width),
        **_execution(ModelConfig()),
    )
    return cfg, height, width


def case_models(cfg: ModelConfig, device: str) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]]]:
    """(name -> model in eval mode on ``device``, name -> component map) of the implementations."""
    ours, theirs, _ = reference_pair(cfg, seed=0)
    as_tv = build_detector(dataclasses.replace(cfg, **_execution(ModelConfig.torchvision())))
    load_torchvision_weights(as_tv, theirs.state_dict())
    models = {"ours": ours, "ours_as_tv": as_tv, "torchvision": theirs}
    components = {
        name: TORCHVISION_COMPONENTS if name == "torchvision" else OUR_COMPONENTS for name in models
    }
    return {name: m.to(device).eval() for name, m in models.items()}, components


def parser(description: str, *, warmup: int, iterations: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="which cases to run"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls per model")
    p.add_argument("--iterations", type=int, default=iterations, help="timed calls per model (alternating)")
    p.add_argument(
        "--memory-repeats", type=int, default=3, help="calls per model for the peak memory (median)"
    )
    return p


def setup(args: argparse.Namespace) -> None:
    """Threads, denormal flushing, and the machine line."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    info = machine_description(args.device)
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "unset")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))


def row(case: str, impl: str, timing: Timing, memory_mb: float, unit: str) -> str:
    split = " ".join(
        f"{part} {seconds * 1000:.0f}" for part, seconds in timing.split_s().items() if seconds >= 5e-4
    )
    return (
        f"{case:8} {impl:12} {timing.median_s * 1000:9.1f} {timing.p90_s * 1000:9.1f} "
        f"{timing.cpu_median_s * 1000:9.1f} {timing.images_per_s:8.3f} {memory_mb:8.0f}  {split}"
    )


def header(unit: str) -> str:
    line = (
        f"{'case':8} {'impl':12} {unit + ' p50':>9} {unit + ' p90':>9} {'cpu ms':>9} "
        f"{'img/s':>8} {'mem MB':>8}  split (ms)"
    )
    return line + "\n" + "-" * len(line)
