"""The whole pipeline, for real: `dvc repro` in a fresh copy of the repository.

A tiny configuration (a few synthetic images, a tiny ResNet-18-FPN, a few iterations) goes
through fetch -> preprocess -> train (Ray Train, local cluster) -> evaluate (pycocotools,
MLflow registry) -> profile; every stage's outputs, the metrics, the MLflow run and the
registered model are checked, then a second `dvc repro` must do nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {
        "synthetic_train_images": 16,
        "synthetic_val_images": 6,
        "synthetic_width": 160,
        "synthetic_height": 128,
    },
    "model": {
        "fpn_channels": 32,
        "representation_size": 64,
        "min_size": 128,
        "max_size": 160,
        "roi_batch_per_image": 32,
    },
    "train": {
        "iterations": 6,
        "warmup_iters": 2,
        "lr_steps": [4],
        "checkpoint_every": 3,
        "log_every": 2,
        "batch_size": 2,
    },
    "evaluate": {"batch_size": 2, "num_pictures": 2},
    "profile": {"warmup": 1, "iterations": 1, "compare_torchvision": False, "train_step": False},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a commit of this work tree would hold."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = REPO_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stdout + proc.stderr


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
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update({"OMP_NUM_THREADS": "2", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    _run(["git", "init", "-q"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "fresh copy"], repo, env)

    _run(["dvc", "repro"], repo, env)

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
    shown = _run(["dvc", "metrics", "show", "--json"], repo, env)
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

    # Every file the stages wrote is an output dvc.yaml declares. Not outputs: the MLflow store
    # and Ray's checkpoint storage (runs/), state that outlives a run by design.
    declared = _declared_outputs(repo / "dvc.yaml")
    state = ("mlflow.db", "mlartifacts", "runs", "dvc.lock", ".dvc", ".git", ".dvcignore")
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
    again = _run(["dvc", "repro"], repo, env)
    assert "up to date" in again, again
