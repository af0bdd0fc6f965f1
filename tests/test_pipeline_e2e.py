"""The whole pipeline, for real: `dvc repro` in a fresh copy of the repository.

A tiny configuration (a few synthetic images, a tiny ResNet-18-FPN, a few iterations) goes
through fetch -> preprocess -> train (Ray Train, local cluster) -> evaluate (pycocotools,
MLflow registry) -> profile; every stage's outputs, the metrics, the MLflow run and the
registered model are checked, then a second `dvc repro` must do nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import fresh_repo, run


def _declared_outputs(dvc_yaml: Path) -> list[Path]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"].values()
    return [
        Path(next(iter(o)) if isinstance(o, dict) else o)
        for stage in stages
        for key in ("outs", "metrics", "plots")
        for o in stage.get(key, [])
    ]


def _tracked(repo: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True).stdout.decode()
    return [name for name in out.split("\0") if name]


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_a_no_op(tmp_path: Path) -> None:
    repo, env = fresh_repo(tmp_path / "repo")

    run(["dvc", "repro"], repo, env)

    # Every stage's outputs.
    coco = repo / "data" / "coco"
    assert (coco / "annotations" / "instances_train2017.json").is_file()
    assert len(list((coco / "val2017").glob("*.jpg"))) == 6
    assert (repo / "data" / "preprocessed" / "manifest.json").is_file()
    assert (repo / "models" / "model.pt").is_file()
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["iterations"] == 6
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    for key in ("AP", "AP50", "APs", "AR100", "proposal_AR1k"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert list((repo / "reports" / "eval_images").glob("*.jpg"))
    profile = json.loads((repo / "metrics" / "profile.json").read_text())
    assert any(value > 0 for key, value in profile.items() if "ms" in key)
    for plot in ("train_loss.csv", "pr_curve.csv", "profile_split.csv"):
        assert len((repo / "plots" / plot).read_text().splitlines()) > 1

    # DVC sees the metrics; MLflow (the default store in the project root) has the run and the model.
    shown = run(["dvc", "metrics", "show", "--json"], repo, env)
    assert "metrics/eval.json" in shown
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{repo / 'mlflow.db'}"
    # Both URIs explicit: earlier tests in this process may have set a global registry URI.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any("loss" in run.data.metrics for run in runs)
    versions = client.search_model_versions("name='fpn-detector'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias("fpn-detector", "champion").version == versions[0].version
    # The runs' files and the registered model live beside the store, not in a Ray temp folder
    # (the experiment was created by the Ray Train worker, in its temp working folder).
    experiment = client.get_experiment_by_name("fpn")
    assert experiment.artifact_location == str(repo.resolve() / "mlruns" / "fpn")
    assert list((repo / "mlruns" / "fpn").rglob("MLmodel")), "the logged model's files"

    # Every file the stages wrote is an output dvc.yaml declares. Not outputs: the MLflow store
    # and Ray's checkpoint storage (runs/), state that outlives a run by design.
    declared = _declared_outputs(repo / "dvc.yaml")
    state = (
        "mlflow.db",
        "mlflow.db.lock",
        "mlruns",
        "mlartifacts",
        "runs",
        "dvc.lock",
        ".dvc",
        ".git",
        ".dvcignore",
    )
    written = [
        p.relative_to(repo)
        for p in repo.rglob("*")
        if p.is_file() and p.relative_to(repo).parts[0] not in state and "__pycache__" not in p.parts
    ]
    tracked = set(_tracked(repo))
    undeclared = [
        str(p)
        for p in written
        if str(p) not in tracked and not any(p == d or d in p.parents for d in declared)
    ]
    assert not undeclared, f"written but not declared in dvc.yaml: {undeclared}"

    # Nothing changed: nothing runs.
    again = run(["dvc", "repro"], repo, env)
    assert "up to date" in again, again
