"""DVC experiments compare: two `dvc exp run -S` in a fresh copy, each with its own metrics and plots.

Experiments are Git commits, so what they compare must be tracked by Git: the small metrics and
plots files (``cache: false`` in dvc.yaml) are not in .gitignore, and dvc.lock is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dvc_repo import fresh_repo, run

pytestmark = pytest.mark.slow


def _experiments(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """``dvc exp show --json``: experiment name -> its metrics/eval.json values (and params)."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env, stdout_only=True))
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs") or []:
                data = revision.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics/eval.json", {}).get("data")
                params = (data.get("params") or {}).get("params.yaml", {}).get("data")
                if revision.get("name") and metrics:
                    found[revision["name"]] = {"metrics": metrics, "params": params}
    return found


def test_two_experiments_are_recorded_and_compared(tmp_path: Path) -> None:
    repo, env = fresh_repo(tmp_path / "repo")
    run(["dvc", "exp", "run", "-n", "lr-low", "-S", "train.lr=0.01"], repo, env, timeout=1200)
    run(["dvc", "exp", "run", "-n", "lr-high", "-S", "train.lr=0.04"], repo, env, timeout=1200)

    experiments = _experiments(repo, env)
    assert {"lr-low", "lr-high"} <= set(experiments), experiments.keys()
    for name, lr in (("lr-low", 0.01), ("lr-high", 0.04)):
        assert experiments[name]["params"]["train"]["lr"] == lr
        assert 0.0 <= experiments[name]["metrics"]["AP50"] <= 1.0

    diff = json.loads(
        run(["dvc", "metrics", "diff", "lr-low", "lr-high", "--json"], repo, env, stdout_only=True)
    )
    assert "metrics/train.json" in diff and "loss" in diff["metrics/train.json"], diff
    plots = json.loads(
        run(["dvc", "plots", "diff", "lr-low", "lr-high", "--json"], repo, env, stdout_only=True)
    )["data"]
    assert [image["revisions"] for image in plots["Training losses"]] == [["lr-low", "lr-high"]], plots.keys()
