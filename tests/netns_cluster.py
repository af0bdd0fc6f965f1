"""A real Ray cluster whose nodes share nothing but a network: one network namespace per node.

`tests.ray_cluster` runs every node on 127.0.0.1 with one filesystem, so nothing there can show a
node that cannot reach what the driver can. Here:

* the head node runs in a network namespace of its own (``ip netns exec <head ns> ray start
  --head``), with a bridge (``br0``, ``<subnet>.1``) and its loopback up;
* each worker node runs in another namespace, joined to the head's bridge by a veth pair
  (``<subnet>.2``, ``.3``, ...), and in a mount namespace of its own (``unshare -m``) with a
  tmpfs over `NetnsRayCluster.private`: files the driver writes there exist only for the head
  node and the driver. Everything else on this machine's filesystem (`NetnsRayCluster.shared`,
  the checkout, the virtualenv) stands for NFS: every node sees it at the same path;
* the driver runs in the head's namespace: `NetnsRayCluster.run_in_head` runs a command there
  with ``RAY_ADDRESS=<head ip>:<port>`` and the cluster's token (``RAY_AUTH_MODE=token``,
  ``RAY_AUTH_TOKEN``), so ``127.0.0.1`` means the head node, as it would on a real head machine.

Every namespace name carries this process's pid (``fpnrt<pid>c<n>h``, ``...w<k>``); all links
live inside the namespaces (the bridge in the head's), so nothing is added to the machine's own
network, and traffic goes only between these namespaces. `NetnsRayCluster.stop` (always run by
`netns_ray_cluster` and the `netns_cluster` fixture, test failed or not) kills every process in
the namespaces by the PIDs ``ip netns pids`` lists (never ``ray stop``, which stops every Ray
node of the machine), deletes the namespaces (their veths and bridge go with them) and removes
the temp dir. Namespaces and temp dirs left by an earlier session that was killed (its pid gone) are
cleared the same way on the next start.

Needs root and ``ip``/``unshare``; otherwise (or when a namespace cannot be made) the tests skip
with the reason. Use from a test module (mark the tests ``@pytest.mark.slow``)::

    from tests.netns_cluster import NetnsRayCluster, netns_cluster  # noqa: F401 (the fixture)

or ``with netns_ray_cluster(workers=2) as cluster: ...`` for another shape.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PREFIX = "fpnrt"  # every namespace this helper makes starts with it: fpnrt<pid>c<n>h / ...w<k>
PORT = 6379  # the GCS port: free in a fresh namespace
DASHBOARD_PORT = (
    8265  # Ray's default: the job server ``ray job submit --address http://<head ip>:8265`` reaches
)
START_TIMEOUT_S = 90
TEMP_PARENT = "/tmp"  # each cluster's temp dir: /tmp/<cluster name>-<random>
IFNAME = (
    "fpn0"  # the cluster network's interface in every namespace: the head's bridge, each worker's veth end
)
_counter = itertools.count(1)


class NetnsUnavailable(RuntimeError):
    """This machine cannot make the namespaces (not root, no ``ip``/``unshare``, no netns support)."""


@dataclass
class NetnsRayCluster:
    """A running cluster: the head's namespace and IP, the workers', and where things live."""

    head_ns: str
    worker_ns: list[str]
    head_ip: str
    worker_ips: list[str]
    token: str = field(repr=False)
    root: Path  # the temp dir: head/ and w<k>/ (the nodes' Ray temp dirs), private/, shared/
    start_s: float = 0.0  # how long `start_netns_cluster` took
    port: int = PORT
    worker_start: list[str] = field(
        default_factory=list, repr=False
    )  # a worker node's command, less its address
    node_env: Mapping[str, str] = field(default_factory=dict, repr=False)  # every node's environment

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the cluster, workers first."""
        return [*self.worker_ns, self.head_ns]

    @property
    def address(self) -> str:
        """The GCS address (``RAY_ADDRESS``) as the head's namespace reaches it."""
        return f"{self.head_ip}:{self.port}"

    @property
    def private(self) -> Path:
        """A directory only the head node and the driver see: the worker nodes have an empty tmpfs there."""
        return self.root / "private"

    @property
    def shared(self) -> Path:
        """A directory every node sees at the same path (NFS, as far as the nodes can tell)."""
        return self.root / "shared"

    @property
    def client_env(self) -> dict[str, str]:
        """What a driver needs: the address and the token."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment pointed at the cluster (for a driver run with `run_in_head`)."""
        return {**os.environ, **self.client_env, **extra}

    def in_head(self, command: Sequence[str]) -> list[str]:
        """``command`` prefixed to run in the head's network namespace."""
        return ["ip", "netns", "exec", self.head_ns, *command]

    def popen_in_head(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                      **kwargs: object) -> subprocess.Popen:  # fmt: skip
        """Start ``command`` in the head's namespace (`stop` kills it with the namespace's other processes)."""
        return subprocess.Popen(self.in_head(command), env=dict(env or self.env()), **kwargs)  # type: ignore[call-overload]

    def run_in_head(self, command: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
                    cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run ``command`` in the head's namespace as a driver (`env` by default); kill it on timeout."""
        with self.popen_in_head(
            command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # ``ip netns exec`` execs the command: its process group is the command and its children
                os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
                raise AssertionError(f"{command} timed out after {timeout} s:\n{stderr[-3000:]}") from None
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    @property
    def dashboard(self) -> str:
        """The job server's address (``ray job submit --address``), when started with ``dashboard=True``."""
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    def in_worker(self, k: int, command: Sequence[str]) -> list[str]:
        """``command`` prefixed to run on worker node ``k`` (1-based): its network and mount namespaces,
        so it sees that node's own `private` tmpfs, as a shell on that machine would."""
        pids = _netns_pids(self.worker_ns[k - 1])
        if not pids:
            raise RuntimeError(f"worker node {k} ({self.worker_ns[k - 1]}) runs no process")
        return ["nsenter", "--target", str(min(pids)), "--net", "--mount", "--", *command]

    def start_worker_node(self, k: int) -> None:
        """Start worker node ``k`` (1-based) in its namespace, with a fresh private tmpfs: at cluster
        start, or again after `kill_worker_node` (a machine rejoining the cluster)."""
        ns, ip = self.worker_ns[k - 1], self.worker_ips[k - 1]
        command = ["ip", "netns", "exec", ns, *self.worker_start, "--node-ip-address", ip,
                   "--temp-dir", str(self.root / f"w{k}")]  # fmt: skip
        _ray_start(command, self.node_env, self.root / f"w{k}" / "ray_start.log")

    def kill_worker_node(self, k: int) -> None:
        """SIGKILL every process of worker node ``k`` (its raylet, its Ray workers, all of it)."""
        pids = _netns_pids(self.worker_ns[k - 1])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _kill_pids(pids)  # waits until they are gone

    def stop(self) -> None:
        """Kill every process in the namespaces, delete them (veths and bridge go too), remove the temp dir."""
        _clear_namespaces(self.namespaces)
        shutil.rmtree(self.root, ignore_errors=True)


def skip_reason() -> str | None:
    """Why this machine cannot run the cluster (None when it can, as far as can be told without trying)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "unshare", "mount", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (iproute2 / util-linux)"
    return None


def start_netns_cluster(workers: int = 1, *, cpus_per_node: int = 1, subnet: str = "10.77.0",
                        object_store_mb: int = 100, head_cpus: int | None = None, dashboard: bool = False,
                        private_mb: int = 16, node_env: Mapping[str, str] | None = None) -> NetnsRayCluster:  # fmt: skip
    """Make the namespaces and start the head and ``workers`` worker nodes; return once all are alive.

    ``head_cpus``: the head node's CPUs (default ``cpus_per_node``; 0 keeps training off it).
    ``dashboard``: run Ray's dashboard on the head (``<head ip>:8265``; ``ray job submit`` needs it).
    ``private_mb``: the size of each worker node's tmpfs over `NetnsRayCluster.private`.
    ``node_env``: extra environment of every node's Ray processes (e.g. the S3 endpoint and credentials).

    Raises `NetnsUnavailable` when the namespaces cannot be made (the fixture skips on it) and
    RuntimeError, with the node's log, when a node does not start. Stops what it started on any error.
    """
    reason = skip_reason()
    if reason:
        raise NetnsUnavailable(reason)
    _clear_stale_namespaces()
    started = time.perf_counter()
    name = f"{PREFIX}{os.getpid()}c{next(_counter)}"
    # A short temp dir: Ray's unix sockets live under it and their paths are length-limited.
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=TEMP_PARENT))
    cluster = NetnsRayCluster(
        head_ns=f"{name}h", worker_ns=[f"{name}w{k}" for k in range(1, workers + 1)],
        head_ip=f"{subnet}.1", worker_ips=[f"{subnet}.{k + 1}" for k in range(1, workers + 1)],
        token=secrets.token_hex(16), root=root,
    )  # fmt: skip
    try:
        for sub in ("private", "shared", "head", *(f"w{k}" for k in range(1, workers + 1))):
            (root / sub).mkdir()
        _make_network(cluster)
        node_args = ["--object-store-memory", str(object_store_mb * 2**20), "--disable-usage-stats"]
        head_args = ["--num-cpus", str(cpus_per_node if head_cpus is None else head_cpus), *node_args]
        worker_args = ["--num-cpus", str(cpus_per_node), *node_args]
        head_dashboard = (["--dashboard-host", cluster.head_ip, "--dashboard-port", str(DASHBOARD_PORT)]
                          if dashboard else ["--include-dashboard", "false"])  # fmt: skip
        ray = str(Path(sys.executable).parent / "ray")
        # Every node's hostname is this machine's, which no namespace can bind: gloo (CPU DDP) is
        # told its interface, as on real machines whose hostname resolves to 127.0.1.1.
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": cluster.token,
            "GLOO_SOCKET_IFNAME": IFNAME,
            **(node_env or {}),
        }
        env.pop("RAY_ADDRESS", None)
        _ray_start(
            cluster.in_head([ray, "start", "--head", "--port", str(cluster.port), "--node-ip-address", cluster.head_ip,
                             "--temp-dir", str(root / "head"), *head_dashboard, *head_args]),
            env, root / "head" / "ray_start.log",
        )  # fmt: skip
        # Its own mount namespace, a tmpfs over `private`, then the node: it and everything it
        # starts see the empty tmpfs; the mount goes when the last of them exits.
        cluster.worker_start = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f'mount -t tmpfs -o size={private_mb}m fpn-private "$0" && exec "$@"',
                                str(cluster.private), ray, "start", "--address", cluster.address, *worker_args]  # fmt: skip
        cluster.node_env = env
        for k in range(1, workers + 1):
            cluster.start_worker_node(k)
        _wait_alive(cluster, 1 + workers)
    except BaseException:
        cluster.stop()
        raise
    cluster.start_s = time.perf_counter() - started
    return cluster


@contextlib.contextmanager
def netns_ray_cluster(workers: int = 1, **kwargs: object) -> Iterator[NetnsRayCluster]:
    """`start_netns_cluster` for a block (skips the test when namespaces are unavailable); always stopped."""
    try:
        cluster = start_netns_cluster(workers, **kwargs)  # type: ignore[arg-type]
    except NetnsUnavailable as err:
        pytest.skip(f"no network-namespace Ray cluster here: {err}")
    print(f"netns Ray cluster ({1 + workers} nodes) started in {cluster.start_s:.1f} s")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def netns_cluster() -> Iterator[NetnsRayCluster]:
    """A head node and one worker node, each in its own network namespace (see the module docstring)."""
    with netns_ray_cluster(workers=1) as cluster:
        yield cluster


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _make_network(cluster: NetnsRayCluster) -> None:
    """The namespaces with loopback up; a bridge in the head's, one veth pair per worker on it."""
    created = _ip("netns", "add", cluster.head_ns, check=False)
    if created.returncode != 0:
        raise NetnsUnavailable(f"ip netns add failed: {created.stderr.strip()}")
    head = cluster.head_ns
    steps = [
        f"-n {head} link set lo up",
        f"-n {head} link add {IFNAME} type bridge",
        f"-n {head} addr add {cluster.head_ip}/24 dev {IFNAME}",
        f"-n {head} link set {IFNAME} up",
    ]
    for k, (ns, ip) in enumerate(zip(cluster.worker_ns, cluster.worker_ips, strict=True), start=1):
        steps += [
            f"netns add {ns}",
            f"-n {ns} link set lo up",
            f"-n {head} link add w{k} type veth peer name {IFNAME} netns {ns}",  # made in the head's namespace
            f"-n {head} link set w{k} master {IFNAME} up",
            f"-n {ns} addr add {ip}/24 dev {IFNAME}",
            f"-n {ns} link set {IFNAME} up",
        ]
    for step in steps:
        done = _ip(*step.split(), check=False)
        if done.returncode != 0:
            raise NetnsUnavailable(f"ip {step} failed: {done.stderr.strip()}")


def _ray_start(command: list[str], env: Mapping[str, str], log_path: Path) -> None:
    """``ray start`` (not ``--block``: it returns once the node runs; its processes stay in the namespace)."""
    with log_path.open("wb") as log:
        done = subprocess.run(
            command, env=dict(env), stdout=log, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:8])} ... failed:\n{log_path.read_text(errors='replace')[-3000:]}"
        )


_COUNT_ALIVE = """
import sys, time, ray
ray.init(log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < int(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.5)
print(alive)
"""


def _wait_alive(cluster: NetnsRayCluster, nodes: int) -> None:
    """A driver in the head's namespace connects and sees ``nodes`` alive nodes (else RuntimeError)."""
    done = cluster.run_in_head(
        [sys.executable, "-c", _COUNT_ALIVE, str(nodes), "60"], timeout=START_TIMEOUT_S
    )
    if done.returncode != 0 or done.stdout.strip() != str(nodes):
        logs = "\n".join(
            f"--- {path}\n{path.read_text(errors='replace')[-1500:]}"
            for path in cluster.root.glob("*/ray_start.log")
        )
        raise RuntimeError(
            f"{nodes} nodes did not come up: {done.stdout[-500:]} {done.stderr[-2000:]}\n{logs}"
        )


def _netns_pids(ns: str) -> list[int]:
    """PIDs in namespace ``ns`` (``ip netns pids``)."""
    listed = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in listed.stdout.split()] if listed.returncode == 0 else []
    return [pid for pid in pids if pid != os.getpid()]


def _kill_pids(pids: Sequence[int], grace_s: float = 3.0) -> None:
    """SIGTERM ``pids``, SIGKILL what is left after ``grace_s``, and wait until they are gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while (pids := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids:
            return


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _clear_namespaces(namespaces: Sequence[str]) -> None:
    """Kill every process in each namespace (workers first), then delete the namespaces."""
    for ns in namespaces:
        _kill_pids(_netns_pids(ns))
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)


def _clear_stale_namespaces() -> None:
    """Clusters of this helper whose pytest process is gone (it was killed): their namespaces and temp dirs."""
    listed = _ip("netns", "list", check=False).stdout
    stale: dict[str, list[str]] = {}  # cluster name -> its namespaces
    for line in listed.splitlines():
        match = re.match(rf"(({PREFIX}(\d+)c\d+)[hw]\d*)\b", line.strip())
        if match and not _alive(int(match.group(3))):
            stale.setdefault(match.group(2), []).append(match.group(1))
    for name, namespaces in stale.items():
        _clear_namespaces(sorted(namespaces, key=lambda ns: ns.endswith("h")))  # workers first
        for root in Path(TEMP_PARENT).glob(f"{name}-*"):
            shutil.rmtree(root, ignore_errors=True)
