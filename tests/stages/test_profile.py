"""Stage profile end to end on a tiny model file: the real command, a real MLflow store (SQLite)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from fpn import build_detector
from pipeline.config import ConfigError, params_from_dict
from pipeline.model_file import save_model_file
from stages import profile as stage
from tests.detection_samples import TINY_PROFILE_CONFIG as TINY
from tests.ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401 (the session fixture)

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = """
train:
  batch_size: 1
  experiment: profile-test
profile:
  batch_sizes: [1]
  warmup: 1
  iterations: 1
  devices: [cpu]
  threads: 2
data: {}
preprocess: {}
model: {}
evaluate: {}
tune: {}
ablate: {}
storage: {}
"""
CATEGORIES = [{"label": k, "id": k, "name": f"class{k}"} for k in (1, 2, 3)]


def _model_file(path: Path, run_id: str | None) -> Path:
    torch.manual_seed(0)
    extra = {"mlflow_run_id": run_id} if run_id else {}
    save_model_file(path, build_detector(TINY), TINY, CATEGORIES, extra)
    return path


def test_stage_writes_metrics_plots_and_logs_to_the_models_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("profile-test")).info.run_id
    client.set_terminated(run_id)
    model = _model_file(tmp_path / "models" / "model.pt", run_id)
    (tmp_path / "params.yaml").write_text(PARAMS)
    metrics_path, plots_path = tmp_path / "metrics" / "profile.json", tmp_path / "plots" / "profile_split.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.profile",
            "--params",
            str(tmp_path / "params.yaml"),
            "--model",
            str(model),
        ]
        + ["--metrics", str(metrics_path), "--plots", str(plots_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # generous: the machine may be shared; on its own this takes ~20 s
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ref_torchvision" in done.stdout and "ours_over_torchvision" in done.stdout  # the table

    metrics = json.loads(metrics_path.read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    for subject in ("model", "ref_ours", "ref_torchvision", "single_c4"):
        prefix = f"cpu.{subject}.bs1"
        total = metrics[f"{prefix}.latency_median_ms"]
        assert total > 0 and metrics[f"{prefix}.latency_p90_ms"] >= total
        assert metrics[f"{prefix}.images_per_s"] == pytest.approx(1000 / total, rel=1e-4)
        assert metrics[f"{prefix}.memory_mb"] > 0
        parts = {k.rsplit(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{prefix}.split.")}
        assert set(parts) == {
            f"{p}_ms" for p in ("preprocess", "backbone", "neck", "rpn", "roi_heads", "postprocess", "other")
        }
        assert sum(parts.values()) == pytest.approx(total, rel=0.01)
        assert parts["backbone_ms"] > 0 and parts["roi_heads_ms"] > 0
        # How well the hooks cover a call is `tests/pipeline/profile/test_timing.py`'s check: a
        # median of 5 calls of ~20 ms is at the mercy of one preemption on a loaded machine.
    for subject in ("model", "ref_ours", "ref_torchvision"):
        assert metrics[f"cpu.train.{subject}.images_per_s"] > 0
        assert metrics[f"cpu.train.{subject}.split.backward_ms"] > 0
    assert metrics["cpu.bs1.ours_over_torchvision.latency"] > 0
    assert metrics["cpu.train.ours_over_torchvision.step_time"] > 0
    assert metrics["cpu.bs1.fpn_over_single_c4.latency"] > 0
    assert metrics["cpu.bs1.detections"] == TINY.detections_per_image  # at score threshold 0
    assert metrics["cpu.bs1.unmatched"] == 0 and metrics["cpu.bs1.max_box_diff"] < 1e-2

    with plots_path.open() as handle:
        rows = list(csv.DictReader(handle))
    shares: dict[tuple[str, str, str], float] = {}
    for row in rows:
        key = (row["device"], row["subject"], row["kind"])
        shares[key] = shares.get(key, 0.0) + float(row["share"])
        assert float(row["ms"]) >= 0
    assert ("cpu", "ref_torchvision", "inference") in shares and ("cpu", "model", "train_step") in shares
    assert all(v == pytest.approx(1.0, abs=0.01) for v in shares.values())
    assert plots_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged = client.get_run(run_id)
    assert logged.data.metrics["cpu.ref_ours.bs1.latency_median_ms"] == pytest.approx(
        metrics["cpu.ref_ours.bs1.latency_median_ms"], rel=1e-4
    )
    assert logged.data.tags["profile.machine.threads"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run_id, "profile")}
    assert artifacts == {
        "profile/profile.json",
        "profile/profile_split.csv",
        "profile/profile_split.png",
        "profile/profile_table.txt",
    }


def test_missing_model_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text(PARAMS)
    code = stage.main(
        ["--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path / "absent.pt")]
        + ["--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p.csv"), "--no-mlflow"]
    )
    assert code == 2
    assert "absent.pt: model file not found" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.csv").exists()


def test_bad_batch_size_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text(PARAMS.replace("batch_sizes: [1]", "batch_sizes: [0]"))
    model = _model_file(tmp_path / "model.pt", None)
    code = stage.main(
        ["--params", str(tmp_path / "params.yaml"), "--model", str(model)]
        + ["--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p.csv"), "--no-mlflow"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "profile" in err and "batch_sizes" in err and "[0]" in err
    assert not (tmp_path / "m.json").exists()


def _run_on(
    cluster: LocalRayCluster, tmp_path: Path, params: str, model: Path
) -> subprocess.CompletedProcess:
    """``python -m stages.profile`` with ``params`` (text) against ``cluster``, no MLflow; files in ``tmp_path``."""
    (tmp_path / "params.yaml").write_text(params)
    return subprocess.run(
        [sys.executable, "-m", "stages.profile", "--params", str(tmp_path / "params.yaml"), "--model", str(model),
         "--metrics", str(tmp_path / "profile.json"), "--plots", str(tmp_path / "split.csv"), "--no-mlflow"],
        cwd=REPO_ROOT, env=cluster.env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip


@pytest.mark.slow
def test_where_cluster_measures_in_a_ray_task_with_a_training_workers_resources(
    ray_cluster: LocalRayCluster,  # noqa: F811 (the session fixture)
    tmp_path: Path,
) -> None:
    model = _model_file(tmp_path / "model.pt", None)
    params = PARAMS.replace("train:\n", "train:\n  cpus_per_worker: 1\n").replace(
        "profile:\n",
        "profile:\n  where: cluster\n  compare_torchvision: false\n  single_scale_baseline: false\n"
        "  train_step: false\n",
    )
    done = _run_on(ray_cluster, tmp_path, params, model)
    metrics_path = tmp_path / "profile.json"
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"note: measured on Ray node [0-9.]+ \(1 CPUs\)", done.stdout), done.stdout[-2000:]
    assert json.loads(metrics_path.read_text())["cpu.model.bs1.latency_median_ms"] > 0


def test_where_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"profile\.where: must be here, cluster or auto, got 'gpu'"):
        params_from_dict({"profile": {"where": "gpu"}})


@pytest.mark.slow
def test_where_cluster_refuses_a_gpu_the_cluster_lacks(
    ray_cluster: LocalRayCluster,  # noqa: F811 (the session fixture)
    tmp_path: Path,
) -> None:
    model = _model_file(tmp_path / "model.pt", None)
    params = PARAMS.replace("train:\n", "train:\n  use_gpu: true\n").replace(
        "profile:\n", "profile:\n  where: cluster\n"
    )
    done = _run_on(ray_cluster, tmp_path, params, model)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "train.use_gpu: true, but the Ray cluster at" in done.stderr and "has no GPU" in done.stderr, (
        done.stderr[-2000:]
    )
    assert not (tmp_path / "profile.json").exists()
