"""The sweep's pieces without a cluster: trial params, trial outcomes, the best trial, CSV and best-params file.

The whole sweep on a real Ray cluster with a real MLflow server is tests/stages/test_tune.py.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import check_fits
from pipeline.config import ConfigError, load_params, params_from_dict, read_params_file
from pipeline.tune.results import TuneError, best_params_text, best_row, rows_csv, trial_rows
from pipeline.tune.search_space import parse_space
from pipeline.tune.stage import PARENT_TAG, TRIAL_TAG, Sweep, sweep_name
from tests.params_files import write_params_file
from tests.train_samples import tiny_params

SPACE = {
    "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.2},
    "model.anchor_sizes": {"type": "choice", "values": [[8, 16, 32, 64, 128], [16, 32, 64, 128, 256]]},
}


def make_sweep(**tune: object) -> Sweep:
    raw = tiny_params(iterations=600, lr_steps=[450, 550])
    raw["tune"] = {"iterations": 30, "eval_every": 10, "grace_period": 10, "space": SPACE, **tune}
    params = params_from_dict(raw)
    return Sweep(
        name="tune-test",
        raw_params=raw,
        space=parse_space(params.tune.space, raw),
        tune=params.tune,
        data_root="/data",
        data_hash="0" * 64,
        git_commit="abc",
        tracking_uri="http://127.0.0.1:1",
        parent_run_id="parent123",
        train_storage="/runs/tune-test/train",
        init_weights_file=None,
        init_weights_ref=None,
    )


def entry(
    trial_id: str, status: str, iteration: int | None, ap: float | None, lr: float, error: str = ""
) -> dict:
    result = (
        {} if iteration is None else {"iteration": iteration, "val_ap50": ap, "val_ap": ap, "train_loss": 1.0}
    )
    if iteration is not None:
        result["time_total_s"] = 12.34
    found = {
        "trial_id": trial_id,
        "trial_name": f"run_trial_{trial_id}",
        "status": status,
        "config": {"train.lr": lr, "model.anchor_sizes": "[16, 32, 64, 128, 256]"},
        "result": result,
    }
    if error:
        found["error"] = error
    return found


def test_trial_params_apply_the_sample_and_the_sweep_length() -> None:
    sweep = make_sweep()
    params = sweep.trial_params({"train.lr": 0.05, "model.anchor_sizes": [16, 32, 64, 128, 256]})
    assert params.train.lr == 0.05 and params.model.anchor_sizes == (16, 32, 64, 128, 256)
    assert params.train.iterations == 30 and params.train.checkpoint_every == 10
    assert params.train.lr_steps == (22, 28), "the 600-iteration schedule shrunk to 30"
    assert params.model.fpn_channels == 32, "other keys as in the params file"
    tags = dict(sweep.run_tags("t1"))
    assert tags[PARENT_TAG] == "parent123" and tags[TRIAL_TAG] == "t1"


def test_rows_outcomes_and_best_trial() -> None:
    sweep = make_sweep()
    ledger = {
        "a": entry("a", "completed", 30, 0.40, 0.02),
        "b": entry("b", "completed", 10, 0.90, 0.03),  # stopped by ASHA at the first rung
        "c": entry("c", "completed", 30, 0.55, 0.04),
        "d": entry("d", "error", None, None, 0.05, error="NonFiniteLossError: boom"),
    }
    rows = trial_rows(ledger, sweep.space, sweep.tune)
    assert [r["status"] for r in rows] == ["finished", "stopped_early", "finished", "error"]
    assert rows[0]["model.anchor_sizes"] == [16, 32, 64, 128, 256]
    # A trial that was stopped early does not win on a score from fewer iterations.
    assert best_row(rows, sweep.tune)["trial_id"] == "c"
    loss_cfg = params_from_dict({"tune": {"metric": "train_loss", "mode": "min"}}).tune
    rows[0]["train_loss"] = 0.5
    assert best_row(rows, loss_cfg)["trial_id"] == "a"

    table = list(csv.DictReader(io.StringIO(rows_csv(rows))))
    assert [r["trial_id"] for r in table] == ["a", "b", "c", "d"]
    assert (
        table[3]["error"] == "NonFiniteLossError: boom"
        and table[0]["model.anchor_sizes"] == "[16, 32, 64, 128, 256]"
    )

    with pytest.raises(TuneError, match="NonFiniteLossError: boom"):
        best_row([rows[3]], sweep.tune)


def test_best_params_text_is_a_params_file_with_its_dvc_command(tmp_path: Path) -> None:
    sweep = make_sweep()
    rows = trial_rows({"a": entry("a", "completed", 30, 0.4, 0.0473)}, sweep.space, sweep.tune)
    text = best_params_text(sweep.name, rows[0], sweep.space, sweep.tune)
    assert yaml.safe_load(text) == {
        "train": {"lr": 0.0473},
        "model": {"anchor_sizes": [16, 32, 64, 128, 256]},
    }
    command = re.search(r"^#\s+(dvc exp run .*)$", text, re.MULTILINE).group(1)
    assert command == "dvc exp run -S train.lr=0.0473 -S 'model.anchor_sizes=[16, 32, 64, 128, 256]'"
    base = write_params_file(tmp_path / "params.yaml", sweep.raw_params)
    best = yaml.safe_load(text)
    merged = load_params(base, {f"{s}.{k}": v for s, keys in best.items() for k, v in keys.items()})
    assert merged.train.lr == 0.0473


def test_concurrency_must_fit_the_cluster() -> None:
    params = params_from_dict(
        {"train": {"num_workers": 2, "cpus_per_worker": 1.0}, "tune": {"max_concurrent_trials": 2}}
    )
    with pytest.raises(
        ConfigError, match=r"tune\.max_concurrent_trials: 2 runs x 2 workers x 1 CPUs = 4 CPUs"
    ):
        check_fits(
            params, {"CPU": 2.0}, "the local Ray cluster", runs=2, runs_key="tune.max_concurrent_trials"
        )
    check_fits(params, {"CPU": 4.0}, "the local Ray cluster", runs=2, runs_key="tune.max_concurrent_trials")


def test_sweep_name_and_params_file_errors(tmp_path: Path) -> None:
    params = params_from_dict({})
    assert re.fullmatch(r"tune-[0-9a-f]{8}-\d{8}-\d{6}", sweep_name(params, "0" * 64))
    bad = tmp_path / "params.yaml"
    bad.write_text("tune:\n  num_sample: 3\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: tune\.num_sample: unknown key"):
        read_params_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_params_file(tmp_path / "absent.yaml")
