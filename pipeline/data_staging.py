"""A local preprocessed folder copied once to shared storage, so a cluster's workers read it there.

``storage.data`` in params.yaml (default null: workers read ``--data`` where it is). With
``storage.data: s3://bucket/data``, stages train, tune and ablate given a local ``--data`` folder
(DVC's ``data/preprocessed``, which only the driver's machine has) copy it to
``<storage.data>/<data hash>/`` and give the workers that location instead. ``dvc repro`` on a
cluster's head node then trains on every node without a step of its own to move the data.

* Named by content: the copy's prefix is the manifest's data hash, so the run's name (a hash of
  the params and the data hash) and everything keyed on it are the same as when reading the
  folder, and changed data goes to a new prefix. Nothing is deleted; a copy that stopped
  half-way (no ``manifest.json`` yet) is written again over its own files, the same bytes.
* Copied once: a copy whose ``manifest.json`` exists is complete (`pipeline.dataset.completion_files`
  are written last), and the next run uploads nothing.
* A ``--data`` that is already a URI is read where it is.

``storage.data`` may also be a folder every node mounts (NFS): the copy is made in a temporary
folder beside the target and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.dataset import SPLIT_FILE, completion_files, read_data_hash
from pipeline.storage import is_uri, join_location, location_exists, upload_folder

log = logging.getLogger(__name__)


def staged_data(data_root: str, data_storage: str | None, *, progress: bool = True) -> str:
    """The location the workers read ``data_root`` from: its copy under ``data_storage``, made if missing.

    ``data_root``: a preprocessed folder or a URI; ``data_storage``: ``storage.data`` (None: no copy).
    Returns ``data_root`` unchanged when ``data_storage`` is None or ``data_root`` is a URI.
    """
    if data_storage is None or is_uri(data_root):
        return data_root
    data_hash = read_data_hash(data_root)
    target = join_location(data_storage, data_hash)
    if location_exists(join_location(target, "manifest.json")):
        log.info("data %s: using its copy at %s (storage.data)", data_hash[:12], target)
        return target
    folder = Path(data_root)
    splits = sorted(p.parent.name for p in folder.glob(f"*/{SPLIT_FILE}"))
    log.info("data %s: copying %s to %s (storage.data) for the workers", data_hash[:12], folder, target)
    if is_uri(target):
        count = upload_folder(folder, target, last=completion_files(splits), progress=progress)
    else:
        count = _copy_folder(folder, Path(target))
    log.info("data %s: copied %d files to %s", data_hash[:12], count, target)
    return target


def _copy_folder(folder: Path, target: Path) -> int:
    """Copy ``folder`` to ``target`` (absent) through a temporary sibling renamed into place; the file count."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)  # this process's own leftover, never another's
    shutil.copytree(folder, temporary)
    temporary.rename(target)
    return sum(1 for p in target.rglob("*") if p.is_file())
