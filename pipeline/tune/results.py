"""What a sweep leaves behind: one row per trial, the best trial, the CSV and the best-params file.

A *ledger* (`pipeline.tune.stage.TrialLedger`) maps trial id -> ``{"trial_id", "trial_name",
"status" (running | completed | error), "config" (as Tune passed it), "result" (the trial's last
Tune result), "error"}``. `trial_rows` turns it into rows with an outcome:

* ``finished`` -- ran all ``tune.iterations``;
* ``stopped_early`` -- completed before that: ASHA stopped it at a rung;
* ``error`` -- the trial raised (the message is in the row).

`best_row` picks by ``tune.metric``/``tune.mode`` among finished trials (a score after fewer
iterations is not comparable), or among every scored trial when none finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from typing import Any

import yaml

from pipeline.config import TuneConfig
from pipeline.tune.search_space import SearchSpace, best_params_document, set_param_args

METRIC_COLUMNS = ("val_ap50", "val_ap", "train_loss")


class TuneError(RuntimeError):
    """The sweep could not produce a result (e.g. every trial failed); the message says why."""


def trial_rows(
    ledger: dict[str, dict[str, Any]], space: SearchSpace, cfg: TuneConfig
) -> list[dict[str, Any]]:
    """One row per trial, in trial-id order: outcome, last iteration, scores, the sampled values, time."""
    rows = []
    for trial_id in sorted(ledger):
        entry = ledger[trial_id]
        result = entry.get("result") or {}
        iteration = result.get("iteration")
        if entry["status"] == "error":
            outcome = "error"
        elif iteration is not None and iteration >= cfg.iterations:
            outcome = "finished"
        elif entry["status"] == "completed":
            outcome = "stopped_early"
        else:
            outcome = entry["status"]
        try:
            sample = space.decode(entry.get("config") or {})
        except KeyError:
            sample = {}
        rows.append(
            {
                "trial_id": trial_id,
                "trial_name": entry["trial_name"],
                "status": outcome,
                "iteration": iteration,
                **{name: result.get(name) for name in METRIC_COLUMNS},
                **{key: sample.get(key) for key in space.keys},
                "time_s": round(float(result["time_total_s"]), 1) if "time_total_s" in result else None,
                "error": entry.get("error", ""),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]], cfg: TuneConfig) -> dict[str, Any]:
    """The best trial by ``tune.metric``; raises `TuneError` (with the trials' errors) when none has a score."""

    def scored(row: dict[str, Any]) -> bool:
        value = row.get(cfg.metric)
        return isinstance(value, (int, float)) and math.isfinite(value)

    finished = [r for r in rows if r["status"] == "finished" and scored(r)]
    candidates = finished or [r for r in rows if scored(r)]
    if not candidates:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:3000]
        raise TuneError(f"no trial reported tune.metric {cfg.metric!r} ({len(rows)} trials). {errors}")
    sign = 1.0 if cfg.mode == "max" else -1.0
    # Ties go to the earlier trial.
    return max(candidates, key=lambda r: (sign * r[cfg.metric], -rows.index(r)))


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (list values as JSON, e.g. ``[16, 32, 64, 128, 256]``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial_id"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in row.items()})
    return buffer.getvalue()


def best_sample(best: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The best row's values of the searched keys: ``{"train.lr": 0.05, ...}``."""
    return {key: best[key] for key in space.keys}


def best_params_text(sweep_name: str, best: dict[str, Any], space: SearchSpace, cfg: TuneConfig) -> str:
    """The best params file: the searched keys only, and the ``dvc exp run -S ...`` line that applies them."""
    sample = best_sample(best, space)
    command = shlex.join(["dvc", "exp", "run", *set_param_args(sample)])
    header = (
        f"# Best trial of sweep {sweep_name}: {best['trial_id']}, {cfg.metric} = "
        f"{best[cfg.metric]:.4f} after {best['iteration']} iterations.\n"
        f"# Apply to params.yaml and run the pipeline:\n#   {command}\n"
    )
    return header + yaml.safe_dump(best_params_document(sample), sort_keys=False)
