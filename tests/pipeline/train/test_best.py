"""Periodic validation in stage train: the AP curve in MLflow, the best checkpoint kept beside the latest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import params_from_dict
from pipeline.dataset import read_data_hash
from pipeline.train.best import best_of, rank
from pipeline.train.sessions import LocalSession
from pipeline.train.stage import TrainOutputs, run_name, train
from tests.train_samples import tiny_data, tiny_params


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("best-data"))


def kept_iterations(session: LocalSession) -> list[int]:
    return [int(p.name.split("_")[-1]) for p in session.checkpoints()]


@pytest.mark.parametrize(
    ("scores", "kept", "best"),
    [
        # Scored: the two best and the latest stay, whatever their order.
        ([0.1, 0.5, 0.3, 0.4, 0.2], [2, 4, 5], 2),
        ([0.5, 0.1, 0.2, 0.3, 0.4], [1, 5], 1),  # 5: the latest and the second best
        # The latest is among the two best: two stay.
        ([0.1, 0.2, 0.3, 0.4, 0.5], [4, 5], 5),
        # Not scored (NaN, or no validation at all): the newest two, as Ray keeps them.
        ([math.nan] * 5, [4, 5], None),
        # A NaN (not scored) checkpoint ranks below every score.
        ([0.0, math.nan, math.nan, math.nan, math.nan], [1, 5], 1),
    ],
)
def test_local_session_keeps_the_latest_and_the_two_best(
    tmp_path: Path, scores: list[float], kept: list[int], best: int | None
) -> None:
    session = LocalSession(tmp_path, keep=2)
    for iteration, value in enumerate(scores, start=1):
        state = {"model": {}, "progress": {"iteration": iteration}}
        session.report({"iteration": iteration, "val_ap": value, "val_ap50": value}, state, iteration)
    assert kept_iterations(session) == kept
    found = session.best()
    assert (found.iteration if found else None) == best
    if found is not None:
        assert found.scores == {"val_ap": scores[best - 1], "val_ap50": scores[best - 1]}
        assert Path(found.location).name == f"checkpoint_{best:08d}"


def test_best_of_ties_go_to_the_later_iteration_and_unscored_never_win() -> None:
    candidates = [("a", {"iteration": 2, "val_ap": 0.3}), ("b", {"iteration": 4, "val_ap": 0.3}),
                  ("c", {"iteration": 6, "val_ap": math.nan}), ("d", {"iteration": 8})]  # fmt: skip
    assert best_of(candidates).location == "b"
    assert best_of(candidates[2:]) is None
    assert rank({"val_ap": 0.0}, 1) > rank({"val_ap": math.nan}, 9) > rank({}, 8)


def test_eval_every_rejects_a_cadence_between_checkpoints() -> None:
    with pytest.raises(ValueError, match=r"eval_every: must be a multiple of checkpoint_every \(3\).*got 4"):
        params_from_dict(tiny_params(eval_every=4))


def test_train_with_eval_every_logs_the_ap_curve_and_keeps_the_best(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = tiny_params(iterations=8, checkpoint_every=2, eval_every=4, val_images=3, system_metrics_s=0.2)
    params = params_from_dict(raw)
    out = TrainOutputs(
        model=tmp_path / "model.pt", metrics=tmp_path / "train.json", plots=tmp_path / "loss.csv"
    )
    metrics = train(params, data, out, storage_path=str(tmp_path / "runs"), use_ray=False)

    client = MlflowClient(tracking_uri=uri)
    run_id = metrics["mlflow_run_id"]
    curve = {m.step: m.value for m in client.get_metric_history(run_id, "val_ap")}
    assert sorted(curve) == [4, 8], (
        "scored every train.eval_every iterations (and at the last), not at 2 and 6"
    )
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_ap50")) == [4, 8]
    written = json.loads(out.metrics.read_text())
    best_value = max(curve.values())
    assert written["best_val_ap"] == pytest.approx(best_value)
    assert written["best_iteration"] == max(step for step, v in curve.items() if v == best_value)
    location = Path(written["best_checkpoint"])
    assert (
        location.name == f"checkpoint_{written['best_iteration']:08d}"
        and (location / "train_state.pt").is_file()
    )
    session = LocalSession(location.parent)
    assert 8 in kept_iterations(session), "the latest is kept beside the best"
    tags = client.get_run(run_id).data.tags
    assert tags["best_checkpoint"] == str(location) and tags["best_iteration"] == str(
        written["best_iteration"]
    )
    # MLflow's system metrics, sampled on rank 0's machine while it trained.
    keys = set(client.get_run(run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, sorted(keys)
    # Validation leaves training untouched: turning it on keeps the run's name (it resumes).
    plain = params_from_dict(tiny_params(iterations=8, checkpoint_every=2))
    assert run_name(plain, read_data_hash(data)) == metrics["run_name"]
