"""Ordered parallel map over chunks of work: in process, on a process pool, or as Ray tasks.

``ordered_map(fn, chunks, ...)`` yields ``fn(chunk, *args)`` for each chunk, in the order of
``chunks``, keeping only a bounded window of chunks in flight (``chunks`` may be a lazy
generator over data much larger than memory, e.g. the bytes of COCO's 118k images).

* ``workers == 1``: in this process (no pickling; easiest to debug).
* otherwise a `ProcessPoolExecutor` of ``workers`` processes (0 = every core this process
  may use).
* ``use_ray``: Ray tasks (one CPU each) on the cluster at ``RAY_ADDRESS``, or on the one
  this process already joined (``ray.init``), or on a new local one. ``fn`` and its
  arguments travel by value and the code travels with the job (`pipeline.cluster.connect`),
  so the nodes need no shared filesystem: give ``fn`` bytes, not paths. ``RAY_ADDRESS``
  alone does not choose Ray: the caller does (`describe_backend` says which, for the log).

A process-pool worker that dies (killed by the OOM killer, a crash in native code) raises
`WorkerDied` carrying the chunks that were submitted and not finished, in submission order,
instead of a bare ``BrokenProcessPool``. Workers take chunks first in, first out, so the one
the dead worker held is among the first ``workers`` of them. In process (``workers == 1``)
there is no one else to tell.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from pipeline.cluster import ADDRESS_ENV, available_cores, connected

T = TypeVar("T")
R = TypeVar("R")


class WorkerDied(RuntimeError):
    """A worker process died while ``chunks`` (submitted, not finished; in submission order) were in flight."""

    def __init__(self, chunks: list[Any], cause: BaseException) -> None:
        super().__init__(f"a worker process died with {len(chunks)} chunk(s) in flight ({cause})")
        self.chunks = chunks


def describe_backend(use_ray: bool, workers: int, environ: Mapping[str, str] | None = None) -> str:
    """Where `ordered_map` runs with ``use_ray`` and ``workers`` (0 = every core), in words for the log.

    Names ``RAY_ADDRESS`` (from ``environ``, default ``os.environ``) either way, so a cluster
    that is set but not used for this map is said, not silently ignored.
    """
    environ = os.environ if environ is None else environ
    address = environ.get(ADDRESS_ENV, "").strip()
    if use_ray:
        return (
            f"Ray tasks on the cluster at {ADDRESS_ENV}={address}"
            if address
            else "Ray tasks on a local Ray cluster"
        )
    workers = workers or available_cores()
    where = "in this process" if workers == 1 else f"{workers} local processes"
    if address:
        where += f", not on the Ray cluster at {ADDRESS_ENV}={address}"
    return where


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
            lambda chunk: pool.submit(fn, chunk, *args), lambda f: f.result(), chunks, 2 * workers,
            died=(BrokenProcessPool,), finished=lambda f: f.done() and f.exception() is None,
        )  # fmt: skip


def _ray_map(fn: Callable[..., R], chunks: Iterable[T], args: tuple[Any, ...]) -> Iterator[R]:
    import ray  # only when asked for: importing Ray costs a second and pulls in much

    with connected(log_to_driver=False):
        task = ray.remote(num_cpus=1)(fn)
        shared_args = [ray.put(a) for a in args]
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield from _windowed(lambda chunk: task.remote(chunk, *shared_args), ray.get, chunks, window)


def _windowed(
    submit: Callable[[T], Any],
    result: Callable[[Any], R],
    chunks: Iterable[T],
    window: int,
    *,
    died: tuple[type[BaseException], ...] = (),
    finished: Callable[[Any], bool] = lambda handle: False,
) -> Iterator[R]:
    """Keep up to ``window`` submitted chunks in flight; yield their results in submission order.

    An exception of a type in ``died`` (a worker is gone) becomes `WorkerDied` with the chunks in
    flight whose handle is not ``finished`` (done with a result).
    """
    pending: deque[tuple[T, Any]] = deque()

    def next_result() -> R:
        try:
            return result(pending[0][1])
        except died as err:
            raise WorkerDied([chunk for chunk, handle in pending if not finished(handle)], err) from err
        finally:
            pending.popleft()

    for chunk in chunks:
        pending.append((chunk, submit(chunk)))
        if len(pending) >= window:
            yield next_result()
    while pending:
        yield next_result()
