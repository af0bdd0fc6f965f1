"""Ordered parallel map over chunks of work: in process, on a process pool, or as Ray tasks.

``ordered_map(fn, chunks, ...)`` yields ``fn(chunk, *args)`` for each chunk, in the order of
``chunks``, keeping only a bounded window of chunks in flight (``chunks`` may be a lazy
generator over data much larger than memory, e.g. the bytes of COCO's 118k images).

* ``workers == 1``: in this process (no pickling; easiest to debug).
* otherwise a `ProcessPoolExecutor` of ``workers`` processes (0 = every core this process
  may use).
* ``use_ray``: Ray tasks (one CPU each) on the cluster at ``RAY_ADDRESS``, or on the one
  this process already joined (``ray.init``), or on a new local one. ``fn`` and its
  arguments travel by value, so the nodes need the project installed but no shared
  filesystem: give ``fn`` bytes, not paths.
"""

from __future__ import annotations

import os
import re
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class ParallelError(RuntimeError):
    """The requested parallel backend is not available (e.g. no Ray cluster at RAY_ADDRESS)."""


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_ray_requested(flag: bool) -> bool:
    """Ray is used when asked for in params, or when ``RAY_ADDRESS`` names a cluster."""
    return flag or bool(os.environ.get("RAY_ADDRESS"))


def ordered_map(
    fn: Callable[..., R],
    chunks: Iterable[T],
    *args: Any,
    workers: int = 0,
    use_ray: bool = False,
) -> Iterator[R]:
    """``fn(chunk, *args)`` for every chunk, in order (see the module docstring for the backends)."""
    if use_ray:
        yield from _ray_map(fn, chunks, args)
        return
    workers = workers or available_cores()
    if workers == 1:
        for chunk in chunks:
            yield fn(chunk, *args)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from _windowed(
            lambda chunk: pool.submit(fn, chunk, *args), lambda f: f.result(), chunks, 2 * workers
        )


def _ray_map(fn: Callable[..., R], chunks: Iterable[T], args: tuple[Any, ...]) -> Iterator[R]:
    import ray  # only when asked for: importing Ray costs a second and pulls in much

    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS") or None
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray cluster"
            raise ParallelError(f"cannot start or join {where}: {err}") from None
    try:
        task = ray.remote(num_cpus=1)(fn)
        shared_args = [ray.put(a) for a in args]
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield from _windowed(lambda chunk: task.remote(chunk, *shared_args), ray.get, chunks, window)
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """Fail at once on a ``host:port`` RAY_ADDRESS nothing listens on (Ray itself retries for minutes)."""
    match = re.fullmatch(r"([^:/]+):(\d+)", address or "")
    if not match:  # unset, "auto", "local" or ray://: left to Ray
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=5).close()
    except OSError as err:
        raise ParallelError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({err})") from None


def _windowed(
    submit: Callable[[T], Any], result: Callable[[Any], R], chunks: Iterable[T], window: int
) -> Iterator[R]:
    """Keep up to ``window`` submitted chunks in flight; yield their results in submission order."""
    pending: deque[Any] = deque()
    for chunk in chunks:
        pending.append(submit(chunk))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())
