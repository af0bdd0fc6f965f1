"""Stage profile: how fast the trained detector is, split by component, beside torchvision's
Faster R-CNN doing the same work and beside the single-scale baseline.

Run (dvc.yaml does this)::

    python -m stages.profile --params params.yaml --model models/model.pt \\
        --metrics metrics/profile.json --plots plots/profile_split.csv

Measures on the CPU and, when one is visible, on the GPU (profile.devices). Inputs are
seeded synthetic images of model.min_size (the last of a list: the test size) x model.max_size;
every subject runs alternately on the same inputs (the machine's noise falls on all alike).
Threads: profile.threads (0: torch's default; set OMP_NUM_THREADS or profile.threads to pin
it). The PNG of the split goes beside the CSV unless ``--png`` names it. MLflow: the metrics and files are logged to the model's run
(``extra["mlflow_run_id"]`` of the model file) at ``MLFLOW_TRACKING_URI``, else
``sqlite:///<project root>/mlflow.db``; ``--no-mlflow`` only writes the files. If the tracking
store cannot be reached the files are still written and the command exits 1.

Params read: model (from the model file, not params.yaml), train.batch_size (training step),
train.experiment, profile.{batch_sizes, warmup, iterations, compare_torchvision,
single_scale_baseline, train_step, channels_last, compile, bf16, devices, threads, seed}.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_params
from pipeline.model_file import ModelFileError
from pipeline.profile.reference_models import ReferenceError
from pipeline.profile.stage import run_profile_stage
from pipeline.profile.timing import ProfilingError
from stages.cli import FAILED, fail


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section profile:)")
    parser.add_argument("--model", required=True, help="model file written by stage train")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--plots", required=True, help="component-split CSV to write")
    parser.add_argument("--png", help="component-split PNG to write (default: beside --plots)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = load_params(args.params)
        _, logged = run_profile_stage(
            params,
            model_path=args.model,
            metrics_path=args.metrics,
            plots_path=args.plots,
            png_path=args.png,
            track=not args.no_mlflow,
        )
    except (ConfigError, ModelFileError, ProfilingError, ReferenceError, ValueError) as err:
        return fail("profile", err)
    return 0 if logged else FAILED


if __name__ == "__main__":
    sys.exit(main())
