"""Stage tune: search train/model hyperparameters with Ray Tune (ASHA + Optuna), tracked in MLflow.

Run (dvc.yaml does this; settings come from params.yaml ``tune:``, and the ``train:``/``model:``
values each trial starts from)::

    python -m stages.tune --params params.yaml --data data/preprocessed \\
        --best-params params/best.yaml --results reports/tune.csv [--storage-path DIR_OR_URI]

* The space is ``tune.space``: ``section.key`` of ``train:`` or ``model:`` -> ``{type:
  loguniform|uniform|randint|choice, ...}`` (see `pipeline.tune.search_space`); it is checked against
  the params before anything starts, errors name the key.
* Each trial is a Ray Train run of the training loop of stage train, ``tune.iterations`` long,
  scored every ``tune.eval_every`` iterations on ``tune.val_images`` held-out images
  (``val_ap50``) by its rank 0, on the device it trains on; ASHA stops weak trials early. ``tune.max_concurrent_trials`` trials run at
  once, each on ``train.num_workers`` workers of ``train.cpus_per_worker`` CPUs.
* Ray: joins ``RAY_ADDRESS``'s cluster, else starts a local one. On a cluster, give absolute
  output paths and ``storage.tune`` (or ``--storage-path``) on shared storage (see stages/train.py).
* Ray storage of the trials: ``storage.tune`` in params.yaml (default ``runs/tune``), a folder or
  an ``s3://`` URI; ``--storage-path`` overrides it for one run.
* MLflow: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``; one parent run for
  the sweep in ``train.experiment``, one child run per trial. A SQLite store is served by a
  local ``mlflow server`` (127.0.0.1) for the sweep so that parallel trials can write to it.

Outputs: ``--best-params`` (YAML: the best trial's values of the searched keys only, with the
``dvc exp run -S ...`` command that applies them in a comment) and ``--results`` (CSV: one row
per trial: status finished/stopped_early/error, iterations, val_ap50, val_ap, train_loss, the
sampled values, time, MLflow run id). Apply the best values with the printed command, e.g.::

    dvc exp run -S train.lr=0.0473 -S model.roi_batch_per_image=128
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from pipeline.config import ConfigError, read_params_file
from pipeline.tune.stage import TuneError, TuneOutputs, tune_sweep
from stages.cli import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params", default="params.yaml", help="params file (sections tune:, train:, model:)"
    )
    parser.add_argument("--data", required=True, help="preprocess output folder (data/preprocessed)")
    parser.add_argument("--best-params", required=True, help="params file to write the best values to")
    parser.add_argument("--results", required=True, help="CSV to write, one row per trial")
    parser.add_argument(
        "--storage-path",
        default=None,
        help="Ray Tune/Train storage of the trials for this run, instead of params storage.tune: "
        "a shared folder or s3:// URI",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        raw = read_params_file(args.params)
        summary = tune_sweep(
            raw,
            args.data,
            TuneOutputs(best_params=Path(args.best_params), results=Path(args.results)),
            storage_path=args.storage_path,
        )
    except (ConfigError, FileNotFoundError, TuneError) as err:
        return fail("tune", err)
    print(
        f"stages.tune: {summary['trials']} trials ({summary['finished']} finished, {summary['stopped_early']} "
        f"stopped early, {summary['error']} failed) in {summary['wall_time_s']:.0f} s; best {summary['best_trial_id']} "
        f"{summary['metric']} {summary['value']:.4f}: {summary['best']}; "
        f"MLflow parent run {summary['mlflow_parent_run_id']}\n"
        f"apply: {shlex.join(['dvc', 'exp', 'run', *summary['set_param_args']])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
