"""The one Ray connection, and whether a request fits the cluster.

* `connect()` joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else
  starts a local one. Every stage connects through here, so they all behave alike: a
  ``host:port`` address nothing listens on fails at once (Ray itself retries for minutes),
  and a local cluster's processes know its dashboard address (Ray Train's placement-group
  cleaner reaches the state API through it; without it, with more than one Ray cluster on the
  machine, a trial stopped by ASHA keeps its CPUs). The dashboard port is picked before
  ``ray.init`` (the workers' environment is fixed then, so Ray's own choice, readable only
  afterwards, comes too late) and may be taken by another process before the dashboard binds
  it: ``ray.init`` is then tried again on a new port, up to `DASHBOARD_ATTEMPTS` times, after
  stopping what the failed attempt had started.
* `connected()` is the same as a context manager that shuts down what it started.
* `check_fits()` compares ``runs`` training runs of ``train.num_workers`` workers with what a
  cluster (or this machine) has, so a request that can never schedule fails with the key to
  change instead of Ray waiting forever.

Ray is imported inside these functions: importing it costs about a second and pulls in much,
and stages that never use Ray (fetch, ``--no-ray`` runs) should not pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping

import psutil

from pipeline.config import ConfigError, Params

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
DASHBOARD_ATTEMPTS = 3  # dashboard ports tried when each turns out to be taken
# How Ray 2.60 says the dashboard port is taken: its own check before starting the dashboard
# ("... because it's already occupied"), or the dashboard's log when it lost the race to bind.
_PORT_TAKEN = ("already occupied", "address already in use")


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or started; the message names the address."""


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def connect(*, log_to_driver: bool = True, dashboard: bool = True) -> str:
    """Join ``RAY_ADDRESS``'s cluster, else start a local one; return where, for messages.

    A process already connected stays on its cluster. ``log_to_driver`` forwards the workers'
    output to this process; ``dashboard`` (local clusters only) starts the dashboard on
    127.0.0.1 at a free port.
    """
    import ray

    if ray.is_initialized():
        return "the connected Ray cluster"
    address = os.environ.get(ADDRESS_ENV, "").strip() or None
    where = f"the Ray cluster at {ADDRESS_ENV}={address}" if address else "a local Ray cluster"
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=log_to_driver)
        elif dashboard:
            _start_with_dashboard(log_to_driver=log_to_driver)
        else:
            ray.init(include_dashboard=False, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot start or join {where}: {err}") from None
    return where


def _start_with_dashboard(*, log_to_driver: bool) -> None:
    """Start a local cluster with its dashboard on 127.0.0.1 at a free port; retry a taken port.

    A port taken between picking it and the dashboard binding it makes ``ray.init`` fail after
    it started the head's first processes (GCS server, ...), which Ray does not stop; they are
    stopped here (`_stop_new_ray_children`) before the next attempt.
    """
    import ray

    for attempt in range(1, DASHBOARD_ATTEMPTS + 1):
        port = _free_port()
        before = _child_pids()
        try:
            ray.init(
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
                log_to_driver=log_to_driver,
            )
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when the dashboard dies
            if not any(sign in str(err).lower() for sign in _PORT_TAKEN):
                raise
            _stop_new_ray_children(before)
            if attempt == DASHBOARD_ATTEMPTS:
                raise RuntimeError(
                    f"the dashboard port was taken {DASHBOARD_ATTEMPTS} times in a row (last 127.0.0.1:{port})"
                ) from err
            log.warning("Ray dashboard port 127.0.0.1:%d was taken; starting Ray again on another port", port)


def _child_pids() -> set[int]:
    """PIDs of this process's children and their descendants."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _stop_new_ray_children(before: set[int]) -> None:
    """Kill this process's descendants not in ``before`` that run Ray's code (what a failed start left).

    Only processes whose command line names the Ray package's folder (GCS server, monitor,
    reaper, dashboard) are killed: a child another thread started meanwhile is left alone.
    """
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    stopped = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in before:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if ray_dir in " ".join(child.cmdline()):
                child.kill()
                stopped.append(child)
    psutil.wait_procs(stopped, timeout=10)


@contextlib.contextmanager
def connected(*, log_to_driver: bool = True, dashboard: bool = True) -> Iterator[str]:
    """`connect()` for a block; shuts Ray down afterwards only if this call started it."""
    import ray

    started_here = not ray.is_initialized()
    where = connect(log_to_driver=log_to_driver, dashboard=dashboard)
    try:
        yield where
    finally:
        if started_here:
            ray.shutdown()


def resources() -> dict[str, float]:
    """Total ``{"CPU": ..., "GPU": ...}`` of the connected Ray cluster."""
    import ray

    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def node_count() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_tracking_reachable(uri: str, nodes: int, where: str) -> None:
    """A tracking store in a file on the driver's machine cannot serve ranks on other nodes.

    ``uri`` is the MLflow tracking URI the run will use; ``nodes`` the cluster's alive nodes.
    On one node any store works; on more, ``sqlite:``/``file:`` (or a bare path) is refused
    with what to run instead, rather than ranks elsewhere silently logging nothing.
    """
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("sqlite:") else "file"
    if nodes > 1 and scheme in ("sqlite", "file"):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI: {uri} is a file on this machine, but {where} has {nodes} nodes and "
            "ranks on the others cannot reach it. Start a tracking server every node can reach "
            "(mlflow server --host <private ip> --backend-store-uri sqlite:///... --artifacts-destination "
            "s3://... , see the README) and set MLFLOW_TRACKING_URI=http://<that ip>:5000"
        )


def check_fits(
    params: Params, resources: Mapping[str, float], where: str, *, runs: int = 1, runs_key: str = ""
) -> None:
    """``runs`` runs of ``train.num_workers`` workers must fit ``resources`` at once, else `ConfigError`.

    ``resources`` is ``{"CPU": 2.0, "GPU": 0.0}`` of a Ray cluster or of this machine; ``where``
    names it in the message; ``runs_key`` is the params key that sets ``runs`` (named first in
    the message when ``runs > 1``).
    """
    t = params.train
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    if t.use_gpu and gpus < 1:
        raise ConfigError(f"train.use_gpu: true, but {where} has no GPU; set train.use_gpu: false")
    workers = runs * t.num_workers
    many = f"{runs_key}: {runs} runs x " if runs > 1 else ""
    if t.use_gpu and gpus < workers:
        key = "" if many else "train.num_workers: "
        raise ConfigError(
            f"{many or key}{t.num_workers} workers with one GPU each, but {where} has {gpus:g} GPUs"
        )
    needed = workers * t.cpus_per_worker
    if needed > cpus + 1e-9:
        key = "" if many else "train.cpus_per_worker: "
        raise ConfigError(
            f"{many or key}{t.num_workers} workers x {t.cpus_per_worker:g} CPUs = {needed:g} CPUs, "
            f"but {where} has {cpus:g}; lower train.cpus_per_worker or train.num_workers"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_reachable(address: str) -> None:
    """Fail at once on a ``host:port`` address nothing listens on (Ray itself retries for minutes)."""
    match = re.fullmatch(r"([^:/]+):(\d+)", address)
    if not match:  # "auto", "local" or ray://: left to Ray
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=5).close()
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {ADDRESS_ENV}={address} ({err})") from None
