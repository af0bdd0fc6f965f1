"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder holding one file, ``train_state.pt`` (plain data and tensors, so it
loads with ``torch.load(weights_only=True)``)::

    {
        "format": "fpn-train-checkpoint/1",
        "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
        "scaler": state_dict | None,                       # GradScaler (fp16 on GPUs)
        "progress": {"iteration", "epoch", "batch_in_epoch", "images_seen", "train_seconds",
                     "attempts", "world_size"},
        "run": {"run_name", "mlflow_run_id", "data_hash", "git_commit"},
        "history": {"columns": [...], "rows": Tensor[N, C] float64},  # one row per step
        "rng": {"cpu": ByteTensor, "cuda": [ByteTensor, ...]},  # rank 0's generators (`rng_state`)
    }

``rng`` is optional (a run without it resumes on fresh streams); checkpoints written before the
CUDA states were saved hold the CPU state alone, as a bare ByteTensor (`restore_rng_state` takes both).

`save_checkpoint` writes the file under a temporary name and renames it, and callers
write the folder in a temporary place before handing it over (to Ray Train, or renamed
into place by the local session): a checkpoint is whole or absent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_torch_save

log = logging.getLogger(__name__)

FORMAT = "fpn-train-checkpoint/1"
STATE_FILE = "train_state.pt"
# One row per optimizer step; the plots CSV and the metrics JSON are cut from these.
HISTORY_COLUMNS = (
    "step",
    "loss",
    "loss_rpn_cls",
    "loss_rpn_box",
    "loss_cls",
    "loss_box",
    "lr",
    "step_time_s",
    "epoch",
    "grad_norm",  # before clipping
)


class CheckpointError(ValueError):
    """A folder that does not hold a whole training checkpoint; the message names the file."""


@dataclass
class Progress:
    """Where a run is: the next step to run is ``iteration + 1`` (steps count from 1)."""

    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # epoch being run (0-based)
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on by this rank
    images_seen: int = 0  # over all ranks
    train_seconds: float = 0.0  # time spent in training steps, over all attempts
    attempts: int = 1  # 1 + how many times the run resumed from a checkpoint
    world_size: int = 0  # workers that wrote it (0: a checkpoint from before it was recorded)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Progress:
        return cls(**values)


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (the layout in the module docstring) to ``directory/train_state.pt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    atomic_torch_save({"format": FORMAT, **state}, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint folder (``weights_only=True``: tensors and plain data only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no training checkpoint here")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint (expected format {FORMAT!r})")
    missing = {"model", "optimizer", "scheduler", "progress", "run", "history"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: training checkpoint lacks {sorted(missing)}")
    return state


def history_tensor(rows: list[list[float]]) -> torch.Tensor:
    """Per-step rows as a compact ``float64 [N, len(HISTORY_COLUMNS)]`` tensor."""
    if not rows:
        return torch.zeros((0, len(HISTORY_COLUMNS)), dtype=torch.float64)
    return torch.tensor(rows, dtype=torch.float64)


def history_rows(state: dict[str, Any]) -> list[dict[str, float]]:
    """The checkpoint's per-step history as dicts keyed by column name."""
    columns = state["history"]["columns"]
    return [dict(zip(columns, row, strict=True)) for row in state["history"]["rows"].tolist()]


def progress_dict(progress: Progress) -> dict[str, Any]:
    return asdict(progress)


def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from: ``{"cpu": ByteTensor[, "cuda": [...]]}``.

    ``cpu``: torch's default generator (flips in the main process, the RPN and RoI samplers on
    CPUs). ``cuda``: one state per visible device, present once CUDA is initialised (on GPUs the
    samplers call ``torch.randperm(..., device=cuda)``, which draws from the device's own
    generator). Python's `random` and numpy's global generator are not saved: nothing in the
    training process draws from them (fpn/, pipeline/train/, pipeline/dataset.py), and DataLoader
    workers seed their own from the loader's generator.
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Continue the streams saved by `rng_state` (or a bare CPU state, the layout before it).

    CUDA states are set per device index; when this process sees a different number of devices
    than the one that saved them, the common ones are set and a warning says the run is not exact.
    """
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    cuda_states = state.get("cuda") or []
    if not cuda_states:
        return
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices != len(cuda_states):
        log.warning(
            "checkpoint holds %d CUDA generator states, this process sees %d device(s): "
            "the resumed run does not continue the same random streams exactly",
            len(cuda_states),
            devices,
        )
    for index, device_state in enumerate(cuda_states[:devices]):
        torch.cuda.set_rng_state(device_state, index)
