"""Whole-or-nothing outputs: files, folders and ``torch.save``, built beside the target, then renamed.

A reader (the next DVC stage, a resumed run, another rank) sees either the old output or the
new one, never half of one, even when the writer is killed mid-write. Every writer here:

* builds in a hidden temporary sibling of the target (same filesystem, so ``os.replace`` is
  atomic), named ``.<name>.<random>.tmp`` for files and ``.<name>.tmp-<random>`` for folders;
* flushes file contents to disk (``fsync``) before the rename, so a power loss after the
  rename cannot leave an empty file under the final name;
* removes its temporary on any exception (Ctrl-C included) and re-raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` is replaced only after the new one is complete (it is first
    renamed aside, then deleted). On any exception the temporary folder is deleted and
    ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
