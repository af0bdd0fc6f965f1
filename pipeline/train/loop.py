"""The per-worker training loop: the same plain loop under Ray Train and in one process.

Shape of torchvision's references/detection/engine.py: move the batch to the device, sum the
loss dict, stop with a clear error on a non-finite loss, step; plus what a long distributed run
needs -- resume from a checkpoint (mid-epoch included), periodic reports and checkpoints, and
MLflow logging from rank 0.

`train_worker(job, session)` runs on every rank. ``session`` (`pipeline.train.sessions`) is where it
reports to: Ray Train (``RaySession``, one per worker, process group set up by ``TorchTrainer``)
or a local folder (``LocalSession``, one process, no Ray). Conventions:

* Iterations count optimizer steps from 1; ``Progress.iteration`` is the number done.
* The global batch is ``train.batch_size * world_size`` images; the lr scales with it.
* A step reads nothing back to the host: its losses and gradient norm stay on the device
  (`PendingStep`) until the next log line, checkpoint or epoch end, where `TrainState.flush`
  moves all pending steps in one transfer (on a GPU, one sync per window, not one per step).
* Losses logged and checked are the mean over ranks (one small all-reduce per flush), so every
  rank sees the same values and a non-finite loss stops all ranks at the same point.
* A non-finite loss is caught at that flush, so at most ``train.log_every`` steps after it
  happened (the error still names the step and its loss terms). The steps in between run on
  with NaN in the weights, but nothing is saved past it: a checkpoint is written only after
  the flush that checked every step before it.
* Validation (when ``TrainJob.validation`` is set: stage tune, and stage train with
  ``train.eval_every``): at the checkpoints it is due (`ValidationSpec.due`) rank 0 scores the
  live model on a few held-out images on its own device (`pipeline.train.validation`: eval
  mode, no grad, random streams restored, so training is unchanged bit for bit) and adds
  ``val_ap50``, ``val_ap`` and ``train_loss`` (mean loss of the steps since the previous
  validation) to that report; the other ranks, and checkpoints not scored, add the same keys
  as NaN (a report is a barrier with the same keys on every rank; Ray Train's callbacks and
  Tune read rank 0's metrics). Rank 0 also logs them to its MLflow run at that iteration.

The parts, in the order a run meets them:

* `build_state` -- model, optimizer, scheduler, scaler, progress and history (`TrainState`),
  fresh or from the restored checkpoint, random streams seeded;
* `RankZero` -- rank 0's side effects (MLflow run, lines and bar for a person, checkpoint
  states); a no-op on the other ranks, so the loop itself never tests for rank 0;
* `train_epoch` -- the rest of one epoch, a `train_step` per batch, then `report_step`:
  every ``train.log_every`` steps the pending steps read (`flush_steps`), a `LogWindow` line,
  status and metrics; a `checkpoint_state` every ``train.checkpoint_every`` steps and at the last,
  with rank 0's validation scores (`RankZero.validate`) when the job validates;
* `train_loop` -- epochs until ``train.iterations`` (`end_epoch` between them).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fpn import build_detector, load_torchvision_weights
from pipeline.config import Params, TrainConfig
from pipeline.dataset import DetectionDataset, GroupedBatchSampler, collate, to_model_input
from pipeline.io import atomic_write_json
from pipeline.tracking.run import TrackedRun, flatten
from pipeline.train.checkpoint import (
    HISTORY_COLUMNS,
    Progress,
    history_tensor,
    progress_dict,
    restore_rng_state,
    rng_state,
)
from pipeline.train.elastic import adapt_to_world_size
from pipeline.train.init_weights import read_init_weights
from pipeline.train.schedule import build_optimizer, build_scheduler
from pipeline.train.sessions import Session
from pipeline.train.streaming import dataset_name, stream_batches
from pipeline.train.validation import (
    VALIDATION_METRICS,
    HoldoutSet,
    ValidationSpec,
    mean_loss_since,
    previous_validation,
    score_model,
)

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs to train; plain and picklable (Ray sends it to every worker).

    Paths must be visible from every worker (shared storage on a multi-node cluster).
    """

    params: Params
    data_root: str  # the preprocess output (``<split>/`` shards and index, ``categories.json``)
    run_name: str
    data_hash: str
    git_commit: str
    tracking_uri: str | None  # None: no MLflow
    init_weights_file: str | None  # a local torchvision state dict, or None (random init)
    status_dir: str | None = None  # each rank writes rank<k>.json here (pid, iteration, checksum)
    # Extra tags of the MLflow run rank 0 opens, e.g. (("mlflow.parentRunId", <id>),) to make it a
    # child run (stage tune: each trial is a child of the sweep's run).
    run_tags: tuple[tuple[str, str], ...] = ()
    # Held-out images rank 0 scores at every checkpoint (`RankZero.validate`); None: no validation.
    validation: ValidationSpec | None = None
    # On Ray: the ObjectRef of init_weights_file's bytes (`share_init_weights`), which every rank
    # reads instead of the file, so no node but the driver's needs it.
    init_weights_ref: Any = None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


@dataclass
class TrainState:
    """What one rank trains with and carries from step to step (most of it checkpointed).

    ``model`` is the bare detector (what a checkpoint holds); ``net`` is what runs forward:
    ``model`` itself, or ``DistributedDataParallel(model)`` when ``world_size > 1``.
    ``history`` has one row per step up to the last `flush`, columns `HISTORY_COLUMNS`;
    ``pending`` holds the steps since, their numbers still on the device.
    """

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]  # what the gradient norm is taken (and clipped) over
    device: torch.device
    amp: str  # the autocast mode in effect: off | fp16 | bf16 (`resolve_amp`)
    progress: Progress
    history: list[list[float]]
    start_iteration: int  # ``progress.iteration`` when this attempt started
    mlflow_run_id: str | None  # rank 0's MLflow run; the restored one until rank 0 opens it
    last_checkpoint: int = -1  # iteration of the last checkpoint this attempt reported (not saved)
    pending: list[tuple[PendingStep, float]] = field(default_factory=list)  # (step, step_time)

    def record(self, step: PendingStep, step_time: float, global_batch: int) -> None:
        """Count ``step`` (it took ``step_time`` seconds, ``global_batch`` images over all ranks).

        Host-side counters only; its history row is added by the `flush` that reads its numbers.
        """
        progress = self.progress
        progress.iteration = step.iteration
        progress.batch_in_epoch += 1
        progress.images_seen += global_batch
        progress.train_seconds += step_time
        self.pending.append((step, step_time))

    def flush(self, world_size: int) -> list[StepResult]:
        """The pending steps, read to the host in one transfer, checked, and added to ``history``.

        Every rank must call it at the same steps: the losses are averaged over ranks in one
        all-reduce ``[n, len(LOSS_NAMES)]`` for the ``n`` pending steps. Raises
        `NonFiniteLossError` for the first step whose loss is not finite (no row added from it on).
        """
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        terms = torch.stack([step.terms for step, _ in pending])  # [n, len(LOSS_NAMES)]
        terms = _mean_over_ranks(terms, world_size)
        norms = torch.stack([step.grad_norm for step, _ in pending]).to(terms.dtype)  # [n]
        rows = torch.cat([terms, norms[:, None]], dim=1).tolist()  # the one host transfer
        results = []
        for (step, step_time), row in zip(pending, rows, strict=True):
            values = dict(zip(LOSS_NAMES, row[:-1], strict=True))
            result = StepResult(step.iteration, float(sum(values.values())), values, step.lr, row[-1])
            if not math.isfinite(result.loss):
                raise _non_finite_error(result, step.epoch, self.progress.iteration)
            cells = (result.loss, *values.values(), step.lr, step_time, step.epoch, result.grad_norm)
            self.history.append([step.iteration, *cells])  # the columns of HISTORY_COLUMNS
            results.append(result)
        return results


@dataclass(frozen=True)
class PendingStep:
    """One optimizer step as `train_step` leaves it: numbers on the device, read later by `TrainState.flush`."""

    iteration: int  # the step's number, counted from 1
    epoch: int  # the epoch it trained in
    lr: float  # the lr the step used
    terms: torch.Tensor  # float32 [len(LOSS_NAMES)] on the device: this rank's loss terms
    grad_norm: torch.Tensor  # float32 [] on the device: global L2 norm of the gradients, before clipping


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: losses are means over ranks (equal on every rank), floats on the host."""

    iteration: int  # the step's number, counted from 1
    loss: float  # sum of ``terms``
    terms: dict[str, float]  # `LOSS_NAMES` -> value, in that order
    lr: float  # the lr the step used
    grad_norm: float  # global L2 norm of the gradients, before clipping

    def mlflow_row(self) -> tuple[int, dict[str, float]]:
        """``(step, metrics)`` as MLflow gets them (`LogWindow` adds ``images_per_s`` to a window's last)."""
        return self.iteration, {"loss": self.loss, **self.terms, "lr": self.lr, "grad_norm": self.grad_norm}


def _non_finite_error(step: StepResult, epoch: int, found_at: int) -> NonFiniteLossError:
    """The error for ``step`` (of ``epoch``), whose loss is not finite, read at iteration ``found_at``."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in step.terms.items())
    return NonFiniteLossError(
        f"non-finite loss at iteration {step.iteration} (epoch {epoch}): loss={step.loss} ({shown}), "
        f"lr={step.lr:.4g}; lower train.lr or raise train.warmup_iters (found at iteration "
        f"{found_at}: losses are read every train.log_every steps; no checkpoint was saved past it)"
    )


def configure_cpu(params: Params) -> None:
    """Threads and denormal flushing for CPU training (a from-scratch detector runs ~3x slower on CPU without flushing)."""
    if params.train.threads > 0:
        torch.set_num_threads(params.train.threads)
    if params.train.flush_denormal:
        torch.set_flush_denormal(True)


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank while DDP keeps them in sync.

    One host transfer (a single device sync) for all parameters: the per-parameter sums are
    stacked on the device, then added on the host in parameter order, as they always were.
    """
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])  # [P] float64
        return float(sum(sums.tolist()))


def build_model(job: TrainJob, restored: dict[str, Any] | None) -> torch.nn.Module:
    """The detector, from the checkpoint when resuming, else from ``init_weights_file`` or random."""
    torch.manual_seed(job.params.train.seed)
    model = build_detector(job.params.model)
    if restored is not None:
        model.load_state_dict(restored["model"])
    elif job.init_weights_file is not None:
        state = read_init_weights(job.init_weights_file, job.init_weights_ref)
        # Not strict: fine-tuning keeps what fits (e.g. COCO's 91-way predictor does not fit 3
        # classes, BatchNorm statistics do not fit GroupNorm) and says what it left out.
        report = load_torchvision_weights(model, state, strict=False)
        if not report.loaded:
            raise ValueError(f"train.init_weights: nothing in {job.init_weights_file} fits the model")
        log.info(
            "init weights %s: %d tensors loaded, %d unused, %d left at their initial values%s",
            job.init_weights_file,
            len(report.loaded),
            len(report.unused),
            len(report.missing),
            f" (e.g. {report.unused[:3]} / {report.missing[:3]})" if report.unused or report.missing else "",
        )
    return model


def seed_random_streams(job: TrainJob, session: Session, restored: dict[str, Any] | None) -> None:
    """Seed torch's generators (flips, RPN/RoI sampling) per rank; on resume, rank 0 continues its streams.

    Every rank built the model from ``train.seed`` (identical weights); from here on each rank
    draws its own numbers (``torch.manual_seed`` seeds the CPU and every CUDA generator). Rank 0's
    states (CPU, and CUDA per device: `pipeline.train.checkpoint.rng_state`) are in the
    checkpoint, so a one-process run that is interrupted and resumed trains exactly like one
    that was not, on a GPU too.
    """
    seed = job.params.train.seed
    if restored is not None and session.rank == 0 and restored.get("rng") is not None:
        restore_rng_state(restored["rng"])
    elif restored is not None:
        torch.manual_seed(seed + 1000 * session.rank + restored["progress"]["iteration"])
    else:
        torch.manual_seed(seed + 1000 * session.rank)


def build_state(job: TrainJob, session: Session, restored: dict[str, Any] | None) -> TrainState:
    """This rank's `TrainState`: fresh, or continued from ``restored`` (a checkpoint's state).

    Order matters for exact resume: the model is built from ``train.seed`` before
    `seed_random_streams` gives each rank its own stream.
    """
    t, device = job.params.train, session.device
    progress = Progress.from_dict(restored["progress"]) if restored else Progress()
    if restored is not None:
        progress.attempts += 1
    model = build_model(job, restored).to(device)
    model.train()
    optimizer = build_optimizer(model, t, session.world_size)
    scheduler = build_scheduler(optimizer, t)
    amp = resolve_amp(t.amp, device.type, _bf16_supported(device), t.cpu_amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        if restored.get("scaler"):
            scaler.load_state_dict(restored["scaler"])
    adapt_to_world_size(progress, optimizer, scheduler, t, session.world_size)
    seed_random_streams(job, session, restored)
    net: torch.nn.Module = model
    if session.world_size > 1:
        # Gradients are averaged over ranks in backward; parameters start equal because DDP
        # broadcasts rank 0's at construction.
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            **_ddp_buffer_sync(job.params.model.norm == "bn"),
        )
    return TrainState(
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        trainable=[p for p in model.parameters() if p.requires_grad],
        device=device,
        amp=amp,
        progress=progress,
        history=restored["history"]["rows"].tolist() if restored else [],
        start_iteration=progress.iteration,
        mlflow_run_id=restored["run"].get("mlflow_run_id") if restored else None,
    )


def _ddp_buffer_sync(sync: bool) -> dict[str, bool]:
    """DDP's keyword for re-sending rank 0's buffers before every forward: on for trainable BN only.

    Only trainable BatchNorm's running statistics change in training (and drift apart per rank);
    frozen BN's statistics and the input mean/std are constant and GroupNorm has none, so
    re-sending them every step is pure traffic. torch 2.14 names the switch
    ``forward_sync_buffers`` (buffers still broadcast once at construction) and deprecates
    ``broadcast_buffers``, whose False also skips that first broadcast: harmless here, every
    rank builds the same buffers from ``train.seed`` and the same weights.
    """
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": sync}
    return {"broadcast_buffers": sync}


def checkpoint_state(job: TrainJob, state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds (layout: `pipeline.train.checkpoint`), tensors on the CPU.

    Only after `TrainState.flush`: the history must hold every step (and be checked) first.
    """
    if state.pending:
        raise RuntimeError(f"checkpoint_state with {len(state.pending)} step(s) not flushed")
    return {
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "progress": progress_dict(state.progress),
        "run": {
            "run_name": job.run_name,
            "mlflow_run_id": state.mlflow_run_id,
            "data_hash": job.data_hash,
            "git_commit": job.git_commit,
        },
        "history": {"columns": list(HISTORY_COLUMNS), "rows": history_tensor(state.history)},
        "rng": rng_state(),  # rank 0's generators; see seed_random_streams
    }


def resolve_amp(amp: str, device_type: str, bf16_supported: bool, cpu_amp: str = "off") -> str:
    """The autocast mode to train with: off | fp16 | bf16.

    On CUDA, ``amp`` (``train.amp``), with ``"fp16"`` (and a GradScaler) instead of ``"bf16"`` on a
    GPU without native bfloat16 (``bf16_supported`` false), saying so. On CPUs, ``cpu_amp``
    (``train.cpu_amp``): ``"bf16"``, ``"off"``, or ``"auto"``: ``"bf16"`` where ``bf16_supported``
    (the CPU computes bfloat16 natively), else ``"off"`` (float32).
    """
    if device_type != "cuda":
        if cpu_amp == "auto":
            return "bf16" if bf16_supported else "off"
        return cpu_amp
    if amp == "bf16" and not bf16_supported:
        log.warning(
            "train.amp: bf16, but this GPU has no native bfloat16: training in fp16 with a GradScaler instead"
        )
        return "fp16"
    return amp


def _bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: CUDA compute capability 8.0+ (or ROCm);
    a CPU with AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, slower than float32)."""
    if device.type == "cpu":
        cpu = torch.cpu
        return any(
            getattr(cpu, probe, lambda: False)()
            for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    if device.type != "cuda":
        return False
    # Not the default including_emulation=True: pre-Ampere GPUs (V100, T4) accept bf16 tensors,
    # so that answers True there, and their bf16 matmuls run emulated, far slower than fp16.
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _autocast(device: torch.device, amp: str) -> torch.autocast:
    """bf16/fp16 autocast on ``device`` for ``amp`` as `resolve_amp` gives it (``"off"``: float32)."""
    enabled = amp != "off"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [to_model_input(image, device) for image in images]  # uint8 crosses, float 0..1 there
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def _mean_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size
    return values


def grad_norm_(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` before clipping (0-dim, on their device).

    Clips them to ``max_norm`` when it is set. Without clipping only the norm is computed (not
    ``clip_grad_norm_(..., inf)``'s pass multiplying every gradient by 1); either way nothing
    is read back to the host.
    """
    if max_norm or not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6 lacks it
        return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def train_step(
    state: TrainState, images: list[torch.Tensor], targets: list[dict[str, Any]], t: TrainConfig
) -> PendingStep:
    """One optimizer step on this rank's batch; ``state.progress`` is left to the caller.

    ``images``: uint8 ``[3, H, W]`` (or float in [0, 1]), sizes may differ; ``targets``: ``boxes`` float
    ``[N, 4]`` xyxy in pixels, ``labels`` int64 ``[N]`` (`pipeline.dataset.collate`'s batch).
    Reads nothing back to the host (fp16's GradScaler aside, which reads its inf check): the
    losses are checked when `TrainState.flush` reads them (see the module docstring).
    """
    iteration = state.progress.iteration + 1
    images, targets = _to_device(images, targets, state.device)
    lr = state.optimizer.param_groups[0]["lr"]
    with _autocast(state.device, state.amp):
        loss_dict = state.net(images, targets)
    loss = sum(loss_dict[name] for name in LOSS_NAMES)
    terms = torch.stack([loss_dict[name].detach().float() for name in LOSS_NAMES])
    optimizer, scaler = state.optimizer, state.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # true gradients for the norm (a no-op without fp16)
    grad_norm = grad_norm_(state.trainable, t.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    state.scheduler.step()
    return PendingStep(iteration, state.progress.epoch, lr, terms, grad_norm)


def epoch_batches(dataset: Any, job: TrainJob, session: Session, epoch: int) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) for ``epoch``: aspect-ratio grouped, sharded.

    Reshuffled per epoch (``train.seed`` + epoch) and deterministic, so a resumed run replays
    the same order and skips what it already trained on. The sampler pads the batch list so
    every rank gets the same number of batches (DDP's gradient all-reduce would hang otherwise).
    """
    t = job.params.train
    sampler = GroupedBatchSampler(
        dataset, t.batch_size, shuffle=True, seed=t.seed, rank=session.rank, world_size=session.world_size
    )
    batches = sampler.batches_of(epoch)
    if not batches:
        raise ValueError(f"{job.data_root}: the split {job.params.data.train_split} has no training image")
    return batches


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the DataLoader's generator on ``rank`` for ``epoch``; DataLoader workers seed from it.

    The flips do not depend on it (`pipeline.dataset.DetectionDataset.flips` seeds each image's
    draw itself); it keeps any other draw in a worker distinct per epoch and rank. The rank term
    is a prime far above any epoch count (no two (epoch, rank) pairs collide).
    """
    return seed + epoch + 1_000_003 * rank


def epoch_loader(
    dataset: Dataset, batches: list[list[int]], t: TrainConfig, device: torch.device, epoch: int, rank: int
) -> DataLoader:
    """A DataLoader over ``batches`` (lists of dataset indices, in order) of ``epoch`` on ``rank``."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=t.loader_workers,
        pin_memory=device.type == "cuda",
        # Its own generator: creating the iterator then draws no number from the global
        # stream, so a run resumed mid-epoch replays the same random numbers.
        generator=torch.Generator().manual_seed(loader_seed(t.seed, epoch, rank)),
    )


def epoch_source(
    job: TrainJob, session: Session, state: TrainState, dataset: DetectionDataset
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """The ``(images, targets)`` batches of the rest of epoch ``progress.epoch`` on this rank.

    ``train.loader: ray_data`` under Ray Train: this rank's Ray Dataset of the epoch
    (`pipeline.train.streaming`); otherwise (and without Ray) a DataLoader over the same shards.
    Both give the same batches in the same order, flipped alike, from ``batch_in_epoch`` on.
    """
    t, progress = job.params.train, state.progress
    if t.loader == "ray_data":
        rows = session.rows(dataset_name(session.rank, progress.epoch))
        if rows is not None:
            return stream_batches(rows, progress.batch_in_epoch)
    batches = epoch_batches(dataset, job, session, progress.epoch)[progress.batch_in_epoch :]
    dataset.set_epoch(progress.epoch)  # the epoch's flips (`DetectionDataset.flips`)
    return iter(epoch_loader(dataset, batches, t, state.device, progress.epoch, session.rank))


def _write_status(job: TrainJob, session: Session, fields: dict[str, Any]) -> None:
    """``<status_dir>/rank<k>.json``: who this worker is and where it is (atomic replace; every rank)."""
    if job.status_dir is None:
        return
    record = {
        "rank": session.rank,
        "world_size": session.world_size,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "node_ip": _ray_node_ip(),
        "time": time.time(),
        **fields,
    }
    atomic_write_json(Path(job.status_dir) / f"rank{session.rank}.json", record)


def _ray_node_ip() -> str | None:
    """The address of the Ray node this process runs on (None outside Ray): tells nodes apart where
    hostnames do not."""
    if "ray" not in sys.modules:
        return None
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else None


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class _Printer:
    """Progress for a person: a tqdm bar on a terminal, plain periodic lines in logs (rank 0 only)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            # Through logging, not print: Ray Train patches print in its workers and, once
            # another library has wrapped stdout (MLflow does), prints every line twice.
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RankZero:
    """Rank 0's side effects: its MLflow run, lines and a bar for a person, checkpoint states.

    Every method is a no-op on the other ranks (`checkpoint` gives None there: only rank 0 hands
    a checkpoint to the session; `validate` gives NaN scores without scoring), so this is the
    one place with a side effect that tests for rank 0 (`seed_random_streams` tests it too, to
    continue rank 0's saved random stream).
    Status files are not here: every rank writes its own (`_write_status`).
    """

    def __init__(self, session: Session) -> None:
        self.enabled = session.rank == 0
        self.run = TrackedRun.disabled("not rank 0")
        self.printer = _Printer(False, 0, 0)  # silent until `start`
        self.holdout: HoldoutSet | None = None  # `load_validation`'s

    def load_validation(self, job: TrainJob) -> None:
        """Decode ``job.validation``'s held-out images once (rank 0; nothing without validation)."""
        if self.enabled and job.validation is not None:
            self.holdout = HoldoutSet.from_spec(job.validation)

    def open_run(self, job: TrainJob, run_id: str | None) -> str | None:
        """Open rank 0's MLflow run (continue ``run_id`` if set); its id, else ``run_id`` unchanged."""
        if not (self.enabled and job.tracking_uri):
            return run_id
        tags = {"run_name": job.run_name, "data_hash": job.data_hash, "git_commit": job.git_commit}
        tags.update(dict(job.run_tags))
        t = job.params.train
        self.run = TrackedRun.open(
            job.tracking_uri, t.experiment, run_id=run_id, run_name=job.run_name, tags=tags
        )
        self.run.log_params(flatten(job.params.to_dict()))
        self.run.start_system_metrics(t.system_metrics_s)
        return self.run.run_id or run_id

    def start(self, job: TrainJob, session: Session, state: TrainState, images: int, resumed: bool) -> None:
        """The bar, and the first line: what is trained, where, on ``images`` training images."""
        t = job.params.train
        self.printer = _Printer(self.enabled, t.iterations, state.progress.iteration)
        if not self.enabled:
            return
        how = f"resuming at iteration {state.start_iteration}" if resumed else "starting"
        self.printer.line(
            f"[train] {job.run_name}: {how}, {t.iterations} iterations, {session.world_size} worker(s) x "
            f"{t.batch_size} images on {state.device}, {images} training images, "
            f"lr {state.optimizer.param_groups[0]['initial_lr']:.4g}, torch threads {torch.get_num_threads()}, "
            f"{'float32' if state.amp == 'off' else state.amp + ' autocast'}"
        )

    def line(self, text: str) -> None:
        self.printer.line(text)

    def step(self) -> None:
        """One more step on the bar (its numbers are shown by `show` once read)."""
        self.printer.step()

    def show(self, step: StepResult) -> None:
        self.printer.postfix(f"loss {step.loss:.3f} lr {step.lr:.3g}")

    def log_metric_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if self.enabled:
            self.run.log_metric_rows(rows)

    def checkpoint(self, job: TrainJob, state: TrainState) -> dict[str, Any] | None:
        """`checkpoint_state` on rank 0, None on the others."""
        return checkpoint_state(job, state) if self.enabled else None

    def validate(self, job: TrainJob, state: TrainState) -> dict[str, float]:
        """`VALIDATION_METRICS` at the current (checkpointed) iteration; ``{}`` when the job does not validate.

        At a checkpoint the job scores (`ValidationSpec.due`), rank 0 scores ``state.model`` on its
        device (`score_model`), takes ``train_loss`` from the history (steps since the previous
        validation), logs the three to MLflow at this iteration and prints a line. The other
        ranks, and every rank at a checkpoint not scored, give the same keys as NaN (Ray Train
        ranks NaN below any score when it keeps the best checkpoints). Only after
        `TrainState.flush` (the history holds every step).
        """
        if job.validation is None:
            return {}
        iteration = state.progress.iteration
        if not (self.enabled and job.validation.due(iteration, job.params.train.iterations)):
            return dict.fromkeys(VALIDATION_METRICS, math.nan)
        if self.holdout is None:
            self.load_validation(job)
        started = time.perf_counter()
        scores = score_model(self.holdout, state.model, state.device)
        since = previous_validation(iteration, job.validation.every)
        scores["train_loss"] = mean_loss_since(state.history, since)
        self.printer.line(
            f"[train] validation iter {iteration}: "
            + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
            + f" ({len(self.holdout)} images of {job.validation.split} on {state.device}, "
            f"{time.perf_counter() - started:.1f} s)"
        )
        self.run.log_metrics(scores, step=iteration)
        return scores

    def fail(self, err: BaseException) -> None:
        """Mark the MLflow run FAILED, naming ``err``."""
        if self.enabled:
            self.run.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
            self.run.finish("FAILED")

    def close(self) -> None:
        """End of this attempt on this rank: the bar closed, the system metrics stopped (the driver finishes the run)."""
        self.printer.close()
        self.run.stop_system_metrics()


class LogWindow:
    """The steps since the last ``[train] iter`` line: their training time, images and MLflow rows."""

    def __init__(self, t: TrainConfig, global_batch: int) -> None:
        self.t = t
        self.global_batch = global_batch  # images per step over all ranks
        self.seconds = 0.0  # training time in the window (reporting and checkpointing left out)
        self.images = 0
        self.rows: list[tuple[int, dict[str, float]]] = []  # (step, metrics) for MLflow

    def add(self, step_time: float) -> None:
        """Count one step's time and images (its MLflow row comes with `collect`, once read)."""
        self.images += self.global_batch
        self.seconds += step_time

    def collect(self, steps: list[StepResult]) -> None:
        self.rows.extend(step.mlflow_row() for step in steps)

    def due(self, iteration: int) -> bool:
        """True every ``train.log_every`` steps and at the last."""
        return iteration % self.t.log_every == 0 or iteration >= self.t.iterations

    def emit(self, step: StepResult, state: TrainState, rank0: RankZero) -> float:
        """Print the window's line, log its MLflow rows (rank 0), start a new one; returns images/s."""
        t, iteration = self.t, step.iteration
        images_per_s = self.images / self.seconds if self.seconds > 0 else 0.0
        self.seconds, self.images = 0.0, 0
        recent = state.history[-t.log_every :]
        mean_loss = sum(r[1] for r in recent) / len(recent)
        eta = (t.iterations - iteration) * self.global_batch / images_per_s if images_per_s else 0.0
        rank0.line(
            f"[train] iter {iteration}/{t.iterations} epoch {state.progress.epoch} "
            f"loss {mean_loss:.4f} ("
            + " ".join(f"{k[5:]} {v:.3f}" for k, v in step.terms.items())
            + f") lr {step.lr:.4g} {images_per_s:.2f} img/s eta {_format_duration(eta)}"
        )
        self.rows[-1][1]["images_per_s"] = images_per_s
        rank0.log_metric_rows(self.rows)
        self.rows = []
        return images_per_s


def flush_steps(state: TrainState, window: LogWindow, rank0: RankZero, world_size: int) -> list[StepResult]:
    """`TrainState.flush` (every rank, at the same steps), the steps' MLflow rows and the bar's numbers."""
    steps = state.flush(world_size)
    if steps:
        window.collect(steps)
        rank0.show(steps[-1])
    return steps


def report_step(
    job: TrainJob, session: Session, state: TrainState, rank0: RankZero, window: LogWindow
) -> None:
    """What follows the step just recorded: its numbers read, metrics, status and a checkpoint when due.

    Every ``train.log_every`` steps (and at the last): the pending steps are read and checked
    (`flush_steps`), then the window's line, this rank's status file and the full metrics. Every
    ``train.checkpoint_every`` steps (and at the last): the same read, the validation scores
    when the job validates (`RankZero.validate`), then a checkpoint, handed over by rank 0.
    Other steps return at once, their numbers left on the device.
    ``session.report`` is a barrier under Ray Train: every rank reports at the same steps, with
    the same metrics keys.
    """
    t, iteration = job.params.train, state.progress.iteration
    checkpoint_now = iteration % t.checkpoint_every == 0 or iteration >= t.iterations
    log_now = window.due(iteration)
    if not (log_now or checkpoint_now):
        return
    step = flush_steps(state, window, rank0, session.world_size)[-1]  # this step was pending
    if log_now:
        images_per_s = window.emit(step, state, rank0)
        checksum = weights_checksum(state.model)
        metrics: dict[str, Any] = {
            "iteration": iteration,
            "epoch": state.progress.epoch,
            "loss": step.loss,
            **step.terms,
            "lr": step.lr,
            "images_per_s": images_per_s,
            "weights_checksum": checksum,
            "start_iteration": state.start_iteration,
            "attempts": state.progress.attempts,
        }
        status = {
            "iteration": iteration,
            "start_iteration": state.start_iteration,
            "weights_checksum": checksum,
        }
        _write_status(job, session, status)
    else:
        metrics = {"iteration": iteration, "loss": step.loss, "lr": step.lr}
    if checkpoint_now:
        state.last_checkpoint = iteration
        metrics.update(rank0.validate(job, state))
    session.report(metrics, rank0.checkpoint(job, state) if checkpoint_now else None, iteration)


def train_epoch(
    job: TrainJob,
    session: Session,
    state: TrainState,
    dataset: DetectionDataset,
    rank0: RankZero,
    window: LogWindow,
) -> None:
    """Train on the rest of epoch ``progress.epoch``, stopping early at ``train.iterations``.

    Starts at batch ``batch_in_epoch`` of `epoch_batches` (the same list on every attempt), so
    a resumed epoch skips the batches it already trained on.
    """
    t = job.params.train
    batch_iter = epoch_source(job, session, state, dataset)
    step_start = time.perf_counter()
    for images, targets in batch_iter:
        step = train_step(state, images, targets, t)
        step_time = time.perf_counter() - step_start
        state.record(step, step_time, window.global_batch)
        window.add(step_time)
        rank0.step()
        report_step(job, session, state, rank0, window)
        if step.iteration >= t.iterations:
            return
        # Time spent reporting and checkpointing is not training time.
        step_start = time.perf_counter()


def end_epoch(
    state: TrainState, rank0: RankZero, first_iteration: int, started: float, global_batch: int
) -> None:
    """The epoch ran out before the last iteration: its summary line; the next epoch, from its start.

    ``first_iteration`` and ``started`` (``time.perf_counter()``) are where this attempt began it.
    """
    progress = state.progress
    seconds = time.perf_counter() - started
    steps = progress.iteration - first_iteration
    recent = state.history[-steps:] if steps else []
    if recent:
        rank0.line(
            f"[train] epoch {progress.epoch} done: {steps} iterations in {seconds:.0f} s, "
            f"mean loss {sum(r[1] for r in recent) / len(recent):.4f}, "
            f"{steps * global_batch / seconds:.2f} img/s"
        )
    progress.epoch += 1
    progress.batch_in_epoch = 0


def train_loop(
    job: TrainJob, session: Session, state: TrainState, dataset: DetectionDataset, rank0: RankZero
) -> None:
    """Epochs until ``train.iterations``; the last step is checkpointed by this attempt too."""
    t, progress = job.params.train, state.progress
    window = LogWindow(t, t.batch_size * session.world_size)
    while progress.iteration < t.iterations:
        first_iteration, started = progress.iteration, time.perf_counter()
        train_epoch(job, session, state, dataset, rank0, window)
        if progress.iteration < t.iterations:
            # The epoch's line needs its losses; every rank gets here at the same step (the
            # sampler gives every rank as many batches), as flush's all-reduce requires.
            flush_steps(state, window, rank0, session.world_size)
            end_epoch(state, rank0, first_iteration, started, window.global_batch)
    if state.last_checkpoint != progress.iteration:
        # Resumed a run that was already complete: report its state again so this attempt
        # (a new fit() with the same run name) ends with a checkpoint too, scored like every one.
        metrics = {"iteration": progress.iteration, **rank0.validate(job, state)}
        session.report(metrics, rank0.checkpoint(job, state), progress.iteration)


def train_worker(job: TrainJob, session: Session) -> dict[str, Any]:
    """Train on this rank until ``train.iterations``; returns rank 0's final metrics.

    Resumes from ``session.restore()`` when a checkpoint exists (model, optimizer, scheduler,
    scaler, progress, MLflow run id). Checkpoints every ``train.checkpoint_every`` steps and
    at the end (scored on ``job.validation``'s held-out images when set); reports metrics every
    ``train.log_every`` steps.
    """
    params = job.params
    configure_cpu(params)
    restored = session.restore()
    state = build_state(job, session, restored)
    rank0 = RankZero(session)
    rank0.load_validation(job)  # before the MLflow run: a bad split fails now, not at a checkpoint
    state.mlflow_run_id = rank0.open_run(job, state.mlflow_run_id)
    dataset = DetectionDataset(
        job.data_root,
        params.data.train_split,
        train=True,
        flip_prob=params.train.flip_prob,
        seed=params.train.seed,
    )
    _write_status(
        job, session, {"iteration": state.progress.iteration, "start_iteration": state.start_iteration}
    )
    rank0.start(job, session, state, len(dataset), resumed=restored is not None)
    try:
        train_loop(job, session, state, dataset, rank0)
    except BaseException as err:
        rank0.fail(err)
        raise
    finally:
        rank0.close()
    return {
        "iteration": state.progress.iteration,
        "mlflow_run_id": state.mlflow_run_id,
        **progress_dict(state.progress),
    }
