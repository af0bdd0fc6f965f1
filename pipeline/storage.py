"""Ray storage locations: a local folder or an object-store URI, told apart and opened in one place.

``storage.train`` / ``storage.tune`` in params.yaml (or a stage's ``--storage-path``) is where Ray
Train and Tune keep checkpoints. It is either a folder (local disk, or NFS every node mounts at the same path) or a URI such as
``s3://bucket/runs``. A URI must never go through `pathlib.Path`: ``Path("s3://b/runs")`` is
``s3:/b/runs`` and ``.resolve()`` turns it into a folder under the working directory. Every
caller that touches a storage location uses these helpers instead:

* `is_uri` -- ``scheme://...`` (``s3://``, ``gs://``, ...);
* `resolve_location` -- the location as Ray wants it: a folder made absolute, a URI unchanged;
* `join_location` -- a location below another, for both kinds;
* `filesystem_for` -- ``(pyarrow FileSystem, path inside it)``, through
  ``pyarrow.fs.FileSystem.from_uri``, the call Ray Train makes for its ``storage_path``: what
  works here works for Ray;
* `location_exists`, `write_empty_file`, `remove_file` -- the few operations the cluster preflight needs;
* `read_location`, `open_location` -- a file's bytes, or a random-access file (Parquet shards),
  at a path or a URI: the preprocessed data may live in object storage
  (`pipeline.dataset`);
* `local_copies` -- local files to write output locations through: a path itself, a URI's file
  uploaded whole when the writing is done (stage train's ``--model-out s3://...``);
* `upload_folder` -- a local folder copied to a URI, the files that mark it complete last (stage
  preprocess with ``--out s3://...``), after `check_output_location` (never over others' objects).

S3 credentials and endpoint come only from the environment, as for every AWS client:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and, for an
S3-compatible server (MinIO, moto), ``AWS_ENDPOINT_URL``; never from params or code. On a
cluster, every node needs them in the environment of its Ray processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.io import OUTPUT_MARKER, OutputError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (object storage), False for a local or NFS path."""
    return bool(_SCHEME.match(location))


def resolve_location(location: str) -> str:
    """Ray's form of ``location``: a path expanded (``~``) and made absolute; a URI unchanged."""
    if is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


def join_location(location: str, *parts: str) -> str:
    """``location/part/...`` for a path or a URI (a URI keeps its scheme and ``//``)."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def filesystem_for(location: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path inside it)`` for a URI or a local path.

    URIs go through ``pyarrow.fs.FileSystem.from_uri``, as Ray's do: for ``s3://`` it reads the
    AWS variables named in the module docstring, ``AWS_ENDPOINT_URL`` included (a bare
    ``pyarrow.fs.S3FileSystem()`` would not).
    """
    import pyarrow.fs  # lazy: the local-path callers never need it

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def location_exists(location: str) -> bool:
    """Whether a file or folder (for object stores: an object or prefix) is at ``location``."""
    if not is_uri(location):
        return os.path.exists(location)
    import pyarrow.fs

    fs, path = filesystem_for(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def write_empty_file(location: str) -> None:
    """Write an empty file (object) at ``location``; its folder must exist for a local path."""
    if not is_uri(location):
        Path(location).write_bytes(b"")
        return
    fs, path = filesystem_for(location)
    with fs.open_output_stream(path):
        pass


def remove_file(location: str) -> None:
    """Delete the file (object) at ``location``; nothing when it is already gone.

    In object storage pyarrow leaves an empty marker object for the parent "folder" (``runs/``).
    """
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    import pyarrow.fs

    fs, path = filesystem_for(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_file(path)


def read_location(location: str) -> bytes:
    """The bytes of the file (object) at ``location``; FileNotFoundError when there is none."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem_for(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def open_location(location: str) -> Any:
    """A random-access file at ``location``: the path itself when local, a pyarrow file for a URI
    (what ``pyarrow.parquet`` takes either way). FileNotFoundError when there is none."""
    if not is_uri(location):
        return location
    fs, path = filesystem_for(location)
    return fs.open_input_file(path)


@contextlib.contextmanager
def local_copies(locations: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Local paths to write ``locations`` through, one per location, in order.

    A path is its own local copy. A URI gets a file of the same name in a temporary folder,
    uploaded to the URI (one object: whole or absent) when the block ends without an error;
    on an error nothing is uploaded. The temporary folder is removed either way.
    """
    with tempfile.TemporaryDirectory(prefix="fpn-outputs-") as tmp:
        local = []
        for k, location in enumerate(map(str, locations)):
            if not is_uri(location):
                local.append(Path(location))
                continue
            folder = Path(tmp, str(k))
            folder.mkdir()
            local.append(folder / location.rstrip("/").rsplit("/", 1)[-1])
        yield local
        for location, path in zip(map(str, locations), local, strict=True):
            if is_uri(location):
                _upload_file(path, *filesystem_for(location))


def upload_order(files: Sequence[str], last: Sequence[str]) -> list[str]:
    """``files`` sorted, those in ``last`` moved to the end in ``last``'s order."""
    return sorted(f for f in files if f not in last) + [f for f in last if f in files]


def upload_folder(folder: Path, location: str, *, last: Sequence[str] = (), progress: bool = True) -> int:
    """Copy every file under ``folder`` to ``location`` (a URI), keeping relative paths; returns the count.

    The files named in ``last`` (relative paths) go last, in that order: a reader that finds
    them finds everything before them, so an upload that stops half-way looks absent, not
    whole. Existing objects of the same name are overwritten; nothing else is deleted.
    """
    from tqdm import tqdm

    fs, base = filesystem_for(location)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    ordered = upload_order(files, last)
    for name in tqdm(ordered, desc=f"upload to {location}", unit="file", disable=not progress):
        _upload_file(folder / name, fs, f"{base.rstrip('/')}/{name}")
    return len(ordered)


def _upload_file(source: Path, fs: Any, path: str) -> None:
    """Copy the local file ``source`` to ``path`` in the pyarrow filesystem ``fs`` (one object: whole or absent)."""
    with source.open("rb") as reader, fs.open_output_stream(path) as sink:
        shutil.copyfileobj(reader, sink, length=8 * 2**20)


def check_output_location(location: str, stage: str, *, force: bool = False) -> None:
    """`check_output_folder` for an object-store URI: nothing there yet, this stage's marker, or ``force``.

    Writing there never deletes: objects of the same names are overwritten (``force`` only
    allows writing over objects some other tool left under the prefix).
    """
    if force or not location_exists(location):
        return
    try:
        written_by = read_location(join_location(location, OUTPUT_MARKER)).decode().strip()
    except (FileNotFoundError, OSError):
        written_by = ""
    if written_by != stage:
        raise OutputError(
            f"{location}: not writing over objects that stage {stage} did not write (no {OUTPUT_MARKER} "
            f"marker naming it); name another prefix, or pass --force to write over them"
        )
