"""One live training run per run name: a lock file the driver holds for the run's lifetime.

A run's name (`pipeline.train.stage.run_name`) is a hash of what defines it, and Ray Train keeps
its checkpoints in ``<storage>/<run name>``. Two identical trainings started at once would share
that folder: each prunes the other's checkpoints, one crashes on a checkpoint that vanished. So
the driver takes an exclusive, non-blocking ``fcntl.flock`` on ``<storage>/<run name>.lock`` before
training and holds it to the end; a second driver of the same name is refused at once with
`RunLockedError`, naming the run, the lock file and who holds it. The kernel drops the lock when
the holder dies (even by SIGKILL), so a crashed run never blocks the next one; the file itself
stays (deleting a lock file others may be waiting on is racy) and holds the holder's pid and host.

For a folder (local or NFS) the lock file sits in the storage itself; on NFS, Linux emulates
``flock`` with NFS byte-range locks, which hold across the machines that mount it. Object storage
(``s3://...``) has no such lock, so for a storage URI the lock is a local file instead (see
`lock_path`): nothing is ever written into the bucket for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pipeline.provenance import project_root
from pipeline.storage import is_uri

LOCK_SUFFIX = ".lock"


class RunLockedError(RuntimeError):
    """Another live process is training the same run; the message names the run and the lock file."""


def lock_path(storage: str, name: str) -> Path:
    """The lock file of run ``name`` whose Ray Train storage is ``storage`` (a path or a URI)."""
    if is_uri(storage):
        # Object storage (s3://, gs://, ...) offers no lock that a process holds for its lifetime
        # and loses when it dies, so the lock is a file on this machine instead, under
        # <project>/runs/locks/. It refuses a second run of the name started from this machine
        # (or from any machine sharing the project folder); drivers on separate machines writing
        # to the same bucket are not serialised: start one driver per run name there.
        return project_root() / "runs" / "locks" / f"{name}{LOCK_SUFFIX}"
    return Path(storage) / f"{name}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it in the file ("pid 123 on host"), if it did."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def hold_run_lock(storage: str, name: str) -> Iterator[Path]:
    """Hold run ``name``'s lock (`lock_path`) for the block; yields the lock file.

    Raises `RunLockedError` at once when another process holds it.
    """
    path = lock_path(storage, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:  # "a+": never truncates what the holder wrote before locking
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"run {name} is already training: its lock {path} is held by {_holder(path)}; "
                "wait for that run to end (or stop it), then start this one again"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield path  # closing the file releases the lock
