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
* Losses logged and checked are the mean over ranks (one small all-reduce per step), so every
  rank sees the same value and a non-finite loss stops all ranks at the same step.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.config import Params
from pipeline.io import atomic_write_json
from pipeline.tracking.run import TrackedRun, flatten
from pipeline.train.checkpoint import HISTORY_COLUMNS, Progress, history_tensor, progress_dict
from pipeline.train.schedule import build_optimizer, build_scheduler
from pipeline.train.sessions import Session

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs to train; plain and picklable (Ray sends it to every worker).

    Paths must be visible from every worker (shared storage on a multi-node cluster).
    """

    params: Params
    data_root: str  # the preprocess output (``<split>/index.json``, ``categories.json``)
    run_name: str
    data_hash: str
    git_commit: str
    tracking_uri: str | None  # None: no MLflow
    init_weights_file: str | None  # a local torchvision state dict, or None (random init)
    status_dir: str | None = None  # each rank writes rank<k>.json here (pid, iteration, checksum)
    # Extra tags of the MLflow run rank 0 opens, e.g. (("mlflow.parentRunId", <id>),) to make it a
    # child run (stage tune: each trial is a child of the sweep's run).
    run_tags: tuple[tuple[str, str], ...] = ()


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


def configure_cpu(params: Params) -> None:
    """Threads and denormal flushing for CPU training (see STACK.md: ~3x slower without flushing)."""
    if params.train.threads > 0:
        torch.set_num_threads(params.train.threads)
    if params.train.flush_denormal:
        torch.set_flush_denormal(True)


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank while DDP keeps them in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def build_model(job: TrainJob, restored: dict[str, Any] | None) -> torch.nn.Module:
    """The detector, from the checkpoint when resuming, else from ``init_weights_file`` or random."""
    from fpn import build_detector, load_torchvision_weights

    torch.manual_seed(job.params.train.seed)
    model = build_detector(job.params.model)
    if restored is not None:
        model.load_state_dict(restored["model"])
    elif job.init_weights_file is not None:
        state = torch.load(job.init_weights_file, map_location="cpu", weights_only=True)
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
    """Seed the global torch RNG (flips, RPN/RoI sampling) per rank; on resume, rank 0 continues its stream.

    Every rank built the model from ``train.seed`` (identical weights); from here on each rank
    draws its own numbers. Rank 0's state is in the checkpoint, so a one-process run that is
    interrupted and resumed trains exactly like one that was not.
    """
    seed = job.params.train.seed
    if restored is not None and session.rank == 0 and restored.get("rng") is not None:
        torch.set_rng_state(restored["rng"])
    elif restored is not None:
        torch.manual_seed(seed + 1000 * session.rank + restored["progress"]["iteration"])
    else:
        torch.manual_seed(seed + 1000 * session.rank)


def _autocast(device: torch.device, amp: str) -> torch.autocast:
    """bf16/fp16 autocast on GPUs; CPUs train in float32 (``train.amp`` applies to GPUs only)."""
    enabled = device.type == "cuda" and amp != "off"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [image.to(device, non_blocking=True) for image in images]
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


def epoch_batches(dataset: Any, job: TrainJob, session: Session, epoch: int) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) for ``epoch``: aspect-ratio grouped, sharded.

    Reshuffled per epoch (``train.seed`` + epoch) and deterministic, so a resumed run replays
    the same order and skips what it already trained on. The sampler pads the batch list so
    every rank gets the same number of batches (DDP's gradient all-reduce would hang otherwise).
    """
    from pipeline.dataset import GroupedBatchSampler

    t = job.params.train
    sampler = GroupedBatchSampler(
        dataset, t.batch_size, shuffle=True, seed=t.seed, rank=session.rank, world_size=session.world_size
    )
    sampler.set_epoch(epoch)
    batches = [list(batch) for batch in sampler]
    if not batches:
        raise ValueError(f"{job.data_root}: the split {job.params.data.train_split} has no training image")
    return batches


def _write_status(job: TrainJob, session: Session, fields: dict[str, Any]) -> None:
    """``<status_dir>/rank<k>.json``: who this worker is and where it is (atomic replace)."""
    if job.status_dir is None:
        return
    record = {
        "rank": session.rank,
        "world_size": session.world_size,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "time": time.time(),
        **fields,
    }
    atomic_write_json(Path(job.status_dir) / f"rank{session.rank}.json", record)


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

    def step(self, postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(postfix, refresh=False)

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


def train_worker(job: TrainJob, session: Session) -> dict[str, Any]:
    """Train on this rank until ``train.iterations``; returns rank 0's final metrics.

    Resumes from ``session.restore()`` when a checkpoint exists (model, optimizer, scheduler,
    scaler, progress, MLflow run id). Checkpoints every ``train.checkpoint_every`` steps and
    at the end; reports metrics every ``train.log_every`` steps.
    """
    from pipeline.dataset import DetectionDataset, collate

    params, t = job.params, job.params.train
    is_main = session.rank == 0
    device = session.device
    configure_cpu(params)

    restored = session.restore()
    progress = Progress.from_dict(restored["progress"]) if restored else Progress()
    if restored is not None:
        progress.attempts += 1
    start_iteration = progress.iteration
    history: list[list[float]] = restored["history"]["rows"].tolist() if restored else []

    model = build_model(job, restored).to(device)
    model.train()
    optimizer = build_optimizer(model, t, session.world_size)
    scheduler = build_scheduler(optimizer, t)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and t.amp == "fp16")
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        if restored.get("scaler"):
            scaler.load_state_dict(restored["scaler"])
    seed_random_streams(job, session, restored)
    trainable = [p for p in model.parameters() if p.requires_grad]
    net: torch.nn.Module = model
    if session.world_size > 1:
        # Gradients are averaged over ranks in backward; parameters start equal because DDP
        # broadcasts rank 0's at construction.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    run = TrackedRun.disabled("not rank 0")
    mlflow_run_id = restored["run"].get("mlflow_run_id") if restored else None
    if is_main and job.tracking_uri:
        tags = {"run_name": job.run_name, "data_hash": job.data_hash, "git_commit": job.git_commit}
        tags.update(dict(job.run_tags))
        run = TrackedRun.open(
            job.tracking_uri, t.experiment, run_id=mlflow_run_id, run_name=job.run_name, tags=tags
        )
        run.log_params(flatten(params.to_dict()))
        mlflow_run_id = run.run_id or mlflow_run_id

    dataset = DetectionDataset(job.data_root, params.data.train_split, train=True, flip_prob=t.flip_prob)
    global_batch = t.batch_size * session.world_size
    _write_status(job, session, {"iteration": progress.iteration, "start_iteration": start_iteration})
    printer = _Printer(is_main, t.iterations, progress.iteration)
    if is_main:
        how = f"resuming at iteration {start_iteration}" if restored else "starting"
        printer.line(
            f"[train] {job.run_name}: {how}, {t.iterations} iterations, {session.world_size} worker(s) x "
            f"{t.batch_size} images on {device}, {len(dataset)} training images, "
            f"lr {optimizer.param_groups[0]['initial_lr']:.4g}, torch threads {torch.get_num_threads()}"
        )

    def state_for_checkpoint() -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "progress": progress_dict(progress),
            "run": {
                "run_name": job.run_name,
                "mlflow_run_id": mlflow_run_id,
                "data_hash": job.data_hash,
                "git_commit": job.git_commit,
            },
            "history": {"columns": list(HISTORY_COLUMNS), "rows": history_tensor(history)},
            "rng": torch.get_rng_state(),  # rank 0's; see seed_random_streams
        }

    pending_mlflow: list[tuple[int, dict[str, float]]] = []
    window_seconds, window_images = 0.0, 0  # training time and images since the last log line
    epoch_start_iteration, epoch_start_time = progress.iteration, time.perf_counter()
    last_checkpoint = -1  # iteration of the last checkpoint this attempt reported
    try:
        while progress.iteration < t.iterations:
            batches = epoch_batches(dataset, job, session, progress.epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=batches[progress.batch_in_epoch :],
                collate_fn=collate,
                num_workers=t.loader_workers,
                pin_memory=device.type == "cuda",
                # Its own generator: creating the iterator then draws no number from the global
                # stream, so a run resumed mid-epoch replays the same random numbers.
                generator=torch.Generator().manual_seed(t.seed + progress.epoch),
            )
            batch_iter: Iterator = iter(loader)
            step_start = time.perf_counter()
            for images, targets in batch_iter:
                iteration = progress.iteration + 1
                images, targets = _to_device(images, targets, device)
                lr = optimizer.param_groups[0]["lr"]
                with _autocast(device, t.amp):
                    loss_dict = net(images, targets)
                loss = sum(loss_dict[name] for name in LOSS_NAMES)
                terms = _mean_over_ranks(
                    torch.stack([loss_dict[name].detach().float() for name in LOSS_NAMES]), session.world_size
                )
                values = dict(zip(LOSS_NAMES, terms.tolist(), strict=True))
                total = float(sum(values.values()))
                if not math.isfinite(total):
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                    raise NonFiniteLossError(
                        f"non-finite loss at iteration {iteration} (epoch {progress.epoch}): loss={total} "
                        f"({shown}), lr={lr:.4g}; lower train.lr or raise train.warmup_iters"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # true gradients for the norm (a no-op without fp16)
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip_norm or math.inf, foreach=True)
                )
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                now = time.perf_counter()
                step_time = now - step_start
                progress.iteration = iteration
                progress.batch_in_epoch += 1
                progress.images_seen += global_batch
                progress.train_seconds += step_time
                window_images += global_batch
                window_seconds += step_time
                row = [iteration, total, *values.values(), lr, step_time, progress.epoch, grad_norm]
                history.append(row)
                if is_main:
                    pending_mlflow.append(
                        (iteration, {"loss": total, **values, "lr": lr, "grad_norm": grad_norm})
                    )
                printer.step(f"loss {total:.3f} lr {lr:.3g}")

                finished = iteration >= t.iterations
                if iteration % t.log_every == 0 or finished:
                    images_per_s = window_images / window_seconds if window_seconds > 0 else 0.0
                    window_seconds, window_images = 0.0, 0
                    recent = history[-t.log_every :]
                    mean_loss = sum(r[1] for r in recent) / len(recent)
                    eta = (t.iterations - iteration) * global_batch / images_per_s if images_per_s else 0.0
                    printer.line(
                        f"[train] iter {iteration}/{t.iterations} epoch {progress.epoch} "
                        f"loss {mean_loss:.4f} ("
                        + " ".join(f"{k[5:]} {v:.3f}" for k, v in values.items())
                        + f") lr {lr:.4g} {images_per_s:.2f} img/s eta {_format_duration(eta)}"
                    )
                    if is_main:
                        pending_mlflow[-1][1]["images_per_s"] = images_per_s
                        run.log_metric_rows(pending_mlflow)
                        pending_mlflow = []
                    checksum = weights_checksum(model)
                    metrics = {
                        "iteration": iteration,
                        "epoch": progress.epoch,
                        "loss": total,
                        **values,
                        "lr": lr,
                        "images_per_s": images_per_s,
                        "weights_checksum": checksum,
                        "start_iteration": start_iteration,
                        "attempts": progress.attempts,
                    }
                    _write_status(
                        job,
                        session,
                        {
                            "iteration": iteration,
                            "start_iteration": start_iteration,
                            "weights_checksum": checksum,
                        },
                    )
                    checkpoint_now = iteration % t.checkpoint_every == 0 or finished
                    if checkpoint_now:
                        last_checkpoint = iteration
                    session.report(
                        metrics, state_for_checkpoint() if checkpoint_now and is_main else None, iteration
                    )
                elif iteration % t.checkpoint_every == 0:
                    last_checkpoint = iteration
                    session.report(
                        {"iteration": iteration, "loss": total, "lr": lr},
                        state_for_checkpoint() if is_main else None,
                        iteration,
                    )
                if finished:
                    break
                # Time spent reporting and checkpointing is not training time.
                step_start = time.perf_counter()
            else:
                # The epoch ran out before the last iteration: summary line, next epoch.
                seconds = time.perf_counter() - epoch_start_time
                steps = progress.iteration - epoch_start_iteration
                recent = history[-steps:] if steps else []
                if recent:
                    printer.line(
                        f"[train] epoch {progress.epoch} done: {steps} iterations in {seconds:.0f} s, "
                        f"mean loss {sum(r[1] for r in recent) / len(recent):.4f}, "
                        f"{steps * global_batch / seconds:.2f} img/s"
                    )
                progress.epoch += 1
                progress.batch_in_epoch = 0
                epoch_start_iteration, epoch_start_time = progress.iteration, time.perf_counter()
        if last_checkpoint != progress.iteration:
            # Resumed a run that was already complete: report its state again so this attempt
            # (a new fit() with the same run name) ends with a checkpoint too.
            session.report(
                {"iteration": progress.iteration},
                state_for_checkpoint() if is_main else None,
                progress.iteration,
            )
    except BaseException as err:
        if is_main:
            run.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
            run.finish("FAILED")
        raise
    finally:
        printer.close()
    return {"iteration": progress.iteration, "mlflow_run_id": mlflow_run_id, **progress_dict(progress)}
