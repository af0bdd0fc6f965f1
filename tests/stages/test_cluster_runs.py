"""The four runs of a cluster that shares nothing but the network (issue: "A cluster that shares nothing").

One cluster for the module (`tests.netns_cluster`): a head node without CPUs (the drivers' side)
and two worker nodes of 1 CPU, each in its own network namespace; each worker node has a tmpfs
of its own over `NetnsRayCluster.private`, so what a driver writes there no worker node sees.
The head's namespace also runs the two shared services (`tests.netns_services`): an S3 server
and an MLflow tracking server whose artifacts go to the bucket. Every node gets the S3 endpoint
and credentials from its environment only.

1. `ray job submit --working-dir .` of stage train: 2 workers (one per worker node) read the
   data from S3, checkpoint to S3, log to the tracking server, and the model goes to S3.
2. `dvc repro` of the pipeline from the head with ``RAY_ADDRESS`` and storage on S3, `dvc push`
   to an S3 remote, and `git clone` + `dvc pull` on a worker node, where `dvc repro` is a no-op.
3. Tune with 2 trials and ablate with 2 variants, storage on S3.
4. A worker node killed mid-run: the run goes on from the latest S3 checkpoint with one worker
   and finishes (last: the cluster has one worker node left afterwards).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import GIT, copy_repo, fresh_repo, merge
from tests.netns_cluster import netns_ray_cluster
from tests.netns_services import ClusterServices, s3_env, start_services
from tests.train_samples import tiny_data, tiny_params, write_params

pytestmark = pytest.mark.slow
SUBNET = "10.78.0"
TWO_RANKS = {"num_workers": 2, "cpus_per_worker": 1, "threads": 1}


@pytest.fixture(scope="module")
def services() -> Iterator[ClusterServices]:
    """The cluster (head without CPUs, two 1-CPU worker nodes) with S3 and MLflow in the head's namespace."""
    with netns_ray_cluster(
        workers=2, head_cpus=0, dashboard=True, private_mb=256, subnet=SUBNET, node_env=s3_env(f"{SUBNET}.1"),
    ) as cluster:  # fmt: skip
        start = time.perf_counter()
        services = start_services(cluster)
        print(
            f"S3 and MLflow servers in the head's namespace answered in {time.perf_counter() - start:.1f} s"
        )
        yield services


@pytest.fixture(scope="module")
def s3_data(services: ClusterServices) -> str:
    """Tiny data preprocessed by the driver straight into the bucket (``stages.preprocess --out s3://``)."""
    cluster = services.cluster
    root = cluster.private / "source"
    tiny_data(root, train_images=8, val_images=4)
    uri = f"s3://{services.bucket}/data"
    params = write_params(root / "params.yaml", tiny_params())
    done = cluster.run_in_head(
        [sys.executable, "-m", "stages.preprocess", "--params", str(params), "--coco", str(root / "coco"),
         "--out", uri],
        timeout=300, cwd=REPO_ROOT, env=services.driver_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return uri


REPO_ROOT = Path(__file__).resolve().parents[2]


def rank_nodes(status: Path, ranks: int) -> list[str]:
    """The node address each rank ran on, from its ``--status-dir`` file."""
    return [json.loads((status / f"rank{k}.json").read_text())["node_ip"] for k in range(ranks)]


def test_1_a_job_submitted_with_its_working_dir_trains_on_both_worker_nodes_from_s3_to_s3(
    services: ClusterServices, s3_data: str
) -> None:
    cluster, bucket = services.cluster, services.bucket
    job = cluster.private / "job"  # the driver's checkout: no worker node has it
    job.mkdir()
    copy_repo(job)
    raw = tiny_params(**TWO_RANKS, iterations=4, checkpoint_every=2, log_every=1)
    raw["storage"] = {"train": f"s3://{bucket}/job/ray"}
    write_params(job / "params.yaml", raw)
    status = cluster.shared / "job-status"  # test instrumentation only: which node each rank ran on
    out = f"s3://{bucket}/job/out"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": services.tracking_uri}}
    command = [
        "ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "stages.train", "--params", "params.yaml", "--data", s3_data,
        "--model-out", f"{out}/model.pt", "--metrics", f"{out}/train.json", "--plots", f"{out}/loss.csv",
        "--status-dir", str(status),
    ]  # fmt: skip
    started = time.perf_counter()
    done = cluster.run_in_head(command, timeout=600, cwd=job, env=services.driver_env())
    wall = time.perf_counter() - started
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "succeeded" in done.stdout, done.stdout[-3000:]

    keys = services.keys("job/")
    assert {f"job/out/{n}" for n in ("model.pt", "train.json", "loss.csv")} <= set(keys), keys
    assert any("/checkpoint_" in k for k in keys if k.startswith("job/ray/")), keys
    assert sorted(rank_nodes(status, 2)) == cluster.worker_ips, "one rank per worker node"
    metrics = json.loads(services.python(READ_OBJECT, bucket, "job/out/train.json"))
    assert metrics["iterations"] == 4
    extra = json.loads(services.python(MODEL_EXTRA, bucket, "job/out/model.pt"))
    assert extra["run_name"].startswith("fpn-") and extra["data_hash"]
    assert services.mlflow(f"client.get_run({extra['mlflow_run_id']!r}).info.status") == "FINISHED"
    artifacts = services.keys("mlflow/")
    assert any(k.endswith("/loss.csv") for k in artifacts), (
        "the tracking server put the artifacts in the bucket"
    )
    print(
        f"run 1: ray job submit, 2 workers on 2 worker nodes: {wall:.1f} s wall, "
        f"{metrics['images_per_s']:.2f} img/s, train wall {metrics['wall_time_s']:.1f} s"
    )


MODEL_EXTRA = """
import io, json, sys, boto3, torch
data = boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"].read()
print(json.dumps(torch.load(io.BytesIO(data), weights_only=True)["extra"]))
"""
READ_OBJECT = """
import sys, boto3
print(boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"].read().decode())
"""


def test_2_dvc_repro_from_the_head_then_push_and_a_pull_on_a_worker_node_is_up_to_date(
    services: ClusterServices,
) -> None:
    cluster, bucket = services.cluster, services.bucket
    repo, env = fresh_repo(cluster.private / "project")  # the head's checkout: no worker node has it
    params = yaml.safe_load((repo / "params.yaml").read_text())
    storage = {"train": f"s3://{bucket}/dvc/ray", "data": f"s3://{bucket}/dvc/data"}
    params = merge(params, {"train": TWO_RANKS, "storage": storage})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    head_env = {**env, **cluster.client_env, **services.env, "MLFLOW_TRACKING_URI": services.tracking_uri}

    def in_head(*command: str) -> str:
        done = cluster.run_in_head(list(command), timeout=900, cwd=repo, env=head_env)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout + done.stderr

    started = time.perf_counter()
    repro = in_head("dvc", "repro")
    print(f"run 2: dvc repro on the head with RAY_ADDRESS: {time.perf_counter() - started:.1f} s")
    assert "Running stage 'train'" in repro and "Running stage 'evaluate'" in repro, repro[-3000:]
    keys = services.keys("dvc/")
    assert any(k.startswith("dvc/data/") and k.endswith("/manifest.json") for k in keys), "data staged in S3"
    assert any(k.startswith("dvc/ray/") and "/checkpoint_" in k for k in keys), "checkpoints in S3"

    remote = f"s3://{bucket}/dvc-remote"
    in_head("dvc", "remote", "add", "-d", "storage", remote)
    in_head("dvc", "remote", "modify", "storage", "endpointurl", services.env["AWS_ENDPOINT_URL"])
    subprocess.run([*GIT, "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run([*GIT, "commit", "-qm", "pipeline run; S3 remote"], cwd=repo, env=env, check=True)
    assert "pushed" in in_head("dvc", "push")
    origin = cluster.shared / "project.git"  # the git server: code and dvc.lock, no data
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(origin)], env=env, check=True)

    clone = cluster.private / "clone"  # on the worker node's own disk
    worker_env = {**env, **services.env}

    def on_worker(*command: str, cwd: Path = clone) -> str:
        done = subprocess.run(
            cluster.in_worker(1, command),
            cwd="/",
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout + done.stderr

    on_worker("sh", "-c", f'test ! -e "{repo}"')  # the head's checkout does not exist there
    on_worker("git", "clone", "-q", str(origin), str(clone))
    on_worker("sh", "-c", f'cd "{clone}" && dvc pull')
    status = on_worker("sh", "-c", f'cd "{clone}" && dvc repro')
    assert "Data and pipelines are up to date." in status and "Running stage" not in status, status
    assert not clone.exists(), "the clone is on the worker node's own disk"
