"""Stage evaluate end to end: real pycocotools, a real MLflow server, tiny random-weight detectors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.dataset import DetectionDataset
from pipeline.evaluate.coco_eval import PROPOSAL_KEYS, STANDARD_KEYS
from pipeline.evaluate.stage import slug
from stages import evaluate
from tests.conftest import free_port
from tests.detection_samples import (
    coco_mini_preprocessed,
    read_categories,
    synthetic_preprocessed,
    tiny_model_file,
)
from tests.params_files import write_params_file


def write_params(tmp_path: Path, **evaluate_values: object) -> Path:
    values = {
        "batch_size": 2,
        "num_pictures": 2,
        "registered_model": f"fpn-test-{uuid.uuid4().hex[:8]}",
        **evaluate_values,
    }
    return write_params_file(
        tmp_path / "params.yaml",
        {"data": {"val_split": "val2017"}, "train": {"experiment": "fpn-tests"}, "evaluate": values},
    )


def stage_args(tmp_path: Path, params: Path, model: Path, data: Path) -> list[str]:
    return [
        "--params", str(params), "--model", str(model), "--data", str(data),
        "--metrics", str(tmp_path / "metrics" / "eval.json"), "--plots", str(tmp_path / "plots" / "pr_curve.csv"),
        "--images", str(tmp_path / "reports" / "eval_images"),
    ]  # fmt: skip


def check_outputs(tmp_path: Path, num_pictures: int) -> dict[str, float]:
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    for key in (*STANDARD_KEYS, *(f"proposal_{k}" for k in PROPOSAL_KEYS)):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert (
        metrics["eval_seconds_per_image"] > 0
        and metrics["eval_wall_seconds_per_image"] >= metrics["eval_seconds_per_image"]
    )
    with (tmp_path / "plots" / "pr_curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["recall", "precision_iou50", "precision_iou50_95"] and len(rows) == 101
    assert len(list((tmp_path / "reports" / "eval_images").glob("*.jpg"))) == num_pictures
    return metrics


@pytest.fixture
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_preprocessed(tmp_path_factory.mktemp("synthetic"), images=4)


def test_score_mode_prints_cocoapis_numbers(shared_data: Path) -> None:
    folder = shared_data / "cocoapi-eval"
    done = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--annotations", str(folder / "instances_val2014_100.json"),
         "--results", str(folder / "instances_val2014_fakebbox100_results.json")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "AP     0.5045806987249628" in done.stdout.splitlines()
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(STANDARD_KEYS)


def test_score_mode_names_unknown_image_ids(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "results.json").write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}])
    )
    annotations = shared_data / "cocoapi-eval" / "instances_val2014_100.json"
    assert (
        evaluate.main(["--annotations", str(annotations), "--results", str(tmp_path / "results.json")]) == 2
    )
    assert "1 image id(s) not in the ground truth: 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"score": float("nan")}, "[1].score: must be a finite number, got nan"),
        ({"bbox": ["a", 0, 5, 5]}, "[1].bbox: must be 4 finite numbers [x, y, w, h], got ['a', 0, 5, 5]"),
    ],
)
def test_score_mode_refuses_bad_numbers_naming_file_index_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, bad: dict, message: str
) -> None:
    good = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}
    annotations = tmp_path / "gt.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "width": 10, "height": 10}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}],
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    results = tmp_path / "results.json"
    results.write_text(json.dumps([good, {**good, **bad}]))
    assert evaluate.main(["--annotations", str(annotations), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err == f"stages.evaluate: error: {results}{message}\n"


@pytest.mark.slow  # two registrations / evaluations through the server: ~15-45 s
def test_evaluate_logs_to_the_training_run_and_registers(
    tmp_path: Path, synthetic: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("fpn-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("fpn-tests")
    train_run = client.create_run(experiment_id, run_name="train")
    client.set_terminated(train_run.info.run_id)
    model = tiny_model_file(
        tmp_path / "model.pt",
        read_categories(synthetic),
        extra={"mlflow_run_id": train_run.info.run_id, "git_commit": "c0ffee"},
    )
    params = write_params(tmp_path)
    name = yaml.safe_load(params.read_text())["evaluate"]["registered_model"]
    # Another experiment active in this process (MLflow refuses to resume a run outside it).
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("some-other-experiment")

    assert evaluate.main(stage_args(tmp_path, params, model, synthetic)) == 0
    metrics = check_outputs(tmp_path, num_pictures=2)
    assert {"AP_circle", "AP_square", "AP_triangle"} <= set(metrics)
    run = client.get_run(train_run.info.run_id)
    assert run.data.metrics["eval/AP"] == pytest.approx(metrics["AP"])
    assert run.data.metrics["eval/proposal_AR1k"] == pytest.approx(metrics["proposal_AR1k"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/eval.json",
        "evaluation/pr_curve.csv",
        "evaluation/pr_curve.png",
        "evaluation/images",
    } <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "evaluation/images")) == 2
    assert run.info.status == "FINISHED"
    # One MLflow model in the run: the pyfunc logged from code, the one the alias points at.
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    (logged,) = [m for m in models if m.source_run_id == train_run.info.run_id]
    assert logged.name == "fpn_detector"
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == "1" and version.run_id == train_run.info.run_id
    assert version.source == f"models:/{logged.model_id}"
    assert version.tags["git_commit"] == "c0ffee" and version.tags["status"] == "champion"
    assert version.tags["data_hash"] == json.loads((synthetic / "manifest.json").read_text())["data_hash"]
    assert float(version.tags["metric.AP"]) == pytest.approx(metrics["AP"], rel=1e-5)

    # The same model again: same AP, so it does not beat the champion.
    assert evaluate.main(stage_args(tmp_path, params, model, synthetic)) == 0
    second = client.get_model_version(name, "2")
    assert second.tags["status"] == "rejected" and second.tags["compared_with"].startswith("version 1 AP")
    assert client.get_model_version_by_alias(name, "champion").version == "1"


def test_evaluate_coco_mini_with_a_new_run(
    tmp_path: Path, shared_data: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real COCO (80 classes, ids with gaps, crowd boxes) through a random-weight model: AP ~0, but
    the coco-id mapping, COCOeval and the outputs run; no run id in the model file -> a new run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    data = coco_mini_preprocessed(shared_data, tmp_path, images=3)
    model = tiny_model_file(tmp_path / "model.pt", read_categories(data))
    params = write_params(tmp_path, num_pictures=1)
    assert evaluate.main(stage_args(tmp_path, params, model, data)) == 0
    metrics = check_outputs(tmp_path, num_pictures=1)
    assert metrics["num_images"] == 3
    dataset = DetectionDataset(data, "val2017", train=False)
    names = {c["label"]: c["name"] for c in read_categories(data)}
    present = {names[label] for i in range(len(dataset)) for label in dataset[i][1]["labels"].tolist()}
    assert {f"AP_{slug(name)}" for name in present} == {key for key in metrics if key.startswith("AP_")}
    runs = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_experiment_by_name("fpn-tests").experiment_id],
        filter_string=f"tags.model_file = '{model}'",
    )
    assert len(runs) == 1 and runs[0].data.metrics["eval/num_images"] == 3


def test_unreachable_tracking_server_still_writes_the_files(
    tmp_path: Path, synthetic: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = tiny_model_file(
        tmp_path / "model.pt", read_categories(synthetic), extra={"mlflow_run_id": "0" * 32}
    )
    assert evaluate.main(stage_args(tmp_path, write_params(tmp_path), model, synthetic)) == 1
    check_outputs(tmp_path, num_pictures=2)
    err = capsys.readouterr().err
    assert "MLflow: not logged: metrics, PR curve, pictures, model, registry" in err
    assert uri in err


def test_bad_checkpoints_get_a_clear_error(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture
) -> None:
    params = write_params(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert evaluate.main([*stage_args(tmp_path, params, garbage, synthetic), "--no-mlflow"]) == 2
    assert f"{garbage}: not a loadable checkpoint" in capsys.readouterr().err

    pickled = tmp_path / "pickled.pt"  # a whole pickled module: refused by weights_only loading
    torch.save(torch.nn.Linear(2, 2), pickled)
    assert evaluate.main([*stage_args(tmp_path, params, pickled, synthetic), "--no-mlflow"]) == 2
    assert f"{pickled}: not a loadable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "metrics" / "eval.json").exists()


def test_model_with_other_categories_is_refused(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture
) -> None:
    other = [
        {"label": 1, "id": 1, "name": "person"},
        {"label": 2, "id": 3, "name": "car"},
        {"label": 3, "id": 9, "name": "boat"},
    ]
    model = tiny_model_file(tmp_path / "model.pt", other)
    assert (
        evaluate.main([*stage_args(tmp_path, write_params(tmp_path), model, synthetic), "--no-mlflow"]) == 2
    )
    assert "categories (label -> COCO id) differ from" in capsys.readouterr().err
