"""GPU smoke test: the detector and the training pipeline on one accelerator, in one short script.

    python benchmarks/gpu_smoke.py                          # on the GPU machine (under 10 minutes)
    python benchmarks/gpu_smoke.py --device cpu --small     # CI: the same checks, tiny sizes, CPU
    python benchmarks/gpu_smoke.py --sections AB            # only some sections

Needs torch, torchvision, numpy, pillow (pyyaml and tqdm for section C, through the project's
pipeline modules); Ray only for section E. MLflow, DVC and pycocotools are never imported.
Run from anywhere: the repository root (the folder above ``benchmarks/``) is put first on
``sys.path``, so the ``fpn``/``pipeline`` next to this file are the ones tested (the header
line ``INFO machine`` says which folder).

Output, one line per result: ``PASS <check>: <detail>``, ``FAIL <check>: <detail>`` and
``INFO <check>: <figures>``; a section whose dependency is missing prints ``INFO <section>:
skipped (<why>)``. An unexpected exception in a section is a ``FAIL`` naming it (traceback on
stderr). Exit status 1 if any line is ``FAIL``, else 0. ``--device cuda`` (the default) without
a CUDA device prints ``FAIL machine: no CUDA device`` and exits 1.

Sizes: by default ResNet-50-FPN (``ModelConfig(backbone="resnet50", norm="frozen_bn",
num_classes=80)``, random init) at 800x1333 in section A; ``--small`` uses a ResNet-18-FPN with
d=32, 64-wide fc head and small RPN/RoI budgets at 128x160, and fewer steps everywhere.

Sections and figures:

A  Training step of the detector, batch 2 (image 0 with 3 boxes, image 1 with none).
   ``A bf16-step``: under ``torch.autocast(bfloat16)`` the four losses come back float32 and finite.
   ``A gradients``: every parameter with ``requires_grad`` has a finite gradient after that
   backward (the frozen stem/res2 of frozen_bn are counted apart); ``norm`` is the global L2 norm.
   ``A timing`` (INFO): per layout (NHWC = ``ModelConfig.channels_last=True``, NCHW = False) and
   precision (bf16 autocast, fp32): median ms per training step (forward, backward, SGD step;
   CUDA synchronised) over 10 timed steps after 3 warm-up steps (1 and 1 with --small), and the peak of
   ``torch.cuda.max_memory_allocated`` during them (weights, gradients, momentum, activations;
   one model on the device at a time); ``n/a`` on CPU. Then the ratios bf16/fp32 and NHWC/NCHW.
   fp32 is what torch's TF32 flags make it (``A model`` prints them; by default TF32 is allowed
   in cuDNN convolutions, not in matmuls).
   ``A overfit``: the same batch, bf16, SGD at a fixed lr 0.01 (momentum 0.9, gradient norm
   clipped to 10 as params.yaml does), 40 steps (12 with --small): the first loss over the mean
   of the last 5 must be >= 2. A random frozen-BN ResNet-50 starts with huge logits (loss ~20,
   gradient norm ~2000), so most of the first drop is the classifier; the detail lists the
   four terms at the first and last step (the RPN's box loss should fall too).
   ``A fp16-scaler``: fp16 autocast + ``torch.amp.GradScaler`` (+ unscale and clipping, as the
   loop does) for 5 steps (1 with --small) without error and with finite float32 losses; the
   detail says how many steps the scaler skipped for inf/NaN gradients and the final scale.
B  RoIAlign: `fpn.poolers.MultiLevelRoIAlign` runs ``fpn.roi_align.roi_align_gather`` (the
   embedding-bag gather) only for float32 features on the CPU, torchvision's ``roi_align``
   kernel otherwise (CUDA, or bf16 features under autocast).
   ``B kernel``: which function the pooler called on the device, for float32 features and
   under bf16 autocast, against that rule (INFO ``B profile`` lists the profiler's op/kernel
   names with ``roi_align``/``embedding_bag`` in them).
   ``B forward``/``B backward``: the pooler on the device (float32) against the CPU gather
   kernel on the same features and boxes (4 levels, 2 images, boxes of every size including
   tiny ones and ones crossing the border): max abs difference of the pooled values and of the
   feature gradients, tolerance 1e-4 + 1e-4 * max |reference|.
   ``B bf16-autocast``: the pooler under bf16 autocast on bf16 features against the CPU gather
   kernel on the same bf16 values in float32: tolerance 2e-2 * (1 + max |reference|).
   ``B torchvision-cpu`` (CPU only, where the pooler *is* the gather kernel): torchvision's CPU
   kernel against the gather kernel, same tolerances as forward/backward.
   ``B timing`` (INFO): forward + backward ms on the device (inputs already there, median of
   10, 3 with --small) of torchvision's kernel and of the gather kernel, for the RoI count of a
   training step (2 x 512 RoIs, 256 channels; 2 x 32 RoIs, 32 channels with --small).
C  The real training loop in one process (``python -m stages.train --no-ray`` without MLflow):
   `pipeline.train.loop.train_worker` with `LocalSession` on synthetic data made by the
   project's generator and preprocess (`pipeline.fetch.synthetic`, `pipeline.preprocess`), bf16,
   ``train.loader_workers`` loader processes (the loop pins memory on CUDA).
   10 iterations of batch 4 on 24 images (6 with --small: batch 2 on 8 images), a checkpoint
   every 4 (3), each case run with 2 (1) loader workers and with none.
   ``C train``: the run with loader workers reaches its last iteration with finite losses;
   INFO ``C throughput``: images/s as the loop reports it (per ``log_every`` window).
   ``C resume``: with 0 loader workers (the setting the loop's own resume test uses), a run
   killed right after its checkpoint at iteration 4 (3), mid-epoch, and resumed must match the
   uninterrupted run: same steps, attempts 2, and on the CPU bit for bit (every loss, every
   weight). On CUDA, kernels with atomic adds (RoIAlign's backward) make two identical runs
   differ, so a second uninterrupted run gives the noise floor: ``weights apart`` is
   ||w_resumed - w|| / ||w - w_init|| (how far the resumed run strays, relative to how far
   training moved the weights), the same for the second run in brackets; it passes when that
   is <= max(4 x the second run's, 0.02) and the largest relative loss gap over the steps <=
   max(4 x the second run's, 0.05).
   ``C resume-workers``: the same comparison with loader workers (each image's flip is seeded
   by (seed, epoch, image), so workers and a mid-epoch resume change nothing).
   INFO ``C loader-workers``: the step-1 loss with and without loader workers (same weights,
   same batches: equal unless the flips differ).
   INFO ``C cuda-rng`` (CUDA): whether the resumed run's CUDA generator ended where the
   uninterrupted run's did (the RPN/RoI samplers draw on the device's generator).
   Skipped (INFO) when importing the loop fails (e.g. a module it needs is missing).
D  DDP with two ranks on one device: ``torch.multiprocessing.spawn`` of 2 processes, process
   group ``gloo`` (NCCL refuses two ranks per GPU; gloo all-reduces CUDA tensors), a tiny
   detector built from a different seed on each rank, 3 steps on different data per rank.
   ``D ddp``: no hang (180 s timeout, then the ranks are killed) and the two ranks' weights
   are bit-identical afterwards and differ from the initial ones.
E  Ray (only when ``import ray`` works, else INFO skipped), on a local Ray cluster started here:
   ``E ray-train``: `pipeline.train.ray_train.fit` with one worker (``use_gpu`` with --device
   cuda, a CPU worker otherwise) trains a tiny detector for 4 iterations and returns its
   final checkpoint.
   ``E ray-inference``: `pipeline.inference.predict_split` over 2 Ray tasks (1 GPU each when
   the cluster has one) gives the same detections and proposals (within 1e-3) as in-process
   prediction with the model file of that run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fpn/ and pipeline/ beside this file, not an installed copy.
if sys.path[:1] != [str(REPO_ROOT)]:
    sys.path.insert(0, str(REPO_ROOT))

GIB = 2**30
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")
DDP_TIMEOUT_S = 180


class SectionSkipped(Exception):
    """A section's dependency is missing: reported as INFO, never FAIL."""


class Report:
    """Prints result lines and counts them."""

    def __init__(self) -> None:
        self.counts = {"PASS": 0, "FAIL": 0, "INFO": 0}

    def line(self, kind: str, check: str, detail: str) -> None:
        self.counts[kind] += 1
        print(f"{kind} {check}: {detail}", flush=True)

    def info(self, check: str, detail: str) -> None:
        self.line("INFO", check, detail)

    def check(self, check: str, ok: bool, detail: str) -> bool:
        self.line("PASS" if ok else "FAIL", check, detail)
        return ok


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What --small changes."""

    small: bool
    height: int
    width: int
    time_warmup: int
    time_steps: int
    overfit_steps: int
    fp16_steps: int
    roi_timing_steps: int


FULL = Sizes(small=False, height=800, width=1333, time_warmup=3, time_steps=10, overfit_steps=40,
             fp16_steps=5, roi_timing_steps=10)  # fmt: skip
SMALL = Sizes(small=True, height=128, width=160, time_warmup=1, time_steps=1, overfit_steps=12,
              fp16_steps=1, roi_timing_steps=3)  # fmt: skip

# A tiny ResNet-18-FPN (the tests' sizes): d=32, 64-wide fc head, small RPN/RoI budgets.
TINY_MODEL: dict[str, Any] = {
    "backbone": "resnet18",
    "fpn_channels": 32,
    "representation_size": 64,
    "min_size": 128,
    "max_size": 160,
    "anchor_sizes": (16, 32, 64, 128, 256),
    "rpn_batch_per_image": 64,
    "rpn_pre_nms_topk_train": 300,
    "rpn_post_nms_topk_train": 100,
    "rpn_pre_nms_topk_test": 300,
    "rpn_post_nms_topk_test": 100,
    "roi_batch_per_image": 32,
}


# ----------------------------------------------------------------------------- helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``; None: float32 (autocast off)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def synthetic_batch(
    height: int, width: int, device: torch.device, *, seed: int = 0, rank: int = 0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two noisy images with bright boxes: image 0 has 3 boxes (labels 3, 17, 42), image 1 none."""
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    images = [0.3 * torch.rand(3, height, width, generator=g) for _ in range(2)]
    fractions = torch.tensor([[0.05, 0.1, 0.3, 0.45], [0.4, 0.3, 0.9, 0.95], [0.6, 0.05, 0.7, 0.2]])
    fractions[:, :2] += 0.05 * torch.rand(3, 2, generator=g)
    boxes = fractions * torch.tensor([width, height, width, height], dtype=torch.float32)
    labels = torch.tensor([3, 17, 42], dtype=torch.int64)
    for (x1, y1, x2, y2), label in zip(boxes.round().int().tolist(), labels.tolist(), strict=True):
        color = torch.tensor([(label * 37 % 100) / 100, (label * 59 % 100) / 100, (label * 83 % 100) / 100])
        images[0][:, y1:y2, x1:x2] = 0.5 * color[:, None, None] + 0.5
    targets = [
        {"boxes": boxes, "labels": labels},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


def detector_config(sizes: Sizes, **overrides: Any):
    """Section A's model: R50-FPN frozen BN, 80 classes at 800x1333; with --small the tiny R18."""
    from fpn import ModelConfig

    base: dict[str, Any] = {"backbone": "resnet50", "norm": "frozen_bn", "num_classes": 80}
    if sizes.small:
        base.update(TINY_MODEL, min_size=sizes.height, max_size=sizes.width)
    else:
        base.update(min_size=sizes.height, max_size=sizes.width)
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from fpn import build_detector

    torch.manual_seed(seed)
    return build_detector(cfg).to(device).train()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step as `pipeline.train.loop.train_step` does it; returns the detached losses."""
    with autocast(device, dtype):
        losses = model(images, targets)
    loss = sum(losses[name] for name in LOSS_NAMES)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {k: v.detach() for k, v in losses.items()}


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def environ_without(*names: str) -> Iterator[None]:
    """Unset environment variables for a block (e.g. RAY_ADDRESS, which sends preprocessing to Ray)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def fmt_losses(losses: dict[str, Any]) -> str:
    return " ".join(
        f"{k.removeprefix('loss_')} {float(torch.as_tensor(v).detach()):.4f}" for k, v in losses.items()
    )


# ----------------------------------------------------------------------------- A: training step


def section_a(device: torch.device, sizes: Sizes, out: Report) -> None:
    cfg = detector_config(sizes)
    images, targets = synthetic_batch(sizes.height, sizes.width, device)
    what = f"{cfg.backbone}-FPN {cfg.norm} at {sizes.height}x{sizes.width}, batch 2 (one image without boxes)"
    if device.type == "cuda":
        what += (
            f"; TF32 allowed in cuDNN convolutions {torch.backends.cudnn.allow_tf32}, "
            f"in matmuls {torch.backends.cuda.matmul.allow_tf32}"
        )
    out.info("A model", what)

    # One bf16 step: float32 losses, a finite gradient for every trainable parameter.
    model = build(cfg, device)
    with autocast(device, torch.bfloat16):
        losses = model(images, targets)
    dtypes = {k: v.dtype for k, v in losses.items()}
    finite = all(bool(torch.isfinite(v)) for v in losses.values())
    ok = set(losses) == set(LOSS_NAMES) and all(d == torch.float32 for d in dtypes.values()) and finite
    out.check(
        "A bf16-step",
        ok,
        f"losses {fmt_losses(losses)}; dtypes {sorted({str(d) for d in dtypes.values()})}"
        + ("" if finite else " (NOT finite)"),
    )
    sum(losses[name] for name in LOSS_NAMES).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    missing = [n for n, p in named if p.grad is None]
    bad = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.float()) for _, p in named if p.grad is not None])
    )
    detail = (
        f"{len(named) - len(missing) - len(bad)}/{len(named)} trainable parameters have a finite gradient"
    )
    detail += f" (norm {float(norm):.4g}); {frozen} frozen"
    if missing:
        detail += f"; no gradient: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
    if bad:
        detail += f"; non-finite: {bad[:5]}{' ...' if len(bad) > 5 else ''}"
    out.check("A gradients", not missing and not bad and bool(torch.isfinite(norm)), detail)
    del model, losses
    free_device_memory(device)

    # ms/step and peak memory: NHWC/NCHW x bf16/fp32, one model on the device at a time.
    results: dict[tuple[str, str], float] = {}
    for layout, channels_last in (("NHWC", True), ("NCHW", False)):
        model = build(dataclasses.replace(cfg, channels_last=channels_last), device)
        optimizer = torch.optim.SGD(trainable(model), lr=1e-4, momentum=0.9)
        for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
            for _ in range(sizes.time_warmup):
                train_step(model, optimizer, images, targets, device, dtype, clip=10.0)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(sizes.time_steps):
                start = time.perf_counter()
                train_step(model, optimizer, images, targets, device, dtype, clip=10.0)
                synchronize(device)
                times.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(times)
            results[layout, precision] = ms
            peak = (
                f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB" if device.type == "cuda" else "n/a"
            )
            out.info(
                "A timing",
                f"{layout} {precision}: {ms:.1f} ms/step (median of {sizes.time_steps} after "
                f"{sizes.time_warmup} warm-up), peak memory {peak}",
            )
        del model, optimizer
        free_device_memory(device)
    out.info(
        "A timing",
        "bf16/fp32 time: NHWC {:.2f}, NCHW {:.2f}; NHWC/NCHW time: bf16 {:.2f}, fp32 {:.2f}".format(
            results["NHWC", "bf16"] / results["NHWC", "fp32"],
            results["NCHW", "bf16"] / results["NCHW", "fp32"],
            results["NHWC", "bf16"] / results["NCHW", "bf16"],
            results["NHWC", "fp32"] / results["NCHW", "fp32"],
        ),
    )

    # Overfitting one batch at a fixed lr.
    model = build(cfg, device)
    optimizer = torch.optim.SGD(trainable(model), lr=0.01, momentum=0.9)
    history, first_terms = [], {}
    for _ in range(sizes.overfit_steps):
        step = train_step(model, optimizer, images, targets, device, torch.bfloat16, clip=10.0)
        first_terms = first_terms or step
        history.append(float(sum(step.values())))
    last = statistics.fmean(history[-5:])
    factor = history[0] / last if last > 0 else math.inf
    shown = ", ".join(f"{history[i]:.3f}" for i in range(0, len(history), max(1, len(history) // 8)))
    out.check(
        "A overfit",
        all(math.isfinite(x) for x in history) and factor >= 2.0,
        f"bf16, SGD lr 0.01 momentum 0.9 clip 10, {len(history)} steps on one batch: loss {history[0]:.3f} -> "
        f"{last:.3f} (mean of last 5), {factor:.1f}x (need >= 2); along the way {shown}; terms first "
        f"({fmt_losses(first_terms)}) last ({fmt_losses(step)})",
    )
    del model, optimizer
    free_device_memory(device)

    # fp16 + GradScaler.
    model = build(cfg, device)
    optimizer = torch.optim.SGD(trainable(model), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type)
    scales, last_losses = [scaler.get_scale()], {}
    skipped = 0
    for _ in range(sizes.fp16_steps):
        last_losses = train_step(
            model, optimizer, images, targets, device, torch.float16, scaler=scaler, clip=10.0
        )
        scale = scaler.get_scale()
        skipped += scale < scales[-1]  # the scaler lowers the scale exactly when it skips a step
        scales.append(scale)
    finite = all(bool(torch.isfinite(v)) and v.dtype == torch.float32 for v in last_losses.values())
    out.check(
        "A fp16-scaler",
        finite,
        f"{sizes.fp16_steps} step{'s' if sizes.fp16_steps != 1 else ''}, {skipped} skipped for inf/NaN gradients, scale {scales[0]:g} -> "
        f"{scales[-1]:g}; last losses {fmt_losses(last_losses)}",
    )
    del model, optimizer
    free_device_memory(device)


# ----------------------------------------------------------------------------- B: RoIAlign


def roi_inputs(sizes: Sizes, device: torch.device, seed: int = 0):
    """Pyramid features (levels 2..5, channels_last like the model's) and boxes of every size."""
    g = torch.Generator().manual_seed(seed)
    channels = 32 if sizes.small else 256
    rois_per_image = 32 if sizes.small else 512
    height = math.ceil(sizes.height / 32) * 32
    width = math.ceil(sizes.width / 32) * 32
    features = {
        k: torch.randn(2, channels, height >> k, width >> k, generator=g).contiguous(
            memory_format=torch.channels_last
        )
        for k in (2, 3, 4, 5)
    }
    # Each RoI's scale sqrt(wh) is drawn within the range Eq. (1) maps to a level, a quarter of
    # them per level P2..P5 (P5 wants >= 448 px: larger than the small image, as a box may be).
    low = torch.tensor([2.0, 112.0, 224.0, 448.0])
    high = torch.tensor([112.0, 224.0, 448.0, 896.0])
    boxes = []
    for _ in range(2):
        n = rois_per_image - 4
        level = torch.arange(n) % 4
        u = torch.rand(n, generator=g)
        scale = torch.exp(torch.log(low[level]) + u * (torch.log(high[level]) - torch.log(low[level])))
        aspect = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(2.0), generator=g))
        side = torch.stack([scale * aspect.sqrt(), scale / aspect.sqrt()], dim=1)  # (w, h), sqrt(wh) = scale
        center = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.1, height * 1.1]) - torch.tensor(
            [width * 0.05, height * 0.05]
        )
        b = torch.cat([center - side / 2, center + side / 2], dim=1)
        edge = torch.tensor(
            [
                [0.0, 0.0, float(width), float(height)],  # the whole image
                [10.0, 10.0, 10.3, 10.2],  # smaller than a cell
                [width - 5.0, height - 5.0, width + 40.0, height + 40.0],  # across the corner
                [-30.0, 4.0, 20.0, 60.0],  # across the left border
            ]
        )
        boxes.append(torch.cat([b, edge]))
    return features, boxes


def _pooler(levels: tuple[int, ...], kernel: str | None = None):
    """`MultiLevelRoIAlign` as the detector builds it; ``kernel`` forces "torchvision" or "gather"."""
    from torchvision.ops import roi_align

    from fpn.poolers import MultiLevelRoIAlign
    from fpn.roi_align import roi_align_gather

    class Forced(MultiLevelRoIAlign):
        def _pool(self, feature, rois, level):
            fn = roi_align_gather if kernel == "gather" else roi_align
            return fn(
                feature,
                rois,
                output_size=self.output_size,
                spatial_scale=math.ldexp(1.0, -level),
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )

    cls = MultiLevelRoIAlign if kernel is None else Forced
    return cls(levels=levels, output_size=7, sampling_ratio=2)


@contextlib.contextmanager
def spy_kernels(calls: list[str]) -> Iterator[None]:
    """Record which of the two functions `fpn.poolers` calls."""
    import fpn.poolers as poolers

    tv, gather = poolers.roi_align, poolers.roi_align_gather

    def tv_spy(*args, **kwargs):
        calls.append("torchvision.ops.roi_align")
        return tv(*args, **kwargs)

    def gather_spy(*args, **kwargs):
        calls.append("fpn.roi_align.roi_align_gather")
        return gather(*args, **kwargs)

    poolers.roi_align, poolers.roi_align_gather = tv_spy, gather_spy
    try:
        yield
    finally:
        poolers.roi_align, poolers.roi_align_gather = tv, gather


def pool_and_grad(pooler, features, boxes, device, grad_out, dtype=None, amp=False, host=True):
    """Pooled (R, C, 7, 7) and d(sum(pooled * grad_out))/d(feature) per level, as float32 on the
    CPU (``host``; else left on the device). Inputs already on ``device`` are not copied."""
    feats = {
        k: v.to(device=device, dtype=dtype or v.dtype).detach().requires_grad_() for k, v in features.items()
    }
    with autocast(device, torch.bfloat16 if amp else None):
        pooled = pooler(feats, [b.to(device) for b in boxes])
    (pooled.float() * grad_out.to(device)).sum().backward()
    if not host:
        return pooled, {k: v.grad for k, v in feats.items()}
    # A level without RoIs gets no gradient: zeros.
    grads = {
        k: (v.grad if v.grad is not None else torch.zeros_like(v)).float().cpu() for k, v in feats.items()
    }
    return pooled.detach().float().cpu(), grads


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def section_b(device: torch.device, sizes: Sizes, out: Report) -> None:
    levels = (2, 3, 4, 5)
    features, boxes = roi_inputs(sizes, device)
    rois = sum(b.shape[0] for b in boxes)
    channels = features[2].shape[1]
    from fpn.poolers import assign_levels

    per_level = torch.bincount(
        assign_levels(torch.cat(boxes), canonical_level=4, canonical_scale=224.0, min_level=2, max_level=5),
        minlength=6,
    )[2:].tolist()
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(rois, channels, 7, 7, generator=g)

    # Which function the pooler calls, and what the rule in fpn/poolers.py says it should.
    pooler = _pooler(levels)
    chosen = {}
    for case, amp in (("float32", False), ("bf16 autocast", True)):
        calls: list[str] = []
        with spy_kernels(calls):
            pool_and_grad(pooler, features, boxes, device, grad_out, torch.bfloat16 if amp else None, amp)
        chosen[case] = sorted(set(calls))
    expected = {
        "float32": [
            "fpn.roi_align.roi_align_gather" if device.type == "cpu" else "torchvision.ops.roi_align"
        ],
        "bf16 autocast": ["torchvision.ops.roi_align"],
    }
    out.check(
        "B kernel",
        chosen == expected,
        f"on {device.type}: float32 features -> {', '.join(chosen['float32'])}; bf16 under autocast -> "
        f"{', '.join(chosen['bf16 autocast'])} (rule: gather only for float32 on the CPU"
        + ("" if chosen == expected else f"; expected {expected}")
        + ")",
    )
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            pool_and_grad(pooler, features, boxes, device, grad_out)
            synchronize(device)
        names = sorted(
            {
                e.key
                for e in prof.key_averages()
                if "roi_align" in e.key.lower() or "embedding_bag" in e.key.lower()
            }
        )
        out.info("B profile", f"float32 on {device.type}: " + "; ".join(n[:90] for n in names))
    except Exception as err:  # noqa: BLE001 - the figure is optional, the checks are not
        out.info("B profile", f"profiler unavailable ({type(err).__name__}: {err})")

    # The pooler on the device against the CPU gather kernel, forward and backward.
    reference = _pooler(levels, "gather")
    ref_out, ref_grad = pool_and_grad(reference, features, boxes, torch.device("cpu"), grad_out)
    dev_out, dev_grad = pool_and_grad(pooler, features, boxes, device, grad_out)
    tol = 1e-4 + 1e-4 * float(ref_out.abs().max())
    diff = max_diff(dev_out, ref_out)
    out.check(
        "B forward",
        diff <= tol,
        f"{rois} RoIs (P2..P5: {per_level}) x {channels} channels: max |device - CPU gather| {diff:.2e} "
        f"(tolerance {tol:.1e})",
    )
    diffs = {k: max_diff(dev_grad[k], ref_grad[k]) for k in levels}
    scale = max(float(v.abs().max()) for v in ref_grad.values())
    tol = 1e-4 + 1e-4 * scale
    out.check(
        "B backward",
        max(diffs.values()) <= tol,
        "max |device - CPU gather| of the feature gradients: "
        + ", ".join(f"P{k} {d:.2e}" for k, d in diffs.items())
        + f" (tolerance {tol:.1e}, max |grad| {scale:.3g})",
    )
    if device.type == "cpu":
        # On the CPU the pooler *is* the gather kernel: compare torchvision's CPU kernel too.
        tv_out, tv_grad = pool_and_grad(_pooler(levels, "torchvision"), features, boxes, device, grad_out)
        d_out = max_diff(tv_out, ref_out)
        d_grad = max(max_diff(tv_grad[k], ref_grad[k]) for k in levels)
        out.check(
            "B torchvision-cpu",
            d_out <= 1e-4 + 1e-4 * float(ref_out.abs().max()) and d_grad <= tol,
            f"torchvision's CPU kernel vs the gather kernel: forward {d_out:.2e}, backward {d_grad:.2e}",
        )

    # bf16 features under autocast (what the detector feeds it in bf16 training).
    bf16_feats = {k: v.to(torch.bfloat16).float() for k, v in features.items()}
    ref_out, ref_grad = pool_and_grad(reference, bf16_feats, boxes, torch.device("cpu"), grad_out)
    amp_out, amp_grad = pool_and_grad(pooler, features, boxes, device, grad_out, torch.bfloat16, amp=True)
    d_out = max_diff(amp_out, ref_out)
    d_grad = max(max_diff(amp_grad[k], ref_grad[k]) for k in levels)
    tol_out = 2e-2 * (1 + float(ref_out.abs().max()))
    tol_grad = 2e-2 * (1 + max(float(v.abs().max()) for v in ref_grad.values()))
    out.check(
        "B bf16-autocast",
        d_out <= tol_out and d_grad <= tol_grad,
        f"pooled {d_out:.2e} (tolerance {tol_out:.1e}), gradients {d_grad:.2e} (tolerance {tol_grad:.1e}) "
        "against the CPU gather kernel on the same bf16 values",
    )

    # Speed of the two kernels on the device (inputs already there).
    on_device = {k: v.to(device) for k, v in features.items()}
    boxes_on_device, grad_on_device = [b.to(device) for b in boxes], grad_out.to(device)
    timings = {}
    for kernel in ("torchvision", "gather"):
        forced = _pooler(levels, kernel)
        try:  # a figure only: the gather kernel is not what the device runs in training
            pool_and_grad(forced, on_device, boxes_on_device, device, grad_on_device, host=False)  # warm-up
            times = []
            for _ in range(sizes.roi_timing_steps):
                synchronize(device)
                start = time.perf_counter()
                pool_and_grad(forced, on_device, boxes_on_device, device, grad_on_device, host=False)
                synchronize(device)
                times.append(time.perf_counter() - start)
            timings[kernel] = f"{1000 * statistics.median(times):.1f} ms"
        except Exception as err:  # noqa: BLE001
            timings[kernel] = f"failed ({type(err).__name__}: {str(err)[:200]})"
    out.info(
        "B timing",
        f"forward+backward of {rois} RoIs x {channels} channels on {device.type} (median of "
        f"{sizes.roi_timing_steps}): torchvision {timings['torchvision']}, gather {timings['gather']}",
    )


# ----------------------------------------------------------------------------- C: the training loop


def synthetic_dataset(root: Path, *, train_images: int, val_images: int, width: int, height: int) -> Path:
    """The project's synthetic COCO data through its real preprocess; returns the preprocessed root."""
    from pipeline.config import DataConfig, PreprocessConfig
    from pipeline.fetch.synthetic import generate_synthetic
    from pipeline.preprocess.stage import preprocess_dataset

    data = DataConfig(
        seed=0,
        synthetic_train_images=train_images,
        synthetic_val_images=val_images,
        synthetic_width=width,
        synthetic_height=height,
    )
    generate_synthetic(data, root / "coco", progress=False)
    with environ_without("RAY_ADDRESS"):  # RAY_ADDRESS alone would send the preprocessing to Ray
        preprocess_dataset(
            root / "coco",
            root / "preprocessed",
            splits=(data.train_split, data.val_split),
            cfg=PreprocessConfig(workers=1),
            progress=False,
        )
    return root / "preprocessed"


def loop_params(device: torch.device, sizes: Sizes, **train: Any):
    """Params for the loop: the embedded default's model (params.yaml) or, with --small, the tests' tiny one."""
    from pipeline.config import params_from_dict

    if sizes.small:
        model = {**TINY_MODEL, "norm": "gn", "trainable_stages": 5, "min_size": 96, "max_size": 120,
                 "anchor_sizes": [8, 16, 32, 64, 128], "num_classes": 3}  # fmt: skip
        model["anchor_sizes"] = list(model["anchor_sizes"])
        base = {"batch_size": 2, "lr": 0.08, "loader_workers": 1}
    else:
        model = {"backbone": "resnet18", "norm": "gn", "trainable_stages": 5, "fpn_channels": 64,
                 "min_size": 256, "max_size": 320, "anchor_sizes": [16, 32, 64, 128, 256],
                 "representation_size": 256, "roi_batch_per_image": 64, "rpn_pre_nms_topk_train": 1000,
                 "rpn_post_nms_topk_train": 300, "num_classes": 3}  # fmt: skip
        base = {"batch_size": 4, "lr": 0.04, "loader_workers": 2}
    base.update(
        use_gpu=device.type == "cuda",
        cpus_per_worker=1,
        amp="bf16",
        grad_clip_norm=10.0,
        warmup_iters=2,
        lr_steps=[],
        log_every=2,
        threads=0,  # leave torch's thread count alone (the loop would set it process-wide)
    )
    base.update(train)
    return params_from_dict({"model": model, "train": base})


def loop_dataset(root: Path, device: torch.device, sizes: Sizes) -> Path:
    """6 batches an epoch at the loop's batch size, and a few validation images."""
    if sizes.small:
        return synthetic_dataset(root, train_images=8, val_images=4, width=160, height=128)
    return synthetic_dataset(root, train_images=24, val_images=8, width=320, height=256)


def section_c(device: torch.device, sizes: Sizes, out: Report) -> None:
    try:
        from pipeline.dataset import read_data_hash
        from pipeline.train.checkpoint import history_rows
        from pipeline.train.loop import TrainJob, train_worker
        from pipeline.train.sessions import LocalSession
    except ImportError as err:
        raise SectionSkipped(f"importing the training loop failed: {type(err).__name__}: {err}") from None
    from fpn import build_detector

    class CrashAfter(LocalSession):
        """A local session whose process 'dies' right after the checkpoint of ``iteration``."""

        def __init__(self, directory: Path, iteration: int) -> None:
            super().__init__(directory, device=device)
            self.crash_at = iteration

        def report(self, metrics, state, iteration):
            super().report(metrics, state, iteration)
            if iteration == self.crash_at:
                raise KeyboardInterrupt(f"killed after iteration {iteration}")

    # Small: 8 images / batch 2 = 4 batches an epoch; full: 24 / 4 = 6. The kill is mid-epoch
    # and the resumed part crosses into the next epoch.
    iterations, crash_at, workers = (6, 3, 1) if sizes.small else (10, 4, 2)
    cuda_rng = device.type == "cuda"

    def losses(state: dict[str, Any]) -> list[float]:
        return [r["loss"] for r in history_rows(state)]

    with tempfile.TemporaryDirectory(prefix="gpu-smoke-C-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        data = loop_dataset(tmp, device, sizes)
        data_hash = read_data_hash(data)

        def make_job(loader_workers: int) -> Any:
            params = loop_params(
                device, sizes, iterations=iterations, checkpoint_every=crash_at, loader_workers=loader_workers
            )
            return TrainJob(
                params=params, data_root=str(data), run_name="gpu-smoke", data_hash=data_hash,
                git_commit="smoke", tracking_uri=None, init_weights_file=None,
            )  # fmt: skip

        def run(job: Any, session: Any) -> dict[str, Any]:
            train_worker(job, session)
            return session.restore()

        def trial(job: Any, name: str) -> dict[str, Any]:
            """Uninterrupted; killed after ``crash_at`` and resumed; on CUDA a second uninterrupted run."""
            result: dict[str, Any] = {"session": LocalSession(tmp / f"{name}-straight", device=device)}
            started = time.perf_counter()
            result["straight"] = run(job, result["session"])
            result["seconds"] = time.perf_counter() - started
            result["rng_straight"] = torch.cuda.get_rng_state(device).clone() if cuda_rng else None
            with contextlib.suppress(KeyboardInterrupt):
                train_worker(job, CrashAfter(tmp / f"{name}-killed", crash_at))
                raise RuntimeError(f"the run was not interrupted at iteration {crash_at}")
            result["killed"] = LocalSession(tmp / f"{name}-killed", device=device).restore()
            result["resumed"] = run(job, LocalSession(tmp / f"{name}-killed", device=device))
            result["rng_resumed"] = torch.cuda.get_rng_state(device).clone() if cuda_rng else None
            if device.type == "cuda":
                result["again"] = run(job, LocalSession(tmp / f"{name}-again", device=device))
            return result

        def verdict(r: dict[str, Any], job: Any) -> tuple[bool, str]:
            """Does the resumed run match the uninterrupted one? (ok, detail)"""
            a, b, killed = r["straight"], r["resumed"], r["killed"]
            la, lb = losses(a), losses(b)
            progress = b["progress"]
            structure = (
                progress["attempts"] == 2
                and progress["iteration"] == iterations
                and progress["epoch"] == a["progress"]["epoch"]
                and [int(row["step"]) for row in history_rows(b)] == list(range(1, iterations + 1))
                and killed["progress"]["iteration"] == crash_at
            )
            where = (
                f"killed after iteration {crash_at} (epoch {killed['progress']['epoch']}, batch "
                f"{killed['progress']['batch_in_epoch']} of the epoch), resumed to {progress['iteration']} "
                f"(epoch {progress['epoch']}), attempts {progress['attempts']}"
            )
            if device.type == "cpu":
                same_weights = all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
                if la == lb:
                    shown = "identical at every step"
                else:
                    first = next(i for i, (p, q) in enumerate(zip(la, lb, strict=True), 1) if p != q)
                    shown = f"DIFFER from step {first} (uninterrupted/resumed): " + ", ".join(
                        f"{p:.4f}/{q:.4f}" for p, q in zip(la, lb, strict=True)
                    )
                detail = f"{where}; losses {shown}; weights {'bit-identical' if same_weights else 'DIFFER'}"
                return structure and la == lb and same_weights, detail

            # CUDA: atomic adds make two identical runs differ; the second uninterrupted run is the floor.
            torch.manual_seed(job.params.train.seed)  # as build_model does
            initial = build_detector(job.params.model).state_dict()
            keys = [k for k, v in a["model"].items() if v.is_floating_point()]

            def distance(x: dict[str, Any], y: dict[str, Any]) -> float:
                return math.sqrt(sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in keys))

            moved = distance(a["model"], initial) or math.inf
            w_resumed, w_floor = (
                distance(b["model"], a["model"]) / moved,
                distance(r["again"]["model"], a["model"]) / moved,
            )

            def gap(other: list[float]) -> float:
                return max(abs(p - q) / max(abs(p), 1e-8) for p, q in zip(la, other, strict=True))

            l_resumed, l_floor = gap(lb), gap(losses(r["again"]))
            ok = structure and w_resumed <= max(4 * w_floor, 0.02) and l_resumed <= max(4 * l_floor, 0.05)
            detail = (
                f"{where}; weights apart {w_resumed:.2e} of the distance trained (a second uninterrupted run: "
                f"{w_floor:.2e}), max relative loss gap {l_resumed:.2e} (second run: {l_floor:.2e}); "
                "losses uninterrupted/resumed "
                + ", ".join(f"{p:.3f}/{q:.3f}" for p, q in zip(la, lb, strict=True))
            )
            return ok, detail

        job_w = make_job(workers)
        t = job_w.params.train
        m = job_w.params.model
        out.info(
            "C setup",
            f"synthetic data made and preprocessed in {time.perf_counter() - start:.1f} s; "
            f"{m.backbone}-FPN {m.norm} d={m.fpn_channels} at {m.describe_sizes()}, batch "
            f"{t.batch_size}, amp {t.amp} ({'used' if device.type == 'cuda' else 'ignored by the loop on CPU'}), "
            f"pin_memory {device.type == 'cuda'}, {iterations} iterations, checkpoint every {crash_at}; "
            f"runs with {workers} and with 0 loader workers",
        )
        w = trial(job_w, "workers")
        a = w["straight"]
        la = losses(a)
        out.check(
            "C train",
            a["progress"]["iteration"] == iterations and all(math.isfinite(x) for x in la),
            f"loader_workers {workers}: {a['progress']['iteration']}/{iterations} iterations in "
            f"{w['seconds']:.1f} s, {a['progress']['epoch'] + 1} epochs, loss {la[0]:.3f} -> {la[-1]:.3f}",
        )
        rates = [r["images_per_s"] for r in w["session"].reported if "images_per_s" in r]
        out.info(
            "C throughput",
            f"{rates[-1]:.1f} images/s in the last {t.log_every} steps (the loop's figure; per window "
            f"{', '.join(f'{x:.1f}' for x in rates)})",
        )

        z = trial(make_job(0), "no-workers")
        ok, detail = verdict(z, make_job(0))
        out.check("C resume", ok, f"loader_workers 0: {detail}")
        ok_w, detail_w = verdict(w, job_w)
        out.check("C resume-workers", ok_w, f"loader_workers {workers}: {detail_w}")
        first_w, first_0 = la[0], losses(z["straight"])[0]
        out.info(
            "C loader-workers",
            f"step-1 loss with loader_workers {workers} {first_w:.6f}, with 0 {first_0:.6f}: "
            + (
                "the same first batch"
                if first_w == first_0
                else "different (same weights, same batches: the flips differ, so train.loader_workers "
                "changes what is learned)"
            ),
        )
        if cuda_rng:
            same = torch.equal(z["rng_straight"], z["rng_resumed"])
            out.info(
                "C cuda-rng",
                "the resumed run's CUDA generator ended "
                + (
                    "where the uninterrupted run's did"
                    if same
                    else "elsewhere than the uninterrupted run's (the checkpoint's 'rng' is "
                    "torch.get_rng_state(), the CPU generator; the RPN/RoI samplers draw on the device)"
                ),
            )


# ----------------------------------------------------------------------------- D: DDP, two ranks


def _ddp_rank(rank: int, world_size: int, init_file: str, out_dir: str, device_type: str, steps: int) -> None:
    """One rank of section D (a module-level function: spawned processes import it)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fpn import ModelConfig, build_detector

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S),
    )
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
            torch.set_flush_denormal(True)
        cfg = ModelConfig(**{**TINY_MODEL, "norm": "gn", "trainable_stages": 5, "num_classes": 80})
        torch.manual_seed(100 + rank)  # different weights on each rank: DDP must broadcast rank 0's
        model = build_detector(cfg).to(device).train()
        initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        net = DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(trainable(model), lr=0.01, momentum=0.9)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        losses = []
        for step in range(steps):
            images, targets = synthetic_batch(128, 160, device, seed=step, rank=rank)
            result = train_step(net, optimizer, images, targets, device, dtype, clip=10.0)
            losses.append(float(sum(result.values())))
        synchronize(device)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"state": state, "initial": initial, "losses": losses}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def section_d(device: torch.device, sizes: Sizes, out: Report) -> None:
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        raise SectionSkipped("torch.distributed with gloo is not available in this build")
    steps = 3
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-D-") as tmp:
        start = time.perf_counter()
        context = mp.spawn(
            _ddp_rank, args=(2, str(Path(tmp) / "store"), tmp, device.type, steps), nprocs=2, join=False
        )
        deadline = start + DDP_TIMEOUT_S
        try:
            while not context.join(timeout=max(0.1, min(5.0, deadline - time.perf_counter()))):
                if time.perf_counter() > deadline:
                    for process in context.processes:
                        if process.is_alive():
                            process.kill()
                            process.join(10)
                    out.check("D ddp", False, f"the 2 ranks did not finish within {DDP_TIMEOUT_S} s (killed)")
                    return
        except Exception as err:  # a rank raised or died: its message, not a traceback of ours
            out.check("D ddp", False, f"a rank failed: {str(err).strip().splitlines()[-1][:500]}")
            return
        seconds = time.perf_counter() - start
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    differing = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    started_apart = any(not torch.equal(ranks[0]["initial"][k], ranks[1]["initial"][k]) for k in s0)
    moved = any(not torch.equal(s0[k], ranks[0]["initial"][k]) for k in s0 if s0[k].is_floating_point())
    losses = " / ".join(", ".join(f"{x:.3f}" for x in r["losses"]) for r in ranks)
    out.check(
        "D ddp",
        not differing and started_apart and moved,
        f"2 ranks (gloo, {device.type} tensors, one device) x {steps} steps in {seconds:.1f} s with spawn; "
        f"weights {'bit-identical' if not differing else f'DIFFER in {len(differing)} tensors'} after, "
        f"built {'different' if started_apart else 'identical (test is void)'} on each rank, "
        f"{'moved' if moved else 'NOT moved'} by training; losses rank 0 / rank 1: {losses}",
    )


# ----------------------------------------------------------------------------- E: Ray


def section_e(device: torch.device, sizes: Sizes, out: Report) -> None:
    try:
        import ray  # noqa: F401 - the check is whether it imports
    except ImportError as err:
        raise SectionSkipped(f"import ray failed: {err}") from None
    import numpy as np

    from fpn import build_detector
    from pipeline import cluster
    from pipeline.dataset import read_categories, read_data_hash
    from pipeline.inference import predict_split
    from pipeline.model_file import save_model_file
    from pipeline.train import ray_train
    from pipeline.train.loop import TrainJob

    iterations = 4
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-E-") as tmp_name:
        tmp = Path(tmp_name)
        data = synthetic_dataset(tmp, train_images=8, val_images=4, width=160, height=128)
        params = loop_params(
            device, SMALL, iterations=iterations, checkpoint_every=2, loader_workers=0, num_workers=1
        )
        job = TrainJob(
            params=params, data_root=str(data), run_name="gpu-smoke-ray", data_hash=read_data_hash(data),
            git_commit="smoke", tracking_uri=None, init_weights_file=None,
        )  # fmt: skip
        # A local cluster of our own (data and storage are local paths); its workers import this checkout.
        python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        with environ_without("RAY_ADDRESS", "PYTHONPATH"):
            os.environ["PYTHONPATH"] = python_path
            try:
                start = time.perf_counter()
                with cluster.connected(log_to_driver=False, dashboard=False) as where:
                    cluster.check_fits(params, cluster.resources(), where)
                    started = time.perf_counter() - start
                    state, _ = ray_train.fit(job, str(tmp / "ray-storage"))
                    train_s = time.perf_counter() - start - started
                    losses = [row[1] for row in state["history"]["rows"].tolist()]
                    out.check(
                        "E ray-train",
                        state["progress"]["iteration"] == iterations and all(map(math.isfinite, losses)),
                        f"1 worker ({'1 GPU' if params.train.use_gpu else '1 CPU'}) on {where} "
                        f"(up in {started:.1f} s): {state['progress']['iteration']}/{iterations} iterations "
                        f"in {train_s:.1f} s, losses {', '.join(f'{x:.3f}' for x in losses)}",
                    )

                    model = build_detector(params.model)
                    model.load_state_dict(state["model"])
                    model_file = tmp / "model.pt"
                    save_model_file(model_file, model, params.model, read_categories(data))
                    split = params.data.val_split
                    local = predict_split(model_file, data, split, batch_size=2, num_workers=0)
                    sharded = predict_split(model_file, data, split, batch_size=2, num_workers=2)
            finally:
                os.environ.pop("PYTHONPATH", None)
    problems = []
    if [d.image_id for d in local.detections] != [d.image_id for d in sharded.detections]:
        problems.append("different images")
    for x, y in zip(local.detections, sharded.detections, strict=False):
        for field in ("boxes", "scores", "labels", "proposals", "proposal_scores"):
            p, q = getattr(x, field), getattr(y, field)
            if p.shape != q.shape or (p.size and not np.allclose(p, q, atol=1e-3, rtol=1e-3)):
                problems.append(f"image {x.image_id} {field}")
    expected_device = "cuda" if device.type == "cuda" else sharded.device
    boxes = sum(len(d.boxes) for d in sharded.detections)
    proposals = sum(len(d.proposals) for d in sharded.detections)
    out.check(
        "E ray-inference",
        not problems and sharded.device == expected_device,
        f"{len(sharded.detections)} images over 2 Ray tasks on {sharded.device} in {sharded.wall_seconds:.1f} s "
        f"(in-process on {local.device}: {local.wall_seconds:.1f} s): {boxes} detections, {proposals} proposals, "
        + ("the same as in-process" if not problems else f"DIFFER: {problems[:5]}"),
    )


# ----------------------------------------------------------------------------- main


SECTIONS: dict[str, Callable[[torch.device, Sizes, Report], None]] = {
    "A": section_a,
    "B": section_b,
    "C": section_c,
    "D": section_d,
    "E": section_e,
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    import fpn

    return (
        f"{where}; torch {torch.__version__}, torchvision {torchvision.__version__}, python "
        f"{platform.python_version()}; {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"code from {Path(fpn.__file__).resolve().parents[1]}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    p.add_argument("--small", action="store_true", help="tiny sizes and few steps (CPU CI)")
    p.add_argument("--sections", default="ABCDE", help="which sections, e.g. AB (default ABCDE)")
    args = p.parse_args(argv)
    args.sections = args.sections.upper()
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown section(s) {''.join(unknown)} (choose from {''.join(SECTIONS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Report()
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        out.info("machine", machine(torch.device("cpu")))
        out.check(
            "machine",
            False,
            "no CUDA device (torch.cuda.is_available() is False; --device cpu runs on the CPU)",
        )
        return 1
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # a random detector slows ~3x on denormal floats otherwise
    out.info("machine", machine(device))
    sizes = SMALL if args.small else FULL
    for letter in dict.fromkeys(args.sections):
        section_start = time.perf_counter()
        try:
            SECTIONS[letter](device, sizes, out)
        except SectionSkipped as why:
            out.info(letter, f"skipped ({why})")
        except Exception as err:  # noqa: BLE001 - a broken section is a FAIL, the others still run
            traceback.print_exc()
            out.check(letter, False, f"raised {type(err).__name__}: {str(err)[:500]}")
        finally:
            with contextlib.suppress(Exception):  # a broken CUDA context: the next section says so
                free_device_memory(device)
        out.info(letter, f"section took {time.perf_counter() - section_start:.1f} s")
    c = out.counts
    out.info("summary", f"{c['PASS']} PASS, {c['FAIL']} FAIL in {time.perf_counter() - started:.1f} s")
    return 1 if c["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
