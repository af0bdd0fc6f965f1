"""Where a result came from: the project root and the Git commit it was made at.

Every stage runs from the project root (where ``params.yaml`` and ``dvc.yaml`` live), so the
root is the working directory. The data's own hash lives with the data contract
(`pipeline.dataset.read_data_hash`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def project_root() -> Path:
    """Where params.yaml and dvc.yaml live: the working directory stages run in."""
    return Path.cwd()


def git_commit(root: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the project (suffix ``-dirty`` for local edits), or ``"unknown"``."""
    cwd = Path(root) if root is not None else project_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head
