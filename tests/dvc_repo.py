"""A fresh copy of this repository with a tiny configuration, for tests that run DVC for real.

`fresh_repo(dest)` copies what a commit of this work tree would hold (tracked files and
untracked ones git does not ignore), merges `TINY` into its params.yaml (a few synthetic
images, a tiny ResNet-18-FPN, a few iterations: the whole pipeline in about a minute on 2
cores), commits it in a new Git repository and returns it with the environment to run in
(no MLflow or Ray address of the caller's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]

TINY = {
    "data": {
        "synthetic_train_images": 16,
        "synthetic_val_images": 6,
        "synthetic_width": 160,
        "synthetic_height": 128,
    },
    "model": {
        "fpn_channels": 32,
        "representation_size": 64,
        "min_size": 128,
        "max_size": 160,
        "roi_batch_per_image": 32,
    },
    "train": {
        "iterations": 6,
        "warmup_iters": 2,
        "lr_steps": [4],
        "checkpoint_every": 3,
        "log_every": 2,
        "batch_size": 2,
    },
    "evaluate": {"batch_size": 2, "num_pictures": 2},
    "profile": {"warmup": 1, "iterations": 1, "compare_torchvision": False, "train_step": False},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a commit of this work tree would hold."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = REPO_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900, *, stdout_only: bool = False
) -> str:
    """Run ``cmd``; assert it succeeds (the message has its output); its stdout (and stderr unless
    ``stdout_only``, e.g. for a command whose stdout is JSON)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def fresh_repo(dest: Path) -> tuple[Path, dict[str, str]]:
    """``dest`` as a committed copy of the repository with `TINY` params; (repo, environment)."""
    dest.mkdir(parents=True)
    copy_repo(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update({"OMP_NUM_THREADS": "2", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    run(["git", "init", "-q"], dest, env)
    run([*GIT, "add", "-A"], dest, env)
    run([*GIT, "commit", "-qm", "fresh copy"], dest, env)
    return dest, env
