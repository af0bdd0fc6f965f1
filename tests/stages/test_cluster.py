"""The cluster path: stage train submitted with ``ray job submit`` to a real 2-node Ray cluster.

Two nodes on this machine (``ray start --head`` with 1 CPU, then ``ray start --address`` with 1
CPU: its own raylet and node id), 2 training workers of 1 CPU each, so Ray must put one on each
node. The job gets a copy of the repository (``--working-dir``), absolute output paths (its
working directory is a temporary copy) and ``MLFLOW_TRACKING_URI`` pointing at a real tracking
server; the test then checks where everything landed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.model_file import load_model_file
from tests.ray_cluster import LocalRayCluster, start_cluster
from tests.train_samples import tiny_data, tiny_params, write_params

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
ITERATIONS = 4


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalRayCluster]:
    cluster = start_cluster(num_cpus=1)
    try:
        cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


def ray_list(cluster: LocalRayCluster, what: str, *filters: str) -> list[dict]:
    command = [
        RAY,
        "list",
        what,
        "--address",
        cluster.dashboard,
        "--format",
        "json",
        "--detail",
        "--limit",
        "1000",
    ]
    for condition in filters:
        command += ["--filter", condition]
    done = subprocess.run(command, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_train_job_on_two_nodes(two_nodes: LocalRayCluster, mlflow_server: str, tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "data")
    raw = tiny_params(
        num_workers=2, cpus_per_worker=1, iterations=ITERATIONS, checkpoint_every=2, log_every=1
    )
    params = write_params(tmp_path / "params.yaml", raw)
    out = tmp_path / "shared"  # stands for storage every node sees (NFS): absolute paths
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}
    command = [
        RAY, "job", "submit", "--address", two_nodes.dashboard, "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "stages.train", "--params", str(params), "--data", str(data),
        "--model-out", str(out / "models" / "model.pt"), "--metrics", str(out / "metrics" / "train.json"),
        "--plots", str(out / "plots" / "train_loss.csv"), "--storage-path", str(out / "runs"),
        "--status-dir", str(out / "status"),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=two_nodes.env(), capture_output=True, text=True, timeout=600)
    print(
        f"ray job submit (2 nodes, 2 workers, {ITERATIONS} iterations): {time.perf_counter() - started:.0f} s"
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout, done.stdout[-3000:]

    # The outputs landed at the absolute paths given, not in the job's temporary working copy.
    loaded = load_model_file(out / "models" / "model.pt")
    metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert metrics["iterations"] == ITERATIONS and metrics["images_seen"] == ITERATIONS * 2 * 2
    assert (out / "runs" / loaded.extra["run_name"]).is_dir()

    # Both workers ran, each on its own node: the ranks' pids, and the node Ray ran each pid on.
    ranks = [json.loads((out / "status" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == ITERATIONS
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"], "DDP kept the replicas equal"
    workers = ray_list(two_nodes, "actors", "class_name=RayTrainWorker")
    node_of_pid = {actor["pid"]: actor["node_id"] for actor in workers}
    nodes = {node["node_id"] for node in ray_list(two_nodes, "nodes", "state=ALIVE")}
    assert len(nodes) == 2
    used = {node_of_pid[r["pid"]] for r in ranks}
    assert used == nodes, f"ranks {[r['pid'] for r in ranks]} on nodes {used}, cluster nodes {nodes}"

    # The MLflow run exists on the tracking server, with the model file's run id.
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(loaded.extra["mlflow_run_id"])
    assert run.info.status == "FINISHED", f"{run.data.tags.get('error')}\n{done.stdout[-5000:]}"
    assert run.data.tags["run_name"] == loaded.extra["run_name"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, ITERATIONS + 1))
    assert run.data.params["train.num_workers"] == "2"


def test_a_sqlite_store_is_refused_on_two_nodes(two_nodes: LocalRayCluster, tmp_path: Path) -> None:
    """Ranks on the second node could not reach a SQLite file on the driver's machine: refused at start."""
    data = tiny_data(tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", tiny_params(num_workers=2, cpus_per_worker=1))
    out = tmp_path / "out"
    env = {k: v for k, v in two_nodes.env().items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "stages.train", "--params", str(params), "--data", str(data),
         "--model-out", str(out / "model.pt"), "--metrics", str(out / "train.json"),
         "--plots", str(out / "loss.csv"), "--storage-path", str(out / "runs")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "has 2 nodes and ranks on the others cannot reach it" in done.stderr
    assert "Traceback" not in done.stderr
    written = [p.relative_to(out) for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert all(p.suffix == ".lock" for p in written), f"only the run's lock may be written: {written}"
