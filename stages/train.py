"""Stage train: train the FPN detector with Ray Train, tracked in MLflow.

Run (dvc.yaml does this; paths are arguments, settings come from params.yaml ``train:`` and
``model:``)::

    python -m stages.train --params params.yaml --data data/preprocessed \\
        --model-out models/model.pt --metrics metrics/train.json --plots plots/train_loss.csv \\
        [--storage-path DIR_OR_URI] [--no-ray] [--status-dir DIR]

* Ray: joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), shipping the
  project's code to its nodes unless it runs in a job's working dir already
  (`pipeline.runtime_env`), else starts a local one. ``train.num_workers`` workers with
  ``train.cpus_per_worker`` CPUs each; with ``train.use_gpu: true`` one GPU per worker, DDP over
  NCCL and ``train.amp`` mixed precision.
  On a cluster, submit from the project root and give absolute output paths on shared storage
  (a job's working dir is a temporary copy)::

      MLFLOW_TRACKING_URI=http://<host>:5000 ray job submit --address http://<head>:8265 \\
          --working-dir . -- python -m stages.train --params params.yaml --data /shared/data/preprocessed \\
          --model-out /shared/models/model.pt --metrics /shared/metrics/train.json \\
          --plots /shared/plots/train_loss.csv --storage-path /shared/runs/ray

* Resuming: checkpoints live in ``<storage path>/<run name>``; the run name is a hash of the
  model and training params and the data hash, so running the same config again (after a
  crash or a kill) resumes from its latest checkpoint, and a changed config starts fresh.
* Ray storage: ``storage.train`` in params.yaml (default ``runs/ray``), or ``--storage-path`` for
  one run. ``storage.train: s3://bucket/runs`` keeps the checkpoints in a bucket
  (`pipeline.storage`); credentials and endpoint come from the environment of the driver and of
  every node (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
  ``AWS_ENDPOINT_URL`` for an S3-compatible server).
* ``--no-ray`` runs the same loop in this process (debugging, profiling); its checkpoints go to a
  local folder, so it refuses a storage URI.
* One live run per run name: a second one started while the first trains exits 2, naming the run
  and its lock file ``<storage path>/<run name>.lock`` (for a storage URI, a local file
  ``runs/locks/<run name>.lock``: `pipeline.train.run_lock`). A run that fails is marked FAILED
  in MLflow.
* ``--status-dir`` makes each worker write ``rank<k>.json`` (pid, host, iteration, weights checksum).
* MLflow: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``; experiment
  ``train.experiment``. An unreachable MLflow costs the logging, never the training.

Outputs: the model file (``--model-out``), metrics JSON (final losses, images/s, iterations,
times), plots CSV (step, loss, loss terms, lr).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cluster import ClusterError
from pipeline.config import ConfigError, load_params
from pipeline.dataset import DatasetError
from pipeline.train.run_lock import RunLockedError
from pipeline.train.stage import TrainOutputs, train
from stages.cli import FAILED, fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections train: and model:)")
    parser.add_argument(
        "--data",
        required=True,
        help="preprocess output: a folder (data/preprocessed) or its copy at s3://...",
    )
    parser.add_argument(
        "--model-out", required=True, help="model file to write (models/model.pt, or s3://.../model.pt)"
    )
    parser.add_argument(
        "--metrics", required=True, help="metrics JSON to write (metrics/train.json, or a URI)"
    )
    parser.add_argument("--plots", required=True, help="loss CSV to write (plots/train_loss.csv, or a URI)")
    parser.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train storage for this run, instead of params storage.train: a folder every node sees, "
        "or s3://bucket/path",
    )
    parser.add_argument("--no-ray", action="store_true", help="run the loop in this process, without Ray")
    parser.add_argument("--status-dir", default=None, help="each worker writes rank<k>.json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        params = load_params(args.params)
        metrics = train(
            params,
            args.data,
            TrainOutputs(model=args.model_out, metrics=args.metrics, plots=args.plots),
            storage_path=args.storage_path,
            use_ray=not args.no_ray,
            status_dir=args.status_dir,
        )
    except (ConfigError, DatasetError, FileNotFoundError, RunLockedError) as err:
        return fail("train", err)
    except ClusterError as err:  # Ray could not be started or reached: not the input's fault
        return fail("train", err, FAILED)
    print(
        f"stages.train: {metrics['iterations']} iterations, loss {metrics['loss']:.4f}, "
        f"{metrics['images_per_s']:.2f} img/s, {metrics['wall_time_s']:.0f} s; run {metrics['run_name']}, "
        f"MLflow run {metrics['mlflow_run_id']}; model at {args.model_out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
