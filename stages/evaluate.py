"""Stage evaluate: COCO AP of the trained detector, proposal recall, and the MLflow registry.

Run (dvc.yaml does this)::

    python -m stages.evaluate --params params.yaml --model models/model.pt \\
        --data data/preprocessed --metrics metrics/eval.json --plots plots/pr_curve.csv \\
        --images reports/eval_images

Runs on the GPU when one is visible; with ``evaluate.num_workers > 0`` on that many Ray tasks
(the cluster named by ``RAY_ADDRESS``, else a local one). MLflow: ``MLFLOW_TRACKING_URI``, else
``sqlite:///<project root>/mlflow.db``. Add ``--no-mlflow`` to only write the files. If the
tracking server cannot be reached the files are still written and the command exits 1 saying
what was not logged.

Only score a results file (prints the 12 COCO numbers, the way cocoapi's demo does)::

    python -m stages.evaluate --annotations instances_val2017.json --results detections.json

Params read: data.val_split, train.experiment, evaluate.{batch_size, num_workers,
registered_model, num_pictures, draw_score_thresh}.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_params
from pipeline.dataset import DatasetError
from pipeline.evaluate.coco_eval import PROPOSAL_KEYS, STANDARD_KEYS, EvaluationError, coco_metrics
from pipeline.evaluate.stage import run_evaluate
from pipeline.inference import InferenceError
from pipeline.io import OutputError
from pipeline.model_file import ModelFileError
from stages.cli import FAILED, fail


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section evaluate:)")
    parser.add_argument("--model", help="model file written by stage train")
    parser.add_argument("--data", help="preprocessed data root (shards + index per split, categories.json)")
    parser.add_argument("--metrics", help="metrics JSON to write")
    parser.add_argument("--plots", help="precision-recall CSV to write")
    parser.add_argument("--images", help="folder for the validation pictures")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --images even if this stage did not write it (its files are lost)",
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="write the files only; no MLflow, no registry"
    )
    parser.add_argument("--annotations", help="score mode: COCO ground-truth JSON")
    parser.add_argument("--results", help="score mode: COCO results JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.annotations or args.results:
        if not (args.annotations and args.results):
            parser.error("score mode needs both --annotations and --results")
        try:
            metrics = coco_metrics(args.annotations, args.results)
        except EvaluationError as err:
            return fail("evaluate", err)
        for key in STANDARD_KEYS:
            print(f"{key:6s} {metrics[key]!r}")
        return 0

    missing = [
        f"--{name}" for name in ("model", "data", "metrics", "plots", "images") if getattr(args, name) is None
    ]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or give --annotations and --results)")
    try:
        params = load_params(args.params)
        outcome = run_evaluate(
            params,
            model_path=args.model,
            data_root=args.data,
            metrics_path=args.metrics,
            plots_path=args.plots,
            images_dir=args.images,
            track=not args.no_mlflow,
            force=args.force,
        )
    except (ConfigError, DatasetError, EvaluationError, InferenceError, ModelFileError, OutputError) as err:
        return fail("evaluate", err)
    m = outcome.metrics
    print("  ".join(f"{key} {m[key]:.4f}" for key in STANDARD_KEYS))
    print("proposals: " + "  ".join(f"{key} {m[f'proposal_{key}']:.4f}" for key in PROPOSAL_KEYS))
    print(
        f"{int(m['num_images'])} images: {m['eval_seconds_per_image'] * 1000:.1f} ms/image in the model, "
        f"{m['eval_wall_seconds_per_image'] * 1000:.1f} ms/image in all; COCOeval {m['cocoeval_seconds']:.2f} s, "
        f"proposals {m['proposal_eval_seconds']:.2f} s"
    )
    print(f"wrote {args.metrics}, {args.plots}, {args.images}/")
    if outcome.run_id:
        print(f"MLflow run {outcome.run_id}: logged {', '.join(outcome.logged)}")
    if outcome.registered_version:
        print(
            f"registered {params.evaluate.registered_model} version {outcome.registered_version}: {outcome.decision}"
        )
    if outcome.tracking_error:
        return fail("evaluate", outcome.tracking_error, FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
