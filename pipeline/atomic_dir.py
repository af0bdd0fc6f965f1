"""All-or-nothing output directories: build beside the target, rename when whole.

A stage that writes a directory (``data/coco``, ``data/preprocessed``) builds it in a
temporary sibling (same filesystem, so the final ``rename`` is atomic) and only renames it
onto the target when everything in it is written. A failure or Ctrl-C removes the
temporary directory, so the next stage never sees half an output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it replaces ``target``.

    An existing ``target`` is replaced only after the new one is complete (it is first
    renamed aside, then deleted). On any exception the temporary directory is deleted and
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
