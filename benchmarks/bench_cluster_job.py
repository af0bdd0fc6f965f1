"""Run 1 of the cluster tests timed: the same `ray job submit` on two worker nodes and on one node.

Usage (root, as the network-namespace cluster needs; about 8 minutes on 2 cores)::

    python benchmarks/bench_cluster_job.py [--iterations 40] [--repeats 2]

Starts two clusters of `tests.netns_cluster`, each with its S3 and MLflow servers
(`tests.netns_services`): a head without CPUs and two worker nodes of 1 CPU, and one node of 2
CPUs. Preprocesses tiny synthetic data into each bucket, then submits stage train (2 ranks x 1
CPU, data, checkpoints and outputs in S3, `--working-dir` a copy of this checkout) to each
cluster in turn, ``--repeats`` times, alternating, and prints the job's wall time and the
training's images/s with the date. Both clusters share this machine's cores: the difference is
what spreading the ranks over nodes costs (gloo over the cluster network, per-node setup), not
more hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.dvc_repo import copy_repo  # noqa: E402 (after the path)
from tests.netns_cluster import NetnsRayCluster, start_netns_cluster  # noqa: E402
from tests.netns_services import ClusterServices, s3_env, start_services  # noqa: E402
from tests.train_samples import tiny_data, tiny_params, write_params  # noqa: E402

SHAPES = {
    "2 worker nodes x 1 CPU": {"workers": 2, "head_cpus": 0, "subnet": "10.81.0"},
    "1 node x 2 CPUs": {"workers": 0, "head_cpus": 2, "cpus_per_node": 2, "subnet": "10.82.0"},
}
READ_OBJECT = 'import sys, boto3\nprint(boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"].read().decode())'


def upload_data(cluster: NetnsRayCluster, services: ClusterServices) -> str:
    root = cluster.private / "source"
    tiny_data(root, train_images=8, val_images=4)
    params = write_params(root / "params.yaml", tiny_params())
    uri = f"s3://{services.bucket}/data"
    done = cluster.run_in_head(
        [sys.executable, "-m", "stages.preprocess", "--params", str(params), "--coco", str(root / "coco"), "--out", uri],
        timeout=300, cwd=REPO_ROOT, env=services.driver_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return uri


def submit(
    cluster: NetnsRayCluster, services: ClusterServices, data: str, tag: str, iterations: int
) -> tuple[float, dict]:
    """The job of run 1 with ``iterations``; (wall seconds, its train.json)."""
    job = cluster.private / tag
    job.mkdir()
    copy_repo(job)
    raw = tiny_params(num_workers=2, cpus_per_worker=1, threads=1, lr=0.01, grad_clip_norm=10.0,
                      iterations=iterations, checkpoint_every=max(1, iterations // 2), log_every=5)  # fmt: skip
    raw["storage"] = {"train": f"s3://{services.bucket}/{tag}/ray"}
    write_params(job / "params.yaml", raw)
    out = f"s3://{services.bucket}/{tag}/out"
    command = [
        "ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--runtime-env-json",
        json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": services.tracking_uri}}), "--",
        "python", "-m", "stages.train", "--params", "params.yaml", "--data", data,
        "--model-out", f"{out}/model.pt", "--metrics", f"{out}/train.json", "--plots", f"{out}/loss.csv",
    ]  # fmt: skip
    started = time.perf_counter()
    done = cluster.run_in_head(command, timeout=900, cwd=job, env=services.driver_env())
    wall = time.perf_counter() - started
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return wall, json.loads(services.python(READ_OBJECT, services.bucket, f"{tag}/out/train.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    clusters: dict[str, tuple[NetnsRayCluster, ClusterServices, str]] = {}
    try:
        for name, shape in SHAPES.items():
            cluster = start_netns_cluster(
                dashboard=True, private_mb=256, node_env=s3_env(f"{shape['subnet']}.1"), **shape
            )  # type: ignore[arg-type]
            services = start_services(cluster)
            clusters[name] = (cluster, services, upload_data(cluster, services))
        for rep in range(args.repeats):
            for name, (cluster, services, data) in clusters.items():
                wall, metrics = submit(cluster, services, data, f"job{rep}", args.iterations)
                print(
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} repeat {rep} {name}: job wall {wall:.1f} s, "
                    f"train wall {metrics['wall_time_s']:.1f} s, {metrics['images_per_s']:.2f} img/s "
                    f"({args.iterations} iterations x 2 ranks x 2 images)",
                    flush=True,
                )
    finally:
        for cluster, _, _ in clusters.values():
            cluster.stop()


if __name__ == "__main__":
    main()
