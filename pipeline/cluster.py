"""The one Ray connection, and whether a request fits the cluster.

* `connect()` joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else
  starts a local one. Joining a cluster ships the project's code to its nodes as Ray's
  ``working_dir`` (`pipeline.runtime_env`), unless the process already runs in a Ray job's
  working dir. Every stage connects through here, so they all behave alike: a
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
  cluster (or this machine) has, in total and node by node (a worker runs whole on one node), so a request that can never schedule fails with the key to
  change instead of Ray waiting forever.
* `check_nodes()` checks from every node of a multi-node cluster, with one small task each,
  that the data, the storage path, the starting weights and the tracking server are there, so
  a path only the driver's machine has fails at start naming the node, not minutes later in a
  rank's traceback.

Ray is imported inside these functions: importing it costs about a second and pulls in much,
and stages that never use Ray (fetch, ``--no-ray`` runs) should not pay for it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline.config import ConfigError, Params
from pipeline.ddp_address import gloo_address_problem
from pipeline.ports import free_port
from pipeline.runtime_env import code_runtime_env
from pipeline.storage import (
    is_uri,
    join_location,
    location_exists,
    open_location,
    read_location,
    remove_file,
    write_empty_file,
)

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

    A process already connected stays on its cluster. Joining ``RAY_ADDRESS``'s cluster ships
    the project (`pipeline.runtime_env.code_runtime_env`); a local cluster needs no shipping.
    ``log_to_driver`` forwards the workers' output to this process; ``dashboard`` (local
    clusters only) starts the dashboard on 127.0.0.1 at a free port.
    """
    import ray

    if ray.is_initialized():
        return "the connected Ray cluster"
    address = os.environ.get(ADDRESS_ENV, "").strip() or None
    where = f"the Ray cluster at {ADDRESS_ENV}={address}" if address else "a local Ray cluster"
    try:
        if address:
            _check_reachable(address)
            runtime_env = code_runtime_env()
            if runtime_env:
                log.info(
                    "shipping the project at %s to %s (Ray runtime_env working_dir)",
                    runtime_env["working_dir"],
                    where,
                )
            ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
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
        port = free_port()
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


def node_resources() -> list[dict[str, float]]:
    """``{"CPU": ..., "GPU": ...}`` of each alive node of the connected Ray cluster."""
    import ray

    return [
        {"CPU": float(n["Resources"].get("CPU", 0.0)), "GPU": float(n["Resources"].get("GPU", 0.0))}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def workers_per_node(params: Params, nodes: Sequence[Mapping[str, float]]) -> list[int]:
    """How many training workers (``train.cpus_per_worker`` CPUs, one GPU with ``train.use_gpu``) fit on each node.

    Ray places each worker whole on one node: 1.5 CPUs on each of two nodes fit no 2-CPU worker.
    """
    t = params.train
    fits = []
    for node in nodes:
        by_cpu = int(node.get("CPU", 0.0) / t.cpus_per_worker + 1e-9)
        fits.append(min(by_cpu, int(node.get("GPU", 0.0) + 1e-9)) if t.use_gpu else by_cpu)
    return fits


def check_fits(
    params: Params,
    resources: Mapping[str, float],
    where: str,
    *,
    runs: int = 1,
    runs_key: str = "",
    nodes: Sequence[Mapping[str, float]] = (),
) -> None:
    """``runs`` runs of ``train.num_workers`` workers must fit ``resources`` at once, else `ConfigError`.

    ``resources`` is ``{"CPU": 2.0, "GPU": 0.0}`` of a Ray cluster or of this machine; ``where``
    names it in the message; ``runs_key`` is the params key that sets ``runs`` (named first in
    the message when ``runs > 1``). ``nodes`` (`node_resources`, a cluster's) also checks that
    each worker fits whole on one node (`workers_per_node`), not only in the totals.
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
    if nodes:
        _check_fits_on_nodes(params, nodes, where, workers, many)


def _check_fits_on_nodes(
    params: Params, nodes: Sequence[Mapping[str, float]], where: str, workers: int, many: str
) -> None:
    """`check_fits` by node: ``workers`` whole workers must find a node each."""
    t = params.train
    fits = workers_per_node(params, nodes)
    if sum(fits) >= workers:
        return
    one = f"{t.cpus_per_worker:g} CPUs" + (" and 1 GPU" if t.use_gpu else "")
    sizes = ", ".join(f"{n.get('CPU', 0.0):g} CPUs/{n.get('GPU', 0.0):g} GPUs" for n in nodes)
    raise ConfigError(
        f"{many or 'train.cpus_per_worker: '}{t.num_workers} workers of {one} each, and a worker runs whole "
        f"on one node: the nodes of {where} ({sizes}) hold {sum(fits)} at once, not {workers}; lower "
        "train.cpus_per_worker or train.num_workers"
    )


DATA_HINT = "the data must be on storage every node sees at the same path: NFS"
STORAGE_HINT = "the storage path must be storage every node sees at the same path: NFS, or s3://"
OBJECT_STORE_HINT = (
    "every node needs the bucket's credentials and endpoint in the environment of its Ray processes: "
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL"
)
TRACKING_HINT = "every node must reach the tracking server at that address"
LOOPBACK_HINT = "on each node that names the node itself: give the tracking server's private IP"


@dataclass(frozen=True)
class NodeChecks:
    """What `probe_node` checks on one node (paths as the driver names them)."""

    files: tuple[tuple[str, str], ...]  # (path, hint): each must be readable
    storage: str | None  # the storage folder or URI: `probe` must be visible in it, and it writable
    probe: str | None  # the file (object) the driver wrote into `storage`
    tracking_uri: str | None  # an http(s) MLflow URI whose /health must answer
    timeout_s: float = 5.0  # for each check
    # CPU DDP across nodes: gloo must advertise a reachable address (`pipeline.ddp_address`).
    gloo: bool = False


def _split_files(root: str, split: str) -> list[str]:
    """``<root>/<split>``'s split.json, index.parquet and the shards split.json lists (as far as
    this driver can read it: a node then reports what it cannot read); paths or URIs."""
    from pipeline.dataset import INDEX_FILE, SPLIT_FILE  # lazy: it imports torch, this module does not

    folder = join_location(root, split)
    try:
        shards = json.loads(read_location(join_location(folder, SPLIT_FILE))).get("shards", [])
    except (OSError, ValueError, AttributeError):
        shards = []
    return [join_location(folder, name) for name in (SPLIT_FILE, INDEX_FILE, *map(str, shards))]


def probe_node(checks: NodeChecks) -> list[str]:
    """Run ``checks`` where this process runs (a Ray task on the node); one line per problem, [] if none."""
    problems: list[str] = []
    for path, hint in checks.files:
        failed = _within(checks.timeout_s, lambda p=path: _read_a_byte(p))
        if failed:
            problems.append(f"cannot read {path}: {failed} ({hint})")
    if checks.storage and checks.probe:
        probe = checks.probe
        hint = OBJECT_STORE_HINT if is_uri(probe) else STORAGE_HINT
        seen = _within(checks.timeout_s, lambda: None if location_exists(probe) else "absent")
        if seen is not None:
            why = "" if seen == "absent" else f": {seen}"
            problems.append(f"cannot see {probe}, which the driver wrote into the storage path{why} ({hint})")
        else:
            mine = f"{probe}-{secrets.token_hex(4)}"  # this node's own file: written, then removed
            failed = _within(checks.timeout_s, lambda: _write_and_remove(mine))
            if failed:
                problems.append(f"cannot write to {checks.storage}: {failed} ({hint})")
    if checks.tracking_uri:
        uri = checks.tracking_uri
        failed = _within(checks.timeout_s, lambda: _health(uri, checks.timeout_s))
        if failed:
            host = urllib.parse.urlsplit(uri).hostname or ""
            hint = (
                LOOPBACK_HINT
                if host == "localhost" or host.startswith("127.") or host == "::1"
                else TRACKING_HINT
            )
            problems.append(f"cannot reach the MLflow tracking server {uri}: {failed} ({hint})")
    if checks.gloo and (problem := gloo_address_problem()):
        problems.append(problem)
    return problems


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a hostname
        return address == "localhost"


def nodes_message(where: str, nodes: int, failures: Sequence[tuple[str, Sequence[str]]]) -> str:
    """One line for `ConfigError`: each failing node's IP and each thing it could not reach."""
    lines = "; ".join(f"node {ip}: {problem}" for ip, problems in failures for problem in problems)
    return f"not every node of {where} reaches what the run needs (checked from each of its {nodes} nodes): {lines}"


def check_nodes(
    data_root: str | Path,
    split: str,
    storage: str,
    tracking_uri: str,
    *,
    gloo: bool = False,
    where: str = "the Ray cluster",
    timeout_s: float = 5.0,
    answer_timeout_s: float = 60.0,
) -> None:
    """From every alive node, what a run reads and writes must be reachable, else one `ConfigError`.

    One task per node (``num_cpus=0``, pinned with a hard node affinity, so it runs even when
    training workers hold every CPU) runs `probe_node`: the data's ``categories.json`` and
    ``<split>/``'s split.json, index.parquet and shards readable, a ``storage`` folder or
    object-store URI shared (it sees a probe file the driver writes there first, removed
    afterwards with any folder made for it) and writable, an http(s) ``tracking_uri`` answering
    ``/health``: each within ``timeout_s``; with ``gloo`` (CPU DDP over several workers), an
    address gloo can advertise (`pipeline.ddp_address.gloo_address_problem`; not when the nodes
    share one address or are all on loopback: one machine, where loopback works). A node that does
    not answer in ``answer_timeout_s`` is reported too. On one node nothing is checked: the driver has read the data already.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return
    root = str(data_root)
    files = [
        (path, DATA_HINT) for path in [join_location(root, "categories.json"), *_split_files(root, split)]
    ]
    web = tracking_uri if tracking_uri.startswith(("http://", "https://")) else None
    task = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    failures: list[tuple[str, Sequence[str]]] = []
    with _storage_probe(storage) as probe:
        addresses = {node["NodeManagerAddress"] for node in nodes}
        one_host = len(addresses) == 1 or all(map(_is_loopback, addresses))  # loopback works there
        checks = NodeChecks(tuple(files), storage, probe, web, timeout_s, gloo and not one_host)
        refs = {
            task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(checks): node["NodeManagerAddress"]
            for node in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=answer_timeout_s)
        for ref in ready:
            try:
                problems = ray.get(ref)
            except ray.exceptions.RayError as err:
                problems = [f"the check task failed ({type(err).__name__}: {str(err).splitlines()[0]})"]
            if problems:
                failures.append((refs[ref], problems))
        for ref in pending:
            ray.cancel(ref, force=True)
            failures.append((refs[ref], [f"did not answer the checks in {answer_timeout_s:g} s"]))
    if failures:
        raise ConfigError(nodes_message(where, len(nodes), sorted(failures)))


@contextlib.contextmanager
def _storage_probe(storage: str) -> Iterator[str]:
    """A file with a random name in ``storage`` (a folder or a URI) for the nodes to look for."""
    if is_uri(storage):
        probe = join_location(storage, f".preflight-{secrets.token_hex(8)}")
        try:
            write_empty_file(probe)
        except OSError as err:  # pyarrow raises OSError subclasses for S3 errors
            raise ConfigError(
                f"storage path {storage}: cannot write there from the driver ({err}); {OBJECT_STORE_HINT}"
            ) from None
        try:
            yield probe
        finally:
            with contextlib.suppress(OSError):
                remove_file(probe)
        return
    folder = Path(storage)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / f".preflight-{secrets.token_hex(8)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as err:
        raise ConfigError(
            f"storage path {storage}: cannot write there from the driver ({err.strerror or err})"
        ) from None
    try:
        yield str(probe)
    finally:
        probe.unlink(missing_ok=True)
        for path in made:  # innermost first; left where a node wrote something after all
            try:
                path.rmdir()
            except OSError:
                break


def _within(timeout_s: float, check: Callable[[], object]) -> str | None:
    """Run ``check`` in a thread (a hung NFS mount must not hang the task); its error, or None when it passed."""
    outcome: list[str | None] = []

    def run() -> None:
        try:
            result = check()
            outcome.append(result if isinstance(result, str) else None)
        except OSError as err:
            outcome.append(str(getattr(err, "reason", None) or err.strerror or err))
        except Exception as err:  # noqa: BLE001 (reported as the node's problem)
            outcome.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer in {timeout_s:g} s"


def _read_a_byte(location: str) -> None:
    """Read the first byte of the file at ``location`` (a path, or a URI through pyarrow)."""
    source = open_location(location)
    with open(source, "rb") if isinstance(source, str) else source as file:
        file.read(1)


def _write_and_remove(location: str) -> None:
    write_empty_file(location)
    remove_file(location)


def _health(uri: str, timeout_s: float) -> str | None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return None if response.status == 200 else f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"/health answered HTTP {err.code}"


def _check_reachable(address: str) -> None:
    """Fail at once on a ``host:port`` address nothing listens on (Ray itself retries for minutes)."""
    match = re.fullmatch(r"([^:/]+):(\d+)", address)
    if not match:  # "auto", "local" or ray://: left to Ray
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=5).close()
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {ADDRESS_ENV}={address} ({err})") from None
