"""Eval-forward time of one image and parameter count: our FPN detector beside torchvision's.

Rows: ResNet-50-FPN at 800x1333 (beside ``fasterrcnn_resnet50_fpn``'s architecture) and
ResNet-18-FPN at 320x320 (beside a torchvision FasterRCNN with a ResNet-18 FPN backbone).
Both models of a row hold the same random weights (ours loaded from torchvision's state dict
with `fpn.load_torchvision_weights`) and run in the same process, alternating, so the
machine's noise falls on both. Ours is timed twice: as ``ModelConfig.torchvision()`` (NCHW,
frozen BN as a separate op: torchvision's arithmetic) and with our default execution
settings (channels_last, frozen BN folded into the convs). Prints the machine, then a table
of medians.

    .venv/bin/python benchmarks/bench_forward.py              # both rows, 2 threads
    .venv/bin/python benchmarks/bench_forward.py --rows r18 --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import fpn

ROWS = {
    # name: (backbone, image height, image width, min_size, max_size)
    "r50": ("resnet50", 800, 1333, 800, 1333),
    "r18": ("resnet18", 320, 320, 320, 320),
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, torchvision {torchvision.__version__}; "
        f"threads {torch.get_num_threads()}; load average {tuple(round(x, 2) for x in load)}"
    )


def build_pair(backbone: str, min_size: int, max_size: int) -> tuple[FasterRCNN, fpn.Detector, fpn.Detector]:
    """torchvision's detector and ours (its arithmetic; our fast defaults), same random weights."""
    torch.manual_seed(0)
    reference = FasterRCNN(
        resnet_fpn_backbone(
            backbone_name=backbone, weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
        ),
        num_classes=91,
        min_size=min_size,
        max_size=max_size,
    ).eval()
    cfg = dataclasses.replace(
        fpn.ModelConfig.torchvision(), backbone=backbone, min_size=min_size, max_size=max_size
    )
    ours_tv = fpn.build_detector(cfg).eval()
    fpn.load_torchvision_weights(ours_tv, reference.state_dict())
    ours_fast = fpn.build_detector(dataclasses.replace(cfg, channels_last=True, fold_frozen_bn=True)).eval()
    ours_fast.load_state_dict(ours_tv.state_dict())
    return reference, ours_tv, ours_fast


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_alternating(
    models: dict[str, nn.Module], image: torch.Tensor, repeats: int, warmup: int
) -> dict[str, list[tuple[float, float]]]:
    """Per model, ``repeats`` (wall seconds, process CPU seconds) of one eval forward; the
    models take turns. CPU seconds count every thread, and hold up better than wall time
    when other processes share the cores."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                wall, cpu = time.perf_counter(), time.process_time()
                model([image])
                if i >= warmup:
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


MODELS = ("torchvision", "ours_tv_arithmetic", "ours_defaults")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=["r50", "r18"])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per model (default 7 for r50, 21 for r18)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights: keep denormal floats from slowing one model
    print("machine:", machine())
    lines = [
        "| model | input | parameters | median wall s: torchvision / ours (tv arithmetic) / ours (defaults) "
        "| median CPU s: same order | ours (defaults) / torchvision: wall, CPU |",
        "|---|---|---|---|---|---|",
    ]
    for row in args.rows:
        backbone, height, width, min_size, max_size = ROWS[row]
        reference, ours_tv, ours_fast = build_pair(backbone, min_size, max_size)
        assert parameters(reference) == parameters(ours_tv), "the two models differ in size"
        image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
        repeats = args.repeats or (7 if row == "r50" else 21)
        times = time_alternating(
            dict(zip(MODELS, (reference, ours_tv, ours_fast), strict=True)), image, repeats, args.warmup
        )
        wall = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
        cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
        lines.append(
            f"| {backbone}-FPN | {height}x{width} | {parameters(ours_tv):,} "
            f"| {' / '.join(f'{wall[m]:.3f}' for m in MODELS)} | {' / '.join(f'{cpu[m]:.3f}' for m in MODELS)} "
            f"| {wall['ours_defaults'] / wall['torchvision']:.2f}x, {cpu['ours_defaults'] / cpu['torchvision']:.2f}x |"
        )
        print(f"{row}: {repeats} alternating runs each; (wall s, CPU s):")
        for name, values in times.items():
            print(f"  {name}: {[(round(w, 3), round(c, 3)) for w, c in values]}")
    print("\n".join(lines))
    print("machine at the end:", machine())


if __name__ == "__main__":
    main()
