"""The project's code, shipped to a Ray cluster the driver joins: Ray's runtime_env ``working_dir``.

A stage run with ``RAY_ADDRESS`` set (``dvc repro`` on the head node, say) joins an existing
cluster whose nodes may not have this checkout. `code_runtime_env` gives ``ray.init`` a
``working_dir`` of the project root: Ray zips it (without `SHIPPED_EXCLUDES`), stores it in the
cluster (GCS) and unpacks it on each node, where every task and actor of the job starts in that
copy with it first on ``PYTHONPATH``, so ``import fpn`` / ``import pipeline`` find the driver's
code. Paths the workers open are absolute paths on shared storage or URIs, never relative ones:
a worker's working directory is Ray's copy, not the checkout.

Not shipped:

* under ``ray job submit --working-dir .``: the job's driver (and every stage ``dvc repro``
  starts inside it) already runs in Ray's copy, and Ray refuses a second ``working_dir`` ("Failed
  to merge the Job's runtime env"); the job's applies to every task;
* for a local cluster the stage starts itself (`pipeline.cluster.connect`): its nodes are this
  machine, whose workers import the same files as the driver.

Ray 2.60 limits the zipped copy to 512 MiB (the gRPC message size) and warns from 256 MiB. The
excludes are gitignore patterns relative to the root (a leading ``/`` anchors to it); Ray adds
its own (``.git``, ``.venv``, ``venv``, ``__pycache__``) and those of a ``.gitignore`` or
``.rayignore`` in any shipped folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.provenance import project_root

log = logging.getLogger(__name__)

# What `ray job submit` gives its driver: the job's config, runtime_env included (Ray 2.60,
# ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR); ray.init merges it with its own.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Data, outputs and state: what dvc.yaml writes, Ray and MLflow keep, and tools cache.
SHIPPED_EXCLUDES = (
    # Tools and environments.
    "/.git", "/.dvc", ".venv/", "venv/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/",
    ".ruff_cache/",
    # DVC outputs (dvc.yaml, experiments/dvc.yaml) and what the stages and tools leave beside them.
    "/data", "/models", "/reports", "/metrics", "/plots", "/params/best.yaml", "/dvc_plots",
    "/predictions", "*.parquet",
    # Ray's and MLflow's state: checkpoints, run locks, tracking stores, artifacts.
    "/runs", "/ray_results", "/mlruns*", "/mlartifacts", "/mlflow.db*",
)  # fmt: skip


def job_working_dir(environ: Mapping[str, str]) -> str | None:
    """The ``working_dir`` of the Ray job this process is the driver of (``ray job submit``), or None.

    An unreadable job config counts as having one: shipping again could only conflict with it.
    """
    raw = environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (json.JSONDecodeError, AttributeError):
        return f"(unreadable {JOB_CONFIG_ENV})"
    working_dir = runtime_env.get("working_dir")
    return str(working_dir) if working_dir else None


def code_runtime_env(
    root: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """``ray.init``'s ``runtime_env`` that ships the project at ``root`` (default: the project root).

    ``{"working_dir": <root>, "excludes": [...SHIPPED_EXCLUDES]}``, or None, said in the log,
    when there is nothing to ship: the process runs in a Ray job's working dir already
    (``environ``, default ``os.environ``, holds `JOB_CONFIG_ENV` with a ``working_dir``), or
    ``root`` does not hold the ``pipeline`` package (a driver started outside the project; then
    the nodes need the project installed).
    """
    environ = os.environ if environ is None else environ
    root = Path(project_root() if root is None else root).resolve()
    shipped = job_working_dir(environ)
    if shipped:
        log.info(
            "running in Ray job working dir %s: the job's copy of the code is used, not shipped again",
            shipped,
        )
        return None
    if not (root / "pipeline" / "__init__.py").is_file():
        log.warning(
            "%s is not the project root (no pipeline/__init__.py): code not shipped, the Ray nodes "
            "need the project installed; run the stage from the project root to ship it",
            root,
        )
        return None
    return {"working_dir": str(root), "excludes": list(SHIPPED_EXCLUDES)}
