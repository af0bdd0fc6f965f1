"""Timing detectors: latency, throughput, peak memory and the time split by component.

Conventions:

* A detector is called as ``model(images)`` (eval: a list of detections) or
  ``model(images, targets)`` (train: the loss dict), ``images`` a list of float tensors
  [3, H, W] in 0..1 on the model's device.
* Every timed thing is a *workload*: a callable ``run(clock) -> list[Span]`` doing one call
  (one inference, one training step). It may report spans ``(part, start, end)`` of clock
  stamps, e.g. one per submodule; `measure_alternating` turns them into the time split.
* Several workloads are timed *alternately* (round robin, one call each per round) so that
  the drift and noise of a shared machine fall on all of them alike.
* CPU time is `time.perf_counter`. On CUDA the stamps are CUDA events recorded in stream
  order, with one synchronize at the end of each call, so hooks do not serialise the GPU.
* Seconds inside, milliseconds in reports.

The component split hooks the detector's submodules (``forward_pre_hook`` / ``forward_hook``
stamping the clock). Five modules make about ten stamps per call, microseconds against
milliseconds, so the split is taken in the same calls as the totals and sums to them.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

# The parts of an inference, in the order they run. "preprocess" is the transform's forward
# (resize, normalise, pad), "postprocess" everything after the RoI heads (boxes back to input
# pixels, output dicts), "other" the rest of the call outside the hooked modules.
INFERENCE_PARTS = ("preprocess", "backbone", "neck", "rpn", "roi_heads", "postprocess", "other")
# The parts of a training step.
TRAIN_STEP_PARTS = ("forward", "backward", "optimizer", "other")

# Inference part -> dotted submodule path, for our detector and for torchvision's FasterRCNN
# (whose `backbone` is a BackboneWithFPN: `body` is the bottom-up pathway, `fpn` the neck).
OUR_COMPONENTS: dict[str, str] = {
    "preprocess": "transform",
    "backbone": "backbone",
    "neck": "neck",
    "rpn": "rpn",
    "roi_heads": "roi_heads",
}
TORCHVISION_COMPONENTS: dict[str, str] = {
    "preprocess": "transform",
    "backbone": "backbone.body",
    "neck": "backbone.fpn",
    "rpn": "rpn",
    "roi_heads": "roi_heads",
}


class ProfilingError(RuntimeError):
    """A workload that cannot be measured as asked (e.g. a device that is not there)."""


# --------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """Stamps on one device's timeline."""

    def stamp(self) -> Any: ...

    def seconds(self, start: Any, end: Any) -> float: ...

    def sync(self) -> None: ...


class CpuClock:
    """`time.perf_counter` stamps."""

    def stamp(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def sync(self) -> None:
        return None


class CudaClock:
    """CUDA events recorded on the current stream; read after `sync`."""

    def stamp(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0

    def sync(self) -> None:
        torch.cuda.synchronize()


def make_clock(device: torch.device | str) -> Clock:
    """The clock for ``device`` ("cpu" or "cuda[:i]")."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfilingError(f"device {device}: CUDA is not available here")
        return CudaClock()
    if device.type == "cpu":
        return CpuClock()
    raise ProfilingError(f"device {device}: only cpu and cuda are supported")


Span = tuple[str, Any, Any]  # (part, start stamp, end stamp)
Workload = Callable[[Clock], list[Span]]


# --------------------------------------------------------------------------- results


@dataclass
class Timing:
    """Per-call times of one workload: ``seconds[i]`` (wall) for call i, ``parts[name][i]`` its
    split, ``cpu_seconds[i]`` the process's CPU time in the call (all threads; on a shared
    machine it holds up better than wall time, as waiting for a core does not count)."""

    batch_size: int
    seconds: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p90_s(self) -> float:
        """90th percentile, linear between order statistics (numpy's default)."""
        ordered = sorted(self.seconds)
        rank = 0.9 * (len(ordered) - 1)
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    @property
    def cpu_median_s(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else math.nan

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_s

    def split_s(self) -> dict[str, float]:
        """Median seconds per part, rescaled so the parts sum to `median_s` exactly.

        Medians of parts do not add up to the median of totals; the rescale (a few percent
        at most) keeps the split's shares honest and its sum equal to the reported latency.
        """
        if not self.parts:
            return {}
        medians = {name: statistics.median(values) for name, values in self.parts.items()}
        total = sum(medians.values())
        scale = self.median_s / total if total > 0 else 0.0
        return {name: value * scale for name, value in medians.items()}


# --------------------------------------------------------------------------- workloads


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class InferenceWorkload:
    """One eval-mode call ``model(images)`` under `torch.inference_mode`, split by component.

    ``components`` maps a part of `INFERENCE_PARTS` to a submodule path (`OUR_COMPONENTS`,
    `TORCHVISION_COMPONENTS`); None times the call as a whole. Parts whose module is absent
    or not called count zero. ``autocast`` (e.g. torch.bfloat16) runs the call under
    `torch.autocast`. Use as a context manager, or call `close` to remove the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Sequence[Tensor],
        *,
        components: Mapping[str, str] | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.images = list(images)
        self.autocast = autocast
        self.outputs: Any = None
        self._clock: Clock | None = None
        self._spans: list[Span] = []
        self._open: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for part, path in (components or {}).items():
            module = _resolve(model, path)
            if module is None:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(part)))
            self._handles.append(module.register_forward_hook(self._post_hook(part)))

    def _pre_hook(self, part: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if self._clock is not None:
                self._open[part] = self._clock.stamp()

        return hook

    def _post_hook(self, part: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            if self._clock is not None and part in self._open:
                self._spans.append((part, self._open.pop(part), self._clock.stamp()))

        return hook

    def __call__(self, clock: Clock) -> list[Span]:
        self._clock, self._spans, self._open = clock, [], {}
        device_type = self.images[0].device.type
        try:
            with (
                torch.inference_mode(),
                torch.autocast(
                    device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
                ),
            ):
                self.outputs = self.model(self.images)
            end = clock.stamp()
        finally:
            self._clock = None
        spans = self._spans
        heads_end = [span[2] for span in spans if span[0] == "roi_heads"]
        if heads_end:
            spans.append(("postprocess", heads_end[-1], end))
        return spans

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> InferenceWorkload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainStepWorkload:
    """One training step: forward with targets, sum of the loss dict, backward, optimizer step.

    The model is put in train mode. ``optimizer`` defaults to SGD (momentum 0.9, weight
    decay 1e-4) over the parameters that require grad, the work of the training stage's
    optimizer; its small learning rate keeps randomly initialised weights sane over many
    steps and does not change the cost. A non-finite loss raises `ProfilingError`.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model.train()
        self.images = list(images)
        self.targets = list(targets)
        self.autocast = autocast
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        self.last_loss = math.nan

    def __call__(self, clock: Clock) -> list[Span]:
        device_type = self.images[0].device.type
        start = clock.stamp()
        with torch.autocast(
            device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
        ):
            losses = self.model(self.images, self.targets)
            loss = sum(losses.values())
        forward_end = clock.stamp()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_end = clock.stamp()
        self.optimizer.step()
        step_end = clock.stamp()
        self.last_loss = float(loss.detach())
        if not math.isfinite(self.last_loss):
            parts = {name: float(value) for name, value in losses.items()}
            raise ProfilingError(f"training step: non-finite loss {self.last_loss} ({parts})")
        return [
            ("forward", start, forward_end),
            ("backward", forward_end, backward_end),
            ("optimizer", backward_end, step_end),
        ]


# --------------------------------------------------------------------------- measuring


def _one_call(
    workload: Workload, clock: Clock, parts: Sequence[str]
) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, process CPU seconds, split) of one call."""
    clock.sync()
    cpu_start = time.process_time()
    start = clock.stamp()
    spans = workload(clock)
    end = clock.stamp()
    clock.sync()
    cpu = time.process_time() - cpu_start
    total = clock.seconds(start, end)
    split = dict.fromkeys(parts, 0.0)
    for part, span_start, span_end in spans:
        split[part] = split.get(part, 0.0) + clock.seconds(span_start, span_end)
    if "other" in split:
        split["other"] = max(0.0, total - sum(v for k, v in split.items() if k != "other"))
    return total, cpu, split


def measure_alternating(
    workloads: Mapping[str, Workload],
    *,
    device: torch.device | str,
    batch_size: int,
    warmup: int,
    iterations: int,
    parts: Sequence[str] = INFERENCE_PARTS,
    desc: str | None = None,
) -> dict[str, Timing]:
    """Time each workload ``iterations`` times after ``warmup`` untimed calls, round robin.

    Returns name -> `Timing` with per-call totals and the split into ``parts`` (parts a
    workload does not report stay 0; "other" is the remainder of each call).
    """
    if warmup < 0 or iterations < 1:
        raise ProfilingError(
            f"need warmup >= 0 and iterations >= 1, got warmup={warmup}, iterations={iterations}"
        )
    clock = make_clock(device)
    results = {name: Timing(batch_size=batch_size) for name in workloads}
    rounds = tqdm(range(warmup + iterations), desc=desc or "profiling", leave=False, disable=desc is None)
    for i in rounds:
        for name, workload in workloads.items():
            total, cpu, split = _one_call(workload, clock, parts)
            if i < warmup:
                continue
            results[name].seconds.append(total)
            results[name].cpu_seconds.append(cpu)
            for part, seconds in split.items():
                results[name].parts.setdefault(part, []).append(seconds)
    return results


# --------------------------------------------------------------------------- memory


_LIBC: Any = None


def _release_free_heap(collect: bool) -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), so RSS is live memory;
    with ``collect``, first free Python's unreachable cycles (which may hold tensors)."""
    global _LIBC
    if collect:
        gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ProfilingError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared storages counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_call_bytes(workload: Workload, device: torch.device | str, *, repeats: int = 3) -> int:
    """Memory one call takes beyond what was allocated before it (its working set), in bytes:
    the median over ``repeats`` calls.

    CPU: the rise of the process's peak RSS (``VmHWM`` after writing 5 to
    /proc/self/clear_refs) over its RSS just before, with the C heap trimmed first so memory
    freed by earlier calls is not reused unseen (the median evens out what the allocator's
    per-thread arenas still do). CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats`` minus ``memory_allocated`` before. Add `model_bytes` for what
    running the model needs in all. Returns -1 where the peak cannot be read.
    """
    device = torch.device(device)
    clock = make_clock(device)
    samples = []
    for i in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            workload(clock)
            torch.cuda.synchronize(device)
            samples.append(int(torch.cuda.max_memory_allocated(device) - before))
            continue
        _release_free_heap(collect=i == 0)
        try:
            before = _status_kib("VmRSS")
        except (OSError, ProfilingError):
            return -1
        if not _reset_peak_rss():
            return -1
        workload(clock)
        samples.append(max(0, _status_kib("VmHWM") - before) * 1024)
    return int(statistics.median(samples))


# --------------------------------------------------------------------------- inputs


def synthetic_images(
    batch_size: int, height: int, width: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """``batch_size`` seeded images [3, height, width] in 0..1: smooth noise, like photos
    in that neighbouring pixels agree (upsampled 1/16-resolution noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, max(1, height // 16), max(1, width // 16), generator=generator)
    images = torch.nn.functional.interpolate(
        coarse, size=(height, width), mode="bilinear", align_corners=False
    )
    return [image.clamp(0, 1).contiguous().to(device) for image in images]


def synthetic_targets(
    images: Sequence[Tensor], num_classes: int, *, boxes_per_image: int = 4, seed: int = 0
) -> list[dict[str, Tensor]]:
    """Seeded ground truth for ``images``: boxes [N, 4] xyxy in pixels (1/8 to 1/2 of the
    image side), labels [N] int64 in 1..num_classes, on the images' device."""
    generator = torch.Generator().manual_seed(seed + 1)
    targets = []
    for image in images:
        height, width = image.shape[-2:]
        size = torch.rand(boxes_per_image, 2, generator=generator) * 0.375 + 0.125  # (N, 2) w, h fractions
        corner = torch.rand(boxes_per_image, 2, generator=generator) * (1 - size)  # (N, 2) x1, y1 fractions
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([corner * scale, (corner + size) * scale], dim=1)  # (N, 4)
        labels = torch.randint(1, num_classes + 1, (boxes_per_image,), generator=generator)
        targets.append({"boxes": boxes.to(image.device), "labels": labels.to(image.device)})
    return targets


def compare_detections(
    ours: Sequence[dict[str, Tensor]],
    theirs: Sequence[dict[str, Tensor]],
    *,
    box_tol: float = 0.05,
    score_tol: float = 1e-3,
) -> dict[str, float]:
    """How far two detectors' outputs on the same images are apart, order-insensitively.

    Each of our detections is matched (greedily, closest box first) to an unused one of
    theirs with the same label, boxes within ``box_tol`` pixels (largest coordinate
    difference) and scores within ``score_tol``: float rounding may reorder near-equal scores,
    and other summation orders (NHWC, folded BN) move ResNet-50 boxes by ~0.01 px at 800x1333.
    Returns ``detections`` (our total), ``unmatched`` (detections of either side without a
    partner) and ``max_box_diff`` / ``max_score_diff`` over the matched pairs.
    """
    unmatched = 0
    box_diff = score_diff = 0.0
    for a, b in zip(ours, theirs, strict=True):
        boxes_a, boxes_b = a["boxes"].detach().float().cpu(), b["boxes"].detach().float().cpu()
        if len(boxes_a) == 0 or len(boxes_b) == 0:
            unmatched += len(boxes_a) + len(boxes_b)
            continue
        boxes = (boxes_a[:, None, :] - boxes_b[None, :, :]).abs().amax(dim=-1)  # (Da, Db)
        scores = (
            a["scores"].detach().float().cpu()[:, None] - b["scores"].detach().float().cpu()[None, :]
        ).abs()
        same = (
            (a["labels"].cpu()[:, None] == b["labels"].cpu()[None, :])
            & (boxes <= box_tol)
            & (scores <= score_tol)
        )
        cost = torch.where(same, boxes, torch.full_like(boxes, math.inf))
        used = torch.zeros(len(boxes_b), dtype=torch.bool)
        for i in range(len(boxes_a)):
            row = cost[i].masked_fill(used, math.inf)
            j = int(row.argmin())
            if math.isinf(float(row[j])):
                unmatched += 1
                continue
            used[j] = True
            box_diff = max(box_diff, float(boxes[i, j]))
            score_diff = max(score_diff, float(scores[i, j]))
        unmatched += int((~used).sum())
    return {
        "detections": float(sum(len(a["boxes"]) for a in ours)),
        "unmatched": float(unmatched),
        "max_box_diff": box_diff,
        "max_score_diff": score_diff,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown" where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_description(device: torch.device | str = "cpu") -> dict[str, str]:
    """What the figures were measured on: CPU model, threads, torch version, device name."""
    cpu = cpu_model()
    device = torch.device(device)
    info = {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
