"""The training loop in one process (no Ray): outputs, MLflow, exact resume, run naming, failures, validation."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from torch.nn.parallel import DistributedDataParallel

from fpn import build_detector
from pipeline.config import params_from_dict
from pipeline.dataset import DetectionDataset, read_data_hash
from pipeline.model_file import load_model_file
from pipeline.train import loop
from pipeline.train.checkpoint import history_rows
from pipeline.train.loop import (
    NonFiniteLossError,
    RankZero,
    TrainJob,
    build_state,
    checkpoint_state,
    epoch_loader,
    resolve_amp,
    seed_random_streams,
    train_worker,
    weights_checksum,
)
from pipeline.train.sessions import LocalSession
from pipeline.train.stage import TrainOutputs, run_name, train
from pipeline.train.validation import VALIDATION_METRICS, ValidationSpec
from tests.train_samples import tiny_data, tiny_params


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("train-data"))


def outputs(root: Path) -> TrainOutputs:
    return TrainOutputs(
        model=root / "models/model.pt", metrics=root / "metrics/train.json", plots=root / "plots/loss.csv"
    )


def test_local_run_writes_outputs_tracks_and_resumes_by_name(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = params_from_dict(tiny_params(experiment="t-engine"))
    out = outputs(tmp_path)
    metrics = train(params, data, out, storage_path=str(tmp_path / "runs"), use_ray=False)

    assert metrics["iterations"] == 6 and metrics["attempts"] == 1 and metrics["images_seen"] == 12
    assert metrics["images_per_s"] > 0 and metrics["loss"] > 0
    written = json.loads(out.metrics.read_text())
    assert {"loss", "loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "images_per_s", "iterations",
            "wall_time_s", "train_time_s"} <= set(written)  # fmt: skip
    lines = out.plots.read_text().splitlines()
    assert lines[0] == "step,loss,loss_rpn_cls,loss_rpn_box,loss_cls,loss_box,lr"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4, 5, 6]

    loaded = load_model_file(out.model)
    assert loaded.config == params.model
    assert [c["name"] for c in loaded.categories] == ["circle", "square", "triangle"]
    name = run_name(params, read_data_hash(data))
    assert loaded.extra == {
        "mlflow_run_id": metrics["mlflow_run_id"],
        "data_hash": read_data_hash(data),
        "git_commit": loaded.extra["git_commit"],
        "run_name": name,
    }

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert run.data.params["train.lr"] == "0.08" and run.data.params["model.fpn_channels"] == "32"
    assert run.data.tags["data_hash"] == read_data_hash(data)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert client.get_metric_history(run.info.run_id, "images_per_s")
    assert len(client.get_metric_history(run.info.run_id, "grad_norm")) == 6
    # The model file as a plain artifact; no MLflow model (stage evaluate logs the run's one pyfunc).
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model_file")] == ["model_file/model.pt"]
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id]) == []

    # The same config again: resumes its finished run (no step trained twice, same MLflow run).
    again = train(params, data, out, storage_path=str(tmp_path / "runs"), use_ray=False)
    assert again["run_name"] == name and again["mlflow_run_id"] == metrics["mlflow_run_id"]
    assert again["attempts"] == 2 and again["iterations"] == 6
    assert len(out.plots.read_text().splitlines()) == 7
    # A changed config starts fresh under another name.
    changed = params_from_dict(tiny_params(experiment="t-engine", lr=0.04))
    assert run_name(changed, read_data_hash(data)) != name
    assert (
        run_name(params_from_dict(tiny_params(experiment="t-engine", log_every=5)), read_data_hash(data))
        == name
    )


class CrashAfter(LocalSession):
    """A local session whose process 'dies' right after the checkpoint of ``iteration``."""

    def __init__(self, directory: Path, iteration: int) -> None:
        super().__init__(directory)
        self.crash_at = iteration

    def report(self, metrics: dict, state: dict | None, iteration: int) -> None:
        super().report(metrics, state, iteration)
        if iteration == self.crash_at:
            raise KeyboardInterrupt(f"killed after iteration {iteration}")


def job(params, data: Path, *, validate: bool = False, tracking_uri: str | None = None) -> TrainJob:
    """The run ``t`` on ``data``; with ``validate``, scored on 3 images of its val2017 at each checkpoint."""
    validation = (
        ValidationSpec(
            data_root=str(data), split="val2017", num_images=3, every=params.train.checkpoint_every
        )
        if validate
        else None
    )
    return TrainJob(
        params=params, data_root=str(data), run_name="t", data_hash="h", git_commit="c",
        tracking_uri=tracking_uri, init_weights_file=None, validation=validation,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("validate", "model"),
    [(False, None), (True, None), (False, {"min_size": [64, 80, 96]})],
    ids=["plain", "validating", "multi_scale"],  # multi-scale: the drawn sizes resume too
)
def test_interrupted_and_resumed_trains_exactly_like_uninterrupted(
    data: Path, tmp_path: Path, validate: bool, model: dict | None
) -> None:
    # 12 images / batch 2 = 6 batches an epoch: the crash at 4 is mid-epoch, the run spans 2 epochs.
    params = params_from_dict(tiny_params(model, iterations=8, checkpoint_every=4, log_every=8))
    straight = LocalSession(tmp_path / "straight")
    train_worker(job(params, data, validate=validate), straight)

    with pytest.raises(KeyboardInterrupt):
        train_worker(job(params, data, validate=validate), CrashAfter(tmp_path / "crashed", 4))
    resumed = LocalSession(tmp_path / "crashed")
    train_worker(job(params, data, validate=validate), resumed)
    if validate:
        assert [m["iteration"] for m in resumed.reported] == [8] and "val_ap50" in resumed.reported[0]

    a, b = straight.restore(), resumed.restore()
    assert b["progress"]["attempts"] == 2 and b["progress"]["iteration"] == 8 and b["progress"]["epoch"] == 1
    assert [r["step"] for r in history_rows(b)] == list(range(1, 9))
    assert [r["loss"] for r in history_rows(a)] == [r["loss"] for r in history_rows(b)]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_gradient_clipping_bounds_the_update(data: Path, tmp_path: Path) -> None:
    params = params_from_dict(tiny_params(iterations=2, grad_clip_norm=1e-6, lr=1.0, warmup_iters=0))
    session = LocalSession(tmp_path / "clip")
    train_worker(job(params, data), session)
    state = session.restore()
    assert all(r["grad_norm"] > 1e-3 for r in history_rows(state)), "the norm is recorded before clipping"
    # SGD's first step moves each weight by lr * (clipped grad + weight decay): tiny here.
    torch.manual_seed(0)  # as build_model does with train.seed
    initial = build_detector(params.model).state_dict()
    moved = max(
        (state["model"][k] - v).abs().max().item() for k, v in initial.items() if v.is_floating_point()
    )
    assert moved < 0.05


def test_cpu_bf16_autocast_trains_float32_weights_in_bfloat16_arithmetic(data: Path, tmp_path: Path) -> None:
    states = {}
    for cpu_amp in ("off", "bf16"):
        session = LocalSession(tmp_path / cpu_amp)
        train_worker(job(params_from_dict(tiny_params(iterations=2, cpu_amp=cpu_amp)), data), session)
        states[cpu_amp] = session.restore()
    bf16, fp32 = states["bf16"], states["off"]
    assert all(math.isfinite(r["loss"]) for r in history_rows(bf16))
    assert all(v.dtype == fp32["model"][k].dtype for k, v in bf16["model"].items()), "weights stay float32"
    first = [(r["loss"], fr["loss"]) for r, fr in zip(history_rows(bf16), history_rows(fp32), strict=True)][0]
    assert first[0] != first[1], "the same step in bfloat16 arithmetic rounds differently"
    assert first[0] == pytest.approx(first[1], rel=0.05)


def test_non_finite_loss_stops_naming_the_step(data: Path, tmp_path: Path) -> None:
    params = params_from_dict(tiny_params(lr=1e12, warmup_iters=0, iterations=4, log_every=1))
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at iteration \d \(epoch 0\): loss=.*loss_cls="
    ):
        train_worker(job(params, data), LocalSession(tmp_path / "nan"))


def test_mlflow_unreachable_loses_only_the_logging(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    out = outputs(tmp_path)
    params = params_from_dict(tiny_params(iterations=2, checkpoint_every=2))
    with pytest.warns(RuntimeWarning, match=f"MLflow at {dead} unreachable"):
        metrics = train(params, data, out, storage_path=str(tmp_path / "runs"), use_ray=False)
    assert metrics["iterations"] == 2 and metrics["mlflow_run_id"] is None
    assert load_model_file(out.model).extra["mlflow_run_id"] is None


def test_checkpoint_saves_and_rank0_restores_the_cuda_generators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU the RPN/RoI samplers draw from the CUDA generator: a checkpoint that kept only the
    # CPU state resumed them on another stream. No GPU here: stand in for one initialised device.
    params = params_from_dict(tiny_params())
    session = LocalSession(tmp_path)
    state = build_state(job(params, tmp_path), session, None)
    fake = [torch.arange(16, dtype=torch.uint8)]
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(fake))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((device, s)))
    saved = checkpoint_state(job(params, tmp_path), state)
    assert torch.equal(saved["rng"]["cuda"][0], fake[0])
    expected = torch.rand(4)
    seed_random_streams(job(params, tmp_path), session, saved)
    assert torch.equal(torch.rand(4), expected), "rank 0 continues its CPU stream"
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], fake[0])


def loader_flips(data: Path, epoch: int, rank: int, workers: int) -> dict[int, bool]:
    """image_id -> flipped, for every training image as rank ``rank``'s epoch loader yields it."""
    t = params_from_dict(tiny_params(loader_workers=workers)).train
    dataset = DetectionDataset(data, "train2017", train=True, flip_prob=0.5, seed=t.seed)
    plain = DetectionDataset(data, "train2017", train=False)
    dataset.set_epoch(epoch)
    batches = [[i] for i in range(len(dataset))]
    seen = {}
    loader = epoch_loader(dataset, batches, t, torch.device("cpu"), epoch, rank)
    for i, (images, targets) in enumerate(loader):
        image_id = targets[0]["image_id"]
        seen[image_id] = not torch.equal(images[0], plain[i][0])
    return seen


def test_flips_are_per_image_and_epoch_whatever_the_loader_workers_and_rank(data: Path) -> None:
    epoch3 = loader_flips(data, epoch=3, rank=0, workers=0)
    assert loader_flips(data, epoch=3, rank=0, workers=2) == epoch3, "loader workers change no flip"
    assert loader_flips(data, epoch=3, rank=1, workers=2) == epoch3, (
        "an image's flip does not depend on the rank"
    )
    assert any(epoch3.values()) and not all(epoch3.values())
    assert loader_flips(data, epoch=4, rank=0, workers=0) != epoch3, "each epoch flips anew"


def test_bf16_falls_back_to_fp16_on_gpus_without_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.train.loop"):
        assert resolve_amp("bf16", "cuda", bf16_supported=False) == "fp16"
    assert "bf16" in caplog.text and "fp16" in caplog.text and "GradScaler" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.loop"):
        assert resolve_amp("bf16", "cuda", bf16_supported=True) == "bf16"
        assert resolve_amp("fp16", "cuda", bf16_supported=False) == "fp16"
        assert resolve_amp("off", "cuda", bf16_supported=False) == "off"
        assert resolve_amp("bf16", "cpu", bf16_supported=False) == "off", "train.amp is for GPUs"
    assert not caplog.records


def test_cpus_autocast_to_bf16_where_train_cpu_amp_says() -> None:
    assert resolve_amp("bf16", "cpu", bf16_supported=True) == "off", "train.cpu_amp defaults to off"
    assert resolve_amp("off", "cpu", bf16_supported=True, cpu_amp="auto") == "bf16"
    assert resolve_amp("bf16", "cpu", bf16_supported=False, cpu_amp="auto") == "off", "auto: native only"
    assert resolve_amp("off", "cpu", bf16_supported=False, cpu_amp="bf16") == "bf16", "bf16: asked for"
    assert resolve_amp("bf16", "cuda", bf16_supported=True, cpu_amp="off") == "bf16", "GPUs follow amp"


HOST_TRANSFERS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__format__")


class TransferCounter:
    """Counts tensor -> host conversions made by the training loop's own code, per optimizer step.

    Wraps `HOST_TRANSFERS` on ``torch.Tensor`` and counts calls whose caller is a file of
    ``pipeline/train/`` (the model's own data-dependent syncs are not the loop's). A call made
    while step ``k`` or its reporting runs counts for ``k``; on a GPU each is a device sync.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_step: dict[int, list[str]] = {}
        self.step = 0
        self.clip_calls = 0
        for name in HOST_TRANSFERS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        step_fn, clip_fn = loop.train_step, torch.nn.utils.clip_grad_norm_

        def counted_step(*args, **kwargs):
            self.step += 1
            return step_fn(*args, **kwargs)

        def counted_clip(*args, **kwargs):
            self.clip_calls += 1
            return clip_fn(*args, **kwargs)

        monkeypatch.setattr(loop, "train_step", counted_step)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted_clip)

    def _wrap(self, name: str, method):
        train_dir = str(Path(loop.__file__).parent)

        def wrapper(tensor, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(train_dir):
                self.by_step.setdefault(self.step, []).append(name)
            return method(tensor, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("clip", [None, 10.0])
def test_steps_between_log_lines_leave_everything_on_the_device(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clip: float | None
) -> None:
    params = params_from_dict(tiny_params(iterations=6, log_every=3, checkpoint_every=6, grad_clip_norm=clip))
    session = LocalSession(tmp_path / "run")
    counter = TransferCounter(monkeypatch)
    train_worker(job(params, data), session)
    monkeypatch.undo()
    assert counter.step == 6
    transfers = {step: counter.by_step.get(step, []) for step in range(1, 7)}
    assert all(not transfers[step] for step in (1, 2, 4, 5)), transfers  # not log steps: no sync at all
    assert transfers[3] and transfers[6], "log steps move the window's losses (the counter works)"
    assert counter.clip_calls == (0 if clip is None else 6), "no clipping pass with clipping off"
    rows = history_rows(session.restore())
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["grad_norm"] > 0 for r in rows)
    assert [m["iteration"] for m in session.reported] == [3, 6]


def test_weights_checksum_is_one_host_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_detector(params_from_dict(tiny_params()).model)
    expected = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    counter = TransferCounter(monkeypatch)
    checksum = weights_checksum(model)
    monkeypatch.undo()
    assert checksum == expected, "the same float64 sum, bit for bit"
    assert len(counter.by_step[0]) == 1, counter.by_step


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone: enough to build DDP on the CPU."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("norm", "broadcast"), [("bn", True), ("gn", False), ("frozen_bn", False)])
def test_ddp_broadcasts_buffers_only_with_trainable_batchnorm(
    tmp_path: Path, one_rank_group: None, norm: str, broadcast: bool
) -> None:
    session = LocalSession(tmp_path)
    session.world_size = 2  # as a rank of two sees it: the model is wrapped in DDP
    params = params_from_dict(tiny_params(model={"norm": norm}))
    state = build_state(job(params, tmp_path), session, None)
    assert isinstance(state.net, DistributedDataParallel)
    assert state.net.broadcast_buffers is broadcast


def test_non_finite_loss_is_caught_at_the_next_log_line_before_any_checkpoint(
    data: Path, tmp_path: Path
) -> None:
    # Losses are read every log_every steps: the error comes then, naming the first bad step.
    params = params_from_dict(
        tiny_params(lr=1e12, warmup_iters=0, iterations=8, log_every=4, checkpoint_every=4)
    )
    session = LocalSession(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError) as caught:
        train_worker(job(params, data), session)
    found = re.search(
        r"non-finite loss at iteration (\d) \(epoch 0\): .*found at iteration 4", str(caught.value)
    )
    assert found and 1 <= int(found.group(1)) <= 4, caught.value
    assert session.checkpoints() == [] and session.reported == [], "nothing saved or reported past it"


def test_validation_scores_each_checkpoint_on_the_training_device_and_changes_no_step(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Reports at 2, 4 (log lines), 3 (checkpoint) and 6 (both): only 3 and 6 are scored.
    params = params_from_dict(tiny_params(iterations=6, checkpoint_every=3, log_every=2))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    scored = LocalSession(tmp_path / "scored")
    with caplog.at_level(logging.INFO, logger="pipeline.train.loop"):
        final = train_worker(job(params, data, validate=True, tracking_uri=uri), scored)

    reported = {m["iteration"]: m for m in scored.reported}
    assert sorted(reported) == [2, 3, 4, 6]
    assert [i for i, m in reported.items() if set(VALIDATION_METRICS) <= set(m)] == [3, 6]
    assert not any(k in reported[i] for i in (2, 4) for k in VALIDATION_METRICS)
    rows = history_rows(scored.restore())
    for iteration, steps in ((3, (1, 2, 3)), (6, (4, 5, 6))):
        metrics = reported[iteration]
        assert 0.0 <= metrics["val_ap"] <= metrics["val_ap50"] <= 1.0
        expected = sum(r["loss"] for r in rows if r["step"] in steps) / len(steps)
        assert metrics["train_loss"] == pytest.approx(expected, rel=1e-12), "mean loss since the previous one"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train] validation")]
    assert len(lines) == 2 and lines[0].startswith("[train] validation iter 3: val_ap50 ")
    assert "3 images of val2017 on cpu" in lines[0]

    client = MlflowClient(tracking_uri=uri)
    for name in VALIDATION_METRICS:
        history = client.get_metric_history(final["mlflow_run_id"], name)
        assert [m.step for m in history] == [3, 6], name
        assert [m.value for m in history] == pytest.approx([reported[3][name], reported[6][name]])

    # Scoring changed nothing in training: the same losses and weights as a run that does not score.
    plain = LocalSession(tmp_path / "plain")
    train_worker(job(params, data), plain)
    a, b = plain.restore(), scored.restore()
    assert [r["loss"] for r in history_rows(a)] == [r["loss"] for r in rows]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"]), "the checkpoints continue the same stream"


def test_other_ranks_report_the_validation_keys_as_nan_without_scoring(tmp_path: Path) -> None:
    session = LocalSession(tmp_path)
    session.rank = 1
    params = params_from_dict(tiny_params())
    rank1 = RankZero(session)
    missing = tmp_path / "no-data"  # not read: rank 1 loads and scores nothing
    validating = job(params, missing, validate=True)
    rank1.load_validation(validating)
    assert rank1.holdout is None
    state = build_state(job(params, tmp_path), LocalSession(tmp_path), None)
    scores = rank1.validate(validating, state)
    assert set(scores) == set(VALIDATION_METRICS) and all(math.isnan(v) for v in scores.values())
    assert rank1.validate(job(params, missing), state) == {}, "no keys when the job does not validate"


def test_a_split_without_images_fails_before_training(data: Path, tmp_path: Path) -> None:
    params = params_from_dict(tiny_params())
    bad = TrainJob(
        params=params, data_root=str(data), run_name="t", data_hash="h", git_commit="c", tracking_uri=None,
        init_weights_file=None, validation=ValidationSpec(data_root=str(data), split="val2099", num_images=3, every=1),
    )  # fmt: skip
    session = LocalSession(tmp_path / "bad")
    with pytest.raises(Exception, match="val2099"):
        train_worker(bad, session)
    assert session.reported == [], "no step trained"
