"""Stage ablate: the FPN paper's ablation tables (Tables 1-3) as one command.

Run (``dvc repro experiments/dvc.yaml:ablate`` does this; settings from params.yaml ``ablate:``, ``model:``, ``train:``)::

    python -m stages.ablate --params params.yaml --data data/preprocessed \\
        --table reports/ablation.md --metrics metrics/ablation.json --plots plots/ablation.csv \\
        --work runs/ablate

Trains and evaluates every pyramid of ``ablate.variants`` (default single_c4, single_c5, fpn,
bottom_up, top_down_no_lateral, p2_only) with the same data, schedule (``train:``, or
``ablate.iterations`` with the lr steps scaled) and seed, and writes one table: rows = variants,
columns = AR100, AR1k, ARs1k, ARm1k, ARl1k, AP, AP50, APs, APm, APl, train images/s, test
ms/image. Each variant is an MLflow run (experiment ``ablate.experiment``) tagged
``variant=<pyramid>`` holding its training and its evaluation (``eval/...``).

* Resuming: ``--work`` keeps each finished variant (``<pyramid>/<run name>/result.json``) and
  the Ray Train checkpoints; a rerun reuses what still matches the params and data and computes
  the rest (an interrupted variant resumes from its last checkpoint). Delete a variant's folder
  to recompute it, e.g. after changing the detector's code.
* Side by side: ``ablate.parallel: N`` fits N variants at once, each its own Ray Train run on
  the cluster at ``RAY_ADDRESS`` (else a local one), ``train.num_workers`` x
  ``train.cpus_per_worker`` each (GPUs with ``train.use_gpu``). On a multi-node cluster give
  ``--data`` and ``--work`` on shared storage and an ``http://`` MLFLOW_TRACKING_URI.
* ``--no-ray`` trains in this process, one variant at a time (debugging).

Outputs: ``--table`` (markdown), ``--metrics`` (JSON nested by variant), ``--plots`` (CSV, one
row per variant). Params read: ablate.*, model.*, train.*, data.val_split, evaluate.batch_size.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.ablate.report import write_report
from pipeline.ablate.stage import AblationError, run_ablation
from pipeline.config import ConfigError, load_params
from pipeline.dataset import DatasetError
from pipeline.evaluate.coco_eval import EvaluationError
from stages.cli import FAILED, fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (ablate:, model:, train:)")
    parser.add_argument("--data", required=True, help="preprocess output folder (data/preprocessed)")
    parser.add_argument("--table", required=True, help="markdown table to write (reports/ablation.md)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (metrics/ablation.json)")
    parser.add_argument(
        "--plots", required=True, help="CSV to write, one row per variant (plots/ablation.csv)"
    )
    parser.add_argument("--work", required=True, help="kept results and Ray storage (runs/ablate)")
    parser.add_argument("--no-ray", action="store_true", help="train in this process, one variant at a time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        params = load_params(args.params)
        run = run_ablation(params, args.data, args.work, use_ray=not args.no_ray)
    except (ConfigError, DatasetError, EvaluationError, FileNotFoundError) as err:
        return fail("ablate", err)
    except AblationError as err:
        return fail("ablate", err, FAILED)
    write_report(run, table=Path(args.table), metrics=Path(args.metrics), plots=Path(args.plots))
    print(Path(args.table).read_text())
    reused = sum(r.reused for r in run.results)
    print(
        f"stages.ablate: {len(run.results)} variants ({reused} kept from {args.work}) in {run.wall_time_s:.0f} s; "
        f"wrote {args.table}, {args.metrics}, {args.plots}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
