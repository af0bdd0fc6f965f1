"""The project's code shipped to a Ray cluster: what travels, when it does not, and (slow) that it works.

The excludes are matched with pathspec's ``gitwildmatch``, the matcher Ray 2.60 packs a
``working_dir`` with (ray/_private/runtime_env/packaging.py `_get_excludes`).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.runtime_env import JOB_CONFIG_ENV, SHIPPED_EXCLUDES, code_runtime_env, job_working_dir
from tests.ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401 (the fixture)

pathspec = pytest.importorskip("pathspec")
REPO_ROOT = Path(__file__).resolve().parents[2]


def excluded(path: str) -> bool:
    """Whether Ray leaves ``path`` (relative to the working dir) out of the shipped copy."""
    return pathspec.PathSpec.from_lines("gitwildmatch", SHIPPED_EXCLUDES).match_file(path)


@pytest.mark.parametrize(
    "path",
    [
        "data", "data/coco/train2017/000000000009.jpg", "data/preprocessed/manifest.json", "models/model.pt",
        "runs/ray/fpn-0123456789ab/checkpoint_000200/state.pt", "runs/locks/fpn-0123.lock", "runs",
        "mlruns", "mlruns-tune/1/meta.yaml", "mlartifacts/1/model.pt", "mlflow.db", "mlflow.db.lock",
        "reports/eval_images/1.jpg", "metrics/train.json", "plots/train_loss.csv", "params/best.yaml",
        ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/rwlock", ".git", ".git/objects/pack/x.pack",
        ".venv/bin/python", "venv/lib/x.py", "pipeline/__pycache__/cluster.cpython-312.pyc",
        "shards/train-00001.parquet", "dvc_plots/index.html", "ray_results/x", "fpn_pipeline.egg-info/PKG-INFO",
    ],
)  # fmt: skip
def test_data_outputs_and_state_stay_home(path: str) -> None:
    assert excluded(path), path


@pytest.mark.parametrize(
    "path",
    [
        "fpn/detector.py", "pipeline/cluster.py", "pipeline/train/loop.py", "pipeline/tracking/model_code.py",
        "stages/train.py", "params.yaml", "params/coco_r50_fpn_1x.yaml", "dvc.yaml", "pyproject.toml",
        "pipeline/data.py", "pipeline/runs.py", "tests/pipeline/test_config.py",
    ],
)  # fmt: skip
def test_the_code_travels(path: str) -> None:
    assert not excluded(path), path


def test_every_dvc_output_stays_home() -> None:
    """A new output in dvc.yaml (or experiments/dvc.yaml) must not be shipped to the cluster with the code."""
    stages = {
        **yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"],
        **yaml.safe_load((REPO_ROOT / "experiments" / "dvc.yaml").read_text())["stages"],
    }
    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for stage in stages.values()
        for key in ("outs", "metrics", "plots")
        for o in stage.get(key, [])
    ]
    assert outs and [o for o in outs if not excluded(o)] == []


def test_the_project_root_is_shipped_with_the_excludes(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "__init__.py").write_text("")
    env = code_runtime_env(root, environ={})
    assert env == {"working_dir": str(root.resolve()), "excludes": list(SHIPPED_EXCLUDES)}
    json.dumps(env)  # what ray.init sends: plain JSON


def test_under_a_job_with_a_working_dir_nothing_is_shipped_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``ray job submit --working-dir .``: Ray refuses a second working_dir, and the job's copy is the code."""
    job = {
        JOB_CONFIG_ENV: json.dumps(
            {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
        )
    }
    assert job_working_dir(job) == "gcs://_ray_pkg_0123.zip"
    with caplog.at_level(logging.INFO, logger="pipeline.runtime_env"):
        assert code_runtime_env(REPO_ROOT, environ=job) is None
    assert "running in Ray job working dir gcs://_ray_pkg_0123.zip" in caplog.text
    assert code_runtime_env(REPO_ROOT, environ={JOB_CONFIG_ENV: "{not json"}) is None  # cannot merge safely
    # A job submitted without a working dir gets the project shipped (Ray merges the two).
    bare = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": {"A": "1"}}})}
    assert job_working_dir(bare) is None
    assert code_runtime_env(REPO_ROOT, environ=bare) == {
        "working_dir": str(REPO_ROOT),
        "excludes": list(SHIPPED_EXCLUDES),
    }


def test_a_folder_that_is_not_the_project_is_not_shipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime_env"):
        assert code_runtime_env(tmp_path, environ={}) is None
    assert f"{tmp_path.resolve()} is not the project root" in caplog.text


DRIVER = """
import json, logging, os, ray
from pipeline.cluster import connected

logging.basicConfig(level=logging.INFO)  # as the stages do

@ray.remote(num_cpus=0)
def where():
    import pipeline
    return {"cwd": os.getcwd(), "pipeline": pipeline.__file__, "marker": open("MARKER").read(),
            "shipped": sorted(os.listdir("."))}

with connected(log_to_driver=False):
    print("RESULT " + json.dumps({"driver_cwd": os.getcwd(), "worker": ray.get(where.remote(), timeout=300)}))
"""


def project_copy(root: Path) -> str:
    """The project's code in ``root``, beside data and state that must stay home; returns its marker."""
    for package in ("fpn", "pipeline"):
        shutil.copytree(REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    marker = secrets.token_hex(8)
    (root / "MARKER").write_text(marker)
    (root / "driver.py").write_text(DRIVER)
    for kept_home in ("data/coco/big.bin", "runs/ray/x/state.pt", "mlruns/1/meta.yaml"):
        (root / kept_home).parent.mkdir(parents=True, exist_ok=True)
        (root / kept_home).write_bytes(b"\0" * 1024)
    return marker


def result_of(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_a_driver_joining_a_cluster_ships_the_code_and_a_job_keeps_its_own(
    ray_cluster: LocalRayCluster,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """Tasks import the driver's code from Ray's copy of it, without data or state; under ray job
    submit --working-dir the job's copy is used and not shipped again (no merge conflict)."""
    root = tmp_path / "project"
    root.mkdir()
    marker = project_copy(root)

    # A stage joining the cluster through RAY_ADDRESS: the project travels as the working_dir.
    done = subprocess.run(
        [sys.executable, "driver.py"], cwd=root, env=ray_cluster.env(PYTHONPATH=str(root)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    worker = result_of(done.stdout)["worker"]
    cwd = Path(worker["cwd"])
    assert cwd != root and worker["marker"] == marker, "the task runs in Ray's copy of this project"
    assert Path(worker["pipeline"]).is_relative_to(cwd), f"{worker['pipeline']} is not the shipped copy {cwd}"
    assert {"fpn", "pipeline", "MARKER"} <= set(worker["shipped"])
    assert not {"data", "runs", "mlruns"} & set(worker["shipped"]), worker["shipped"]
    assert "shipping the project at" in done.stderr

    # The same driver as a job with its own working dir: no second working_dir, the job's copy is used.
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
         "--working-dir", str(root), "--", "python", "driver.py"],
        env=ray_cluster.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    job = result_of(submitted.stdout)
    assert job["worker"]["cwd"] == job["driver_cwd"] != str(root), job
    assert job["worker"]["marker"] == marker
    assert "Failed to merge" not in submitted.stdout + submitted.stderr
    assert "the job's copy of the code is used, not shipped again" in submitted.stdout
