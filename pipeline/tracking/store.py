"""A SQLite MLflow store is created and migrated once, under a file lock, before anyone writes to it.

MLflow creates the tables of a fresh SQLite store, and runs its schema migrations, in whichever
process opens the store first. Several processes opening a new store at once (training variants,
Tune trials, Ray workers logging metrics) each run that migration and trip over each other
("duplicate column name", "Online migration expected to match one row"); the losers' runs are
lost. `prepare_store(uri)` takes an exclusive lock (``fcntl.flock``) on ``<db>.lock`` beside the
database, opens the store there (MLflow then creates and migrates it, and adds its default
experiment), and releases the lock: whoever comes next finds a finished store.

`pipeline.tracking.run.mlflow_client` calls it for every client, so every way the project opens a
store goes through it (`pipeline.tracking.run.TrackedRun`, the registry, the pyfunc loader);
`pipeline.tracking.server.serve_sqlite` calls it before starting its server. A store is prepared
once per process; other URIs (an ``http://`` server, a database server, an in-memory SQLite)
are left alone.

`artifact_root(uri, experiment)` is where a new experiment of a SQLite store keeps its artifacts:
``<folder of the database>/mlruns/<experiment>``. MLflow's own default, ``./mlruns/<id>``, is
resolved against the working directory of whichever process creates the experiment first; a Ray
Train worker or a Tune trial runs in a Ray temp folder (``/tmp/ray/session_*/artifacts/...``), so
the runs' files and the registered models landed there and were lost with it.

Conventions: POSIX only (``fcntl``). MLflow is imported inside `prepare_store`, not at the top: the
training loop imports `pipeline.tracking.run`, which imports this module, and also runs where
MLflow is not installed (see `pipeline.tracking.run`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
LOCK_SUFFIX = ".lock"
_prepared: set[str] = set()  # URIs whose store this process has prepared


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` URI (relative paths: from the working directory),
    or None for other URIs and in-memory databases."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = unquote(uri[len(SQLITE_PREFIX) :].split("?", 1)[0])
    if path in ("", ":memory:"):
        return None
    return Path(path).resolve()


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment ``experiment`` of the SQLite store ``uri`` keeps its artifacts.

    ``<folder of the database>/mlruns/<experiment>`` (an absolute path; characters other than
    letters, digits, ``.``, ``_`` and ``-`` become ``_``), whichever process creates it. None for
    other URIs: a tracking server or a database server decides for itself.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip(".") or "_"
    return str(db.parent / "mlruns" / folder)


def lock_path(db: Path) -> Path:
    """``<db>.lock``: the lock file beside the database ``db``."""
    return db.with_name(db.name + LOCK_SUFFIX)


def _open_stores(uri: str) -> None:
    """Open the tracking and the registry store of ``uri``: MLflow creates and migrates a new one."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)


def prepare_store(uri: str) -> None:
    """Create and migrate the SQLite store ``uri`` under its lock file, once per process.

    Other URIs return at once. A folder where the lock file cannot be written (a read-only
    store) is opened without the lock: nobody can write there anyway. MLflow errors (a corrupt
    database, a schema newer than this MLflow) raise as MLflow raises them.
    """
    db = sqlite_path(uri)
    if db is None or (uri in _prepared and db.exists()):
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = lock_path(db).open("a")
    except OSError as err:
        log.debug("no lock file beside %s (%s): opening the store unlocked", db, err)
        handle = None
    with handle or contextlib.nullcontext():
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # waits for another preparer; released on closing
        _open_stores(uri)
    _prepared.add(uri)
