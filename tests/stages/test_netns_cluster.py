"""Stage train on a cluster whose nodes share only a network: the preflight names the node that cannot reach something.

`tests.netns_cluster`: the head node (and the driver) in one network namespace, a worker node in
another with a tmpfs over `NetnsRayCluster.private`, so files the driver writes there do not
exist for the worker node; `NetnsRayCluster.shared` stands for NFS. A small HTTP server in the
head's namespace answers ``/health`` like an MLflow tracking server: on ``<head ip>:<port>``
every node reaches it; as ``127.0.0.1:<port>`` only the head's namespace does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns_cluster import NetnsRayCluster, netns_cluster  # noqa: F401 (the fixture)
from tests.train_samples import tiny_data, tiny_params, write_params

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTH_PORT = 5000  # in the head's namespace: free there

HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), Health)
print("ready", flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def health_server(netns_cluster: NetnsRayCluster) -> Iterator[int]:  # noqa: F811 (the fixture)
    """An HTTP server answering ``/health`` in the head's namespace, on every address there; yields its port."""
    import subprocess

    server = netns_cluster.popen_in_head(
        [sys.executable, "-c", HEALTH_SERVER, str(HEALTH_PORT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield HEALTH_PORT
    finally:
        server.kill()  # the cluster's teardown kills whatever is left in its namespaces too
        server.wait()


def train_in_head(
    cluster: NetnsRayCluster, root: Path, data: Path, tracking_uri: str, **train: object
) -> tuple[int, str, Path]:
    """``python -m stages.train`` (`tiny_params` with ``train``) as a driver in the head's namespace.

    Returns its exit code, its stderr and the output folder (on the shared storage).
    """
    params = write_params(root / "params.yaml", tiny_params(**train))
    out = cluster.shared / root.name / "out"
    command = [
        sys.executable, "-m", "stages.train", "--params", str(params), "--data", str(data),
        "--model-out", str(out / "model.pt"), "--metrics", str(out / "train.json"),
        "--plots", str(out / "loss.csv"), "--storage-path", str(out / "runs"),
    ]  # fmt: skip
    started = time.perf_counter()
    done = cluster.run_in_head(
        command, timeout=240, cwd=REPO_ROOT, env=cluster.env(MLFLOW_TRACKING_URI=tracking_uri)
    )
    print(
        f"stages.train on the netns cluster: exit {done.returncode} in {time.perf_counter() - started:.1f} s"
    )
    return done.returncode, done.stderr, out


def run_train(cluster: NetnsRayCluster, root: Path, data: Path, tracking_uri: str) -> tuple[int, str]:
    """`train_in_head` refused by the preflight: nothing written but the run's lock; exit code and stderr."""
    code, stderr, out = train_in_head(cluster, root, data, tracking_uri)
    written = [p.relative_to(out) for p in out.rglob("*") if p.is_file()] if out.exists() else []
    # Only the run's lock (held from before Ray starts, `pipeline.train.run_lock`); no output, no probe.
    assert all(p.parent == Path("runs") and p.suffix == ".lock" for p in written), written
    return code, stderr


def test_data_only_the_driver_sees_fails_naming_the_worker_node(
    netns_cluster: NetnsRayCluster,  # noqa: F811 (the fixture)
    health_server: int,
) -> None:
    cluster = netns_cluster
    root = cluster.private / "driver-only"
    data = tiny_data(root / "data", train_images=4, val_images=2)
    worker = cluster.worker_ips[0]
    code, stderr = run_train(cluster, root, data, f"http://{cluster.head_ip}:{health_server}")
    assert code == 2, stderr[-3000:]
    assert f"node {worker}: cannot read {data / 'categories.json'}: No such file or directory" in stderr, (
        stderr
    )
    for name in ("split.json", "index.parquet", "shard-00000.parquet"):
        assert f"node {worker}: cannot read {data / 'train2017' / name}" in stderr, stderr
    assert "the data must be on storage every node sees" in stderr
    assert f"node {cluster.head_ip}:" not in stderr, "the head node sees the data"
    error = [line for line in stderr.splitlines() if line.startswith("stages.train: error:")]
    assert len(error) == 1 and "tracking" not in error[0] and "storage path" not in error[0], stderr
    assert "Traceback" not in stderr


def test_a_tracking_server_on_localhost_fails_naming_the_worker_node(
    netns_cluster: NetnsRayCluster,  # noqa: F811 (the fixture)
    health_server: int,
) -> None:
    cluster = netns_cluster
    root = cluster.shared / "everyone"
    data = tiny_data(root / "data", train_images=4, val_images=2)
    uri = f"http://127.0.0.1:{health_server}"  # the head's own loopback: each worker node has its own
    code, stderr = run_train(cluster, root, data, uri)
    assert code == 2, stderr[-3000:]
    worker = cluster.worker_ips[0]
    assert f"node {worker}: cannot reach the MLflow tracking server {uri}: " in stderr, stderr
    assert "Connection refused" in stderr, stderr
    assert f"node {cluster.head_ip}:" not in stderr and "cannot read" not in stderr, stderr
    assert "Traceback" not in stderr


def test_start_weights_only_the_driver_has_reach_the_rank_on_the_other_node(
    netns_cluster: NetnsRayCluster,  # noqa: F811 (the fixture)
    health_server: int,
) -> None:
    import torch
    import torchvision

    cluster = netns_cluster
    root = cluster.shared / "weights"
    data = tiny_data(root / "data", train_images=4, val_images=2)
    torch.manual_seed(5)
    weights = cluster.private / "resnet18.pth"  # only the head's namespace (and the driver) sees it
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    # Two ranks of 1 CPU on two nodes of 1 CPU: one rank runs on the worker node.
    code, stderr, out = train_in_head(
        cluster, root, data, f"http://{cluster.head_ip}:{health_server}",
        init_weights=str(weights), num_workers=2, iterations=2, checkpoint_every=2, log_every=1,
    )  # fmt: skip
    assert code == 0, stderr[-5000:]
    assert "init weights " in stderr and "tensors loaded" in stderr, stderr[-3000:]
    assert (out / "model.pt").is_file() and (out / "train.json").is_file()
