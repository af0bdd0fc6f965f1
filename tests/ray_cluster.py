"""A real local Ray cluster for the tests, started once per pytest session and shared.

``ray start --head --block`` on 127.0.0.1 with its own temp dir, 2 CPUs, the dashboard (for
``ray job submit``) and its own authentication token (Ray's default token file,
``~/.ray/auth_token``, is shared with every other cluster of this user and may be rewritten
under us; clients get the token through ``RAY_AUTH_TOKEN``: use `LocalRayCluster.env`). ``--block`` keeps the command in the foreground; terminating that one
process (by its PID) stops every process it started, and nothing else (``ray stop`` would
stop every Ray cluster of this user on the machine).

Use from a test module::

    from tests.ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401 (the fixture)

Each module's session fixture takes a reference; the cluster stops when the last is released.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from pipeline.ports import free_port

START_TIMEOUT_S = 120


@dataclass
class LocalRayCluster:
    """A running head node: ``address`` (GCS, for ``RAY_ADDRESS``) and ``dashboard`` (jobs API)."""

    address: str
    dashboard: str
    temp_dir: Path
    process: subprocess.Popen = field(repr=False)
    token: str = field(repr=False, default="")
    users: int = 0
    node_env: dict[str, str] = field(repr=False, default_factory=dict)  # what the head was started with
    nodes: list[subprocess.Popen] = field(repr=False, default_factory=list)  # `add_node`'s, oldest first

    @property
    def client_env(self) -> dict[str, str]:
        """What a client needs: the address and the token."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def env(self, **extra: str) -> dict[str, str]:
        """The current environment pointed at this cluster (for a driver or CLI run as a subprocess)."""
        return {**os.environ, **self.client_env, **extra}

    def add_node(self, num_cpus: int = 1) -> None:
        """Join a second (third, ...) node to the cluster: ``ray start --address <head> --block``.

        A node of its own on this machine (its own raylet, node id, worker processes and temp
        dir), as a worker machine would be; returns once the cluster counts it alive. Its own temp
        dir matters: nodes sharing one unpack a job's ``--working-dir`` into the same folder, and
        the second node's unpacking deletes the driver's working directory under it.
        """
        temp_dir = self.temp_dir / f"node{len(self.nodes) + 1}"  # removed with the head's
        temp_dir.mkdir()
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--address", self.address, "--block",
            "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
            "--temp-dir", str(temp_dir),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        ]  # fmt: skip
        log_path = temp_dir / "ray_start.log"
        with log_path.open("wb") as log:
            node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.node_env)
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.alive_nodes() < 1 + len(self.nodes):
            if node.poll() is not None or time.monotonic() > deadline:
                text = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start --address {self.address} did not join:\n{text}")
            time.sleep(1.0)

    def alive_nodes(self) -> int:
        """How many nodes the cluster counts alive (``ray list nodes``)."""
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "list", "nodes", "--address", self.dashboard,
             "--format", "json", "--filter", "state=ALIVE"],
            env=self.env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        try:
            return len(json.loads(listed.stdout)) if listed.returncode == 0 else 0
        except json.JSONDecodeError:
            return 0

    def stop(self) -> None:
        """Terminate ``ray start --block`` (it stops what it started); kill its leftovers after 15 s."""
        for node in reversed(self.nodes):  # worker nodes first, then the head
            _terminate(node)
        _terminate(self.process)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM one ``ray start --block`` process and wait; SIGKILL it and what it started after 15 s."""
    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(started, timeout=5)
    for leftover in alive:
        leftover.kill()


def start_cluster(num_cpus: int = 2) -> LocalRayCluster:
    """Start a head node and wait until its dashboard answers."""
    # A short temp dir: Ray's unix sockets live under it and their paths are length-limited.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))
    port, dashboard_port = free_port(), free_port()
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", str(num_cpus),
        "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir), "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--disable-usage-stats",
        # Ray's fixed default ports (e.g. the job agent's 52365) clash with other clusters on the machine.
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
    ]  # fmt: skip
    log = (temp_dir / "ray_start.log").open("wb")
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # ray.train.report blocks until the controller has collected the previous report, and it
        # polls every 2 s by default: tests that report every step would mostly wait.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        # The state API finds its cluster through this when several run on the machine (else it
        # fails "Found multiple active Ray instances"); Ray Train's placement-group cleaner uses it
        # to free the workers of a run whose controller died (e.g. a Tune trial that ASHA stopped).
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
    }
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # it answers (401 when Ray's token authentication is on: the CLI sends the token)
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            text = (temp_dir / "ray_start.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start did not come up:\n{text}")
        time.sleep(0.5)
    return LocalRayCluster(
        address=f"127.0.0.1:{port}", dashboard=dashboard, temp_dir=temp_dir, process=process, token=token,
        node_env=env,
    )  # fmt: skip


_shared: LocalRayCluster | None = None


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """The session's shared cluster (started on first use, stopped after its last user)."""
    global _shared
    if _shared is None:
        _shared = start_cluster()
    cluster = _shared
    cluster.users += 1
    try:
        yield cluster
    finally:
        cluster.users -= 1
        if cluster.users == 0:
            cluster.stop()
            _shared = None


def registered_checkpoint(storage: Path) -> int:
    """Iteration of the newest checkpoint Ray Train has registered (0: none yet).

    Ray registers a reported checkpoint when its controller next polls the workers (every
    ~2 s): one reported just before a crash may be lost, and the run resumes from the one before.
    """
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except json.JSONDecodeError:
            continue  # being rewritten
        if latest:
            return int(latest["metrics"]["iteration"])
    return 0
