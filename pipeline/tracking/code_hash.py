"""The content hash of the code an MLflow model runs when loaded: what makes a registry model checkable.

The project's MLflow model (`pipeline.tracking.pyfunc`) is code: loading it executes the logged
models-from-code file and imports from the copied ``fpn/`` and ``pipeline/`` folders (MLflow's
``code_paths``). Whoever can write the artifact store can change that code, so the hash of the
code is recorded where the artifacts are not: as the tag `CODE_SHA256_TAG` on the run that logged
the model and on every registered version of it; the loader compares it with the code it
downloaded before running any of it.

The hash (`code_sha256`): every code file gets a name -- the models-from-code file its own file
name (``model_code.py``), a file of a ``code_paths`` folder ``<folder name>/<path inside>``
(``pipeline/tracking/pyfunc.py``), a ``code_paths`` file its file name -- and its SHA-256; the
code hash is the SHA-256 of the lines ``<file SHA-256>  <name>\\n`` (``sha256sum``'s format) sorted
by name. Files under a ``__pycache__`` folder are left out: they are caches, not code anyone
logged (the loader deletes them from what it downloaded, so none is ever imported).

`code_digests` names and hashes the files, both the ones about to be logged (models-from-code file
and ``code_paths``) and the ones downloaded (the model folder's copy of the file and the children
of its ``code`` folder: the same names). `code_differences` says which names differ.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

CODE_SHA256_TAG = "code_sha256"
BYTECODE_CACHE = "__pycache__"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of the bytes of ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_files(folder: Path) -> Iterable[Path]:
    """The files under ``folder`` (symlinks followed, as a copy of it holds them), no ``__pycache__``."""
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [name for name in dirs if name != BYTECODE_CACHE]
        for name in files:
            yield Path(parent) / name


def code_digests(model_code: Path, code_paths: Iterable[Path]) -> dict[str, str]:
    """``{name: SHA-256}`` of the models-from-code file ``model_code`` and of each file or folder in
    ``code_paths``, named as the module docstring says."""
    digests = {model_code.name: file_sha256(model_code)}
    for entry in code_paths:
        files = [entry] if entry.is_file() else _tree_files(entry)
        for file in files:
            digests[file.relative_to(entry.parent).as_posix()] = file_sha256(file)
    return digests


def code_sha256(digests: Mapping[str, str]) -> str:
    """The code hash of ``{name: file SHA-256}`` (module docstring)."""
    lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def code_differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """``"changed <name>"``, ``"added <name>"``, ``"removed <name>"`` for each name that differs, sorted."""
    found = []
    for name in sorted(set(expected) | set(actual)):
        if name not in expected:
            found.append(f"added {name}")
        elif name not in actual:
            found.append(f"removed {name}")
        elif expected[name] != actual[name]:
            found.append(f"changed {name}")
    return found


def drop_bytecode_caches(folder: Path) -> None:
    """Delete every ``__pycache__`` folder under ``folder``: Python would import a cached ``.pyc``
    (an "unchecked" one even without comparing it with its source) instead of the hashed code."""
    for cache in sorted(folder.rglob(BYTECODE_CACHE), reverse=True):
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache)
        else:
            cache.unlink()
