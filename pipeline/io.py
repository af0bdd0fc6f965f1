"""Whole-or-nothing outputs: files, folders and ``torch.save``, built beside the target, then renamed.

A reader (the next DVC stage, a resumed run, another rank) sees either the old output or the
new one, never half of one, even when the writer is killed mid-write. Every writer here:

* builds in a hidden temporary sibling of the target (same filesystem, so ``os.replace`` is
  atomic), named ``.<name>.<random>.tmp`` for files and ``.<name>.tmp-<random>`` for folders;
* flushes file contents to disk (``fsync``) before the rename, so a power loss after the
  rename cannot leave an empty file under the final name;
* removes its temporary on any exception (Ctrl-C included) and re-raises;
* creates the temporary with mode 0666 (files) or 0777 (folders) for the kernel to apply the
  process umask to (and a folder's default ACL, if any), so an output gets the permissions any
  program's file would -- 0644 / 0755 under umask 022 -- and other users and cluster nodes
  can read ``models/model.pt`` or ``data/coco``. `tempfile.mkstemp` / `mkdtemp` would make
  them 0600 / 0700; letting ``open``/``mkdir`` apply the umask also avoids reading it (there
  is no race-free ``os.umask`` query).

An output folder replaces only what the same stage wrote before: `atomic_directory(target,
stage=...)` leaves a marker file (``.fpn-output``, holding the stage's name) in what it
writes, and refuses a non-empty ``target`` without that marker unless ``force`` is given, so a
mistyped ``--out`` never deletes a user's folder. Inputs inside the output, or the output
inside an input, are refused always. Temporaries left by a killed writer (their names carry
the writer's PID) are removed by the next writer of the same output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

_T = TypeVar("_T")
# O_BINARY exists (and matters) on Windows only.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_unique(parent: Path, prefix: str, suffix: str, create: Callable[[Path], _T]) -> tuple[Path, _T]:
    """Call ``create`` on ``parent/<prefix><random><suffix>`` until a name is free; return it and the result.

    ``create`` must raise `FileExistsError` for a taken name (``O_EXCL``, ``mkdir``).
    """
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        with contextlib.suppress(FileExistsError):
            return path, create(path)


def _new_file(parent: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """A new empty file in ``parent`` (mode 0666 less the umask) and its descriptor, open for writing."""
    return _create_unique(parent, prefix, suffix, lambda path: os.open(path, _NEW_FILE_FLAGS, 0o666))


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` (mode 0777 less the umask)."""
    return _create_unique(parent, prefix, "", lambda path: path.mkdir(0o777))[0]


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (parent folders are created)."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of ``text`` as UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any, *, indent: int | None = None) -> None:
    """`atomic_write_text` of ``json.dumps(value)`` (plus a final newline when indented)."""
    text = json.dumps(value, indent=indent)
    atomic_write_text(path, text + "\n" if indent is not None else text)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` whole or not at all."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


OUTPUT_MARKER = ".fpn-output"


class OutputError(ValueError):
    """An output path that would replace or contain something it must not; the message names it."""


def check_output_folder(
    target: str | Path, stage: str, *, force: bool = False, inputs: Iterable[str | Path] = ()
) -> None:
    """Raise `OutputError` unless stage ``stage`` may replace the folder ``target``.

    Allowed: a missing or empty ``target``, or one holding this stage's marker; any folder
    with ``force``. Refused always: ``target`` equal to, inside, or holding one of ``inputs``.
    """
    out = Path(target).resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if inp == out or out in inp.parents:
            raise OutputError(f"{target}: the output folder holds the input {given}; name another output")
        if inp in out.parents:
            raise OutputError(f"{target}: the output folder is inside the input {given}; name another output")
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; name another output or pass --force")
    marker = out / OUTPUT_MARKER
    if not any(out.iterdir()) or (marker.is_file() and marker.read_text().strip() == stage):
        return
    raise OutputError(
        f"{target}: not replacing a folder that stage {stage} did not write (no {OUTPUT_MARKER} marker "
        f"naming it); name another output, empty the folder, or pass --force to replace it"
    )


def remove_dead_writers(parent: Path, prefix: str) -> list[Path]:
    """Delete the folders ``<parent>/<prefix><pid>-*`` whose writing process ``pid`` has died.

    The naming convention of this module's temporaries (and of other per-process scratch folders):
    a writer killed before it cleaned up leaves one behind. Folders of live processes (another
    user's included) are left alone. Returns those deleted.
    """
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-")
    removed = []
    for entry in parent.glob(f"{glob.escape(prefix)}*-*"):
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _remove_stale_temporaries(target: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings whose writer has died."""
    for kind in ("tmp", "old"):
        remove_dead_writers(target.parent, f".{target.name}.{kind}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, stage: str | None = None, force: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    With ``stage``, `check_output_folder` runs first (``force``, ``inputs``) and the finished
    folder gets the stage's marker. An existing ``target`` is replaced only after the new one
    is complete (it is first renamed aside, then deleted). On any exception the temporary
    folder is deleted and ``target`` is left as it was.
    """
    target = Path(target)
    if stage is not None:
        check_output_folder(target, stage, force=force, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = _new_folder(target.parent, f".{target.name}.tmp-{os.getpid()}-")
    try:
        yield tmp
        if stage is not None:
            (tmp / OUTPUT_MARKER).write_text(stage + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = _new_folder(target.parent, f".{target.name}.old-{os.getpid()}-")
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
