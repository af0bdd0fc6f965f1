"""Stage ablate end to end: two variants side by side on a real Ray cluster, tracked in MLflow, resumable.

One tiny run (ResNet-18, d=32, 128-160 px, 10 iterations) of ``fpn`` and ``single_c5`` with
``ablate.parallel: 2`` (two Ray Train runs at once; the SQLite store behind a real local
``mlflow server``), then the same command again (everything reused), then again after one
variant's kept result is removed (its Ray run resumes from its final checkpoint).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401 (session fixture)
from tests.train_samples import tiny_data, tiny_params, write_params

pytestmark = pytest.mark.slow
VARIANTS = ["fpn", "single_c5"]
EXPERIMENT = "ablate-test"
COLUMNS = ["variant", "features (RPN / RoI)", "anchors", "AR100", "AR1k", "ARs1k", "ARm1k", "ARl1k",
           "AP", "AP50", "APs", "APm", "APl", "train img/s", "test ms/img"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("ablate-data"), width=160, height=128)


def run_stage(cluster: LocalRayCluster, root: Path, data: Path) -> str:
    command = [
        sys.executable, "-m", "stages.ablate", "--params", str(root / "params.yaml"), "--data", str(data),
        "--table", str(root / "reports/ablation.md"), "--metrics", str(root / "metrics/ablation.json"),
        "--plots", str(root / "plots/ablation.csv"), "--work", str(root / "work"),
    ]  # fmt: skip
    env = cluster.env(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done.stdout


def table_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_two_variants_side_by_side_each_from_its_own_run_and_resumable(
    ray_cluster: LocalRayCluster,  # noqa: F811
    data: Path,
    tmp_path: Path,
) -> None:
    raw = tiny_params(
        {"min_size": 128, "max_size": 160}, iterations=10, checkpoint_every=5, log_every=5, lr_steps=[8]
    )
    raw["evaluate"] = {"batch_size": 2, "num_pictures": 1}
    raw["ablate"] = {"variants": VARIANTS, "parallel": 2, "experiment": EXPERIMENT}
    write_params(tmp_path / "params.yaml", raw)
    stdout = run_stage(ray_cluster, tmp_path, data)
    assert "2 variants (0 kept" in stdout

    # The table: rows = variants in order, the paper's columns, one value per column.
    rows = table_rows(tmp_path / "reports/ablation.md")
    assert rows[0] == COLUMNS
    assert [row[0].split()[0] for row in rows[1:]] == VARIANTS
    assert all(len(row) == len(COLUMNS) for row in rows)
    assert rows[1][1] == "P2-P6 / P2-P5" and rows[2][1] == "C5 / C5"
    metrics = json.loads((tmp_path / "metrics/ablation.json").read_text())
    assert list(metrics) == VARIANTS
    with (tmp_path / "plots/ablation.csv").open() as handle:
        plot_rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in plot_rows] == VARIANTS
    for row, variant in zip(rows[1:], VARIANTS, strict=True):
        m = metrics[variant]
        assert m["iterations"] == 10
        for column in ("AR100", "AR1k", "ARm1k", "AP", "AP50", "APs"):
            assert row[COLUMNS.index(column)] == ("n/a" if m[column] < 0 else f"{100 * m[column]:.1f}")
        assert row[-2:] == [f"{m['train_images_per_s']:.2f}", f"{m['test_ms_per_image']:.1f}"]

    # Each row came from its own MLflow run: tagged with the variant, trained with that pyramid,
    # holding the same evaluation and the same measured throughput (which differ between runs).
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags.get("variant") for r in runs) == sorted(VARIANTS), "one run per variant"
    table_text = (tmp_path / "reports/ablation.md").read_text()
    by_variant = {r.data.tags["variant"]: r for r in runs}
    for variant in VARIANTS:
        run, m = by_variant[variant], metrics[variant]
        assert run.info.status == "FINISHED"
        assert run.data.params["model.pyramid"] == variant
        assert run.data.params["train.iterations"] == "10"
        assert run.data.metrics["eval/AP"] == m["AP"]
        assert run.data.metrics["eval/proposal_AR1k"] == m["AR1k"]
        assert run.data.metrics["final_images_per_s"] == pytest.approx(m["train_images_per_s"], rel=1e-12)
        assert 1000 * run.data.metrics["eval/eval_seconds_per_image"] == pytest.approx(m["test_ms_per_image"])
        assert (
            f"- {variant}: Ray Train `{run.data.tags['run_name']}`, MLflow run `{run.info.run_id}`"
            in table_text
        )
    assert by_variant["fpn"].info.run_id != by_variant["single_c5"].info.run_id
    assert by_variant["fpn"].data.tags["run_name"] != by_variant["single_c5"].data.tags["run_name"]
    rates = [metrics[v]["train_images_per_s"] for v in VARIANTS]
    assert rates[0] != rates[1], "two measurements, not one copied"

    # Again: nothing is recomputed, the outputs are the same bytes, no new MLflow run.
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/*/result.json")}
    before = {
        name: (tmp_path / name).read_bytes() for name in ("reports/ablation.md", "metrics/ablation.json")
    }
    assert len(kept) == 2
    stdout = run_stage(ray_cluster, tmp_path, data)
    assert "2 variants (2 kept" in stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert len(client.search_runs([experiment.experiment_id])) == 2

    # A variant whose kept result is gone: its Ray run (same name) resumes from its final
    # checkpoint instead of training again, and continues the same MLflow run.
    c5_result = next(p for p in kept if p.parent.parent.name == "single_c5")
    c5_result.unlink()
    stdout = run_stage(ray_cluster, tmp_path, data)
    assert "2 variants (1 kept" in stdout
    train_json = json.loads((c5_result.parent / "train.json").read_text())
    assert train_json["iterations"] == 10 and train_json["attempts"] == 2, "resumed, not retrained"
    assert json.loads(c5_result.read_text())["mlflow_run_id"] == by_variant["single_c5"].info.run_id
    assert len(client.search_runs([experiment.experiment_id])) == 2
