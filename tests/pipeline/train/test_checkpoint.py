"""Training checkpoints: whole or absent, weights_only, newest two kept, latest restored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train.checkpoint import (
    HISTORY_COLUMNS,
    STATE_FILE,
    CheckpointError,
    Progress,
    history_rows,
    history_tensor,
    load_checkpoint,
    progress_dict,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from pipeline.train.sessions import LocalSession, remove_orphan_staging


def state(iteration: int) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    rows = [[i, 1.0 / i, 0.1, 0.2, 0.3, 0.4, 0.02, 0.5, 0, 3.0] for i in range(1, iteration + 1)]
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": None,
        "progress": progress_dict(
            Progress(iteration=iteration, epoch=1, batch_in_epoch=2, images_seen=4 * iteration)
        ),
        "run": {"run_name": "fpn-x", "mlflow_run_id": "abc", "data_hash": "d", "git_commit": "c"},
        "history": {"columns": list(HISTORY_COLUMNS), "rows": history_tensor(rows)},
    }


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    original = state(3)
    path = save_checkpoint(tmp_path / "ck", original)
    torch.load(path, weights_only=True)  # plain data and tensors only
    loaded = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded["model"]["weight"], original["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)
    assert Progress.from_dict(loaded["progress"]).iteration == 3
    rows = history_rows(loaded)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == 1.0
    assert [p.name for p in (tmp_path / "ck").iterdir()] == [STATE_FILE], "no temporary file left"


def test_missing_or_foreign_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no training checkpoint here"):
        load_checkpoint(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"{STATE_FILE}: not a loadable checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"format": "other"}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path)


def test_local_session_keeps_two_and_restores_the_latest(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    assert session.restore() is None
    for iteration in (2, 4, 6):
        session.report({"loss": 1.0 / iteration}, state(iteration), iteration)
    session.report({"loss": 0.1}, None, 7)  # metrics only
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint_00000004", "checkpoint_00000006"], "newest two kept, no temp folders"
    assert Progress.from_dict(session.restore()["progress"]).iteration == 6
    assert [m["loss"] for m in session.reported] == [0.5, 0.25, 1 / 6, 0.1]
    # A torn write (folder without its state file) is not a checkpoint.
    (tmp_path / "run" / "checkpoint_00000008").mkdir()
    assert Progress.from_dict(session.restore()["progress"]).iteration == 6


def test_rng_state_holds_the_generators_in_use_and_restore_continues_them(tmp_path: Path) -> None:
    saved = rng_state()
    assert set(saved) == ({"cpu", "cuda"} if torch.cuda.is_initialized() else {"cpu"})
    expected = torch.rand(5)
    torch.rand(3)  # the stream moves on
    path = save_checkpoint(tmp_path / "ck", {**state(1), "rng": saved})
    restore_rng_state(torch.load(path, weights_only=True)["rng"])  # survives weights_only
    assert torch.equal(torch.rand(5), expected)
    # The layout before CUDA states were saved: a bare CPU state.
    restore_rng_state(saved["cpu"])
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_continues_the_cuda_streams() -> None:
    torch.cuda.init()
    saved = rng_state()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    expected = torch.randperm(1000, device="cuda")
    torch.randperm(1000, device="cuda")
    restore_rng_state(saved)
    assert torch.equal(torch.randperm(1000, device="cuda"), expected)


def test_cuda_states_saved_once_initialised_and_set_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: stand in for two initialised devices.
    fake = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    set_calls: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(fake))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: set_calls.append((device, s)))
    saved = rng_state()
    assert saved["cuda"] == fake
    restore_rng_state(saved)
    assert [(d, s.tolist()) for d, s in set_calls] == [(0, fake[0].tolist()), (1, fake[1].tolist())]


def test_staging_folders_of_killed_workers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """A Ray worker killed between writing its checkpoint and Ray's copy leaves fpn-ckpt-<pid>-*."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)  # that process has exited
    dead = tmp_path / f"fpn-ckpt-{dead_pid}-abc"
    live = tmp_path / f"fpn-ckpt-{os.getpid()}-def"
    other = tmp_path / "fpn-ckpt-unnamed"  # not ours to judge (no pid)
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "train_state.pt").write_bytes(b"x" * 10)

    assert remove_orphan_staging(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
