"""Session-wide test setup shared by every test package.

* The virtualenv's `bin/` goes first on PATH, so subprocesses (`ray`, `mlflow`, `dvc`,
  `python -m stages...`) use the same environment as pytest, activated or not.
* `shared_data` gives `../shared/data` (real COCO samples) or skips with the reason.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project root (where params.yaml and dvc.yaml live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout, or skip: a user's fresh clone has no shared/."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real COCO samples not found at {SHARED_DATA} (../shared/data is absent)")
    return SHARED_DATA


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
