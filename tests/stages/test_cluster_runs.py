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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import GIT, copy_repo, fresh_repo, merge
from tests.netns_cluster import netns_ray_cluster
from tests.netns_services import ClusterServices, s3_env, start_services
from tests.pipeline.train.test_ray_train import read_status, steps_in, wait_for
from tests.train_samples import tiny_data, tiny_params, write_params

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
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


def rank_nodes(status: Path, ranks: int) -> list[str]:
    """The node address each rank ran on, from its ``--status-dir`` file."""
    return [read_status(status, k)["node_ip"] for k in range(ranks)]


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
REGISTERED = """
import json, sys, boto3
s3 = boto3.client("s3")
pages = s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=sys.argv[2])
iteration = 0
for key in (o["Key"] for p in pages for o in p.get("Contents", [])):
    if key.endswith("/checkpoint_manager_snapshot.json"):
        snapshot = json.loads(s3.get_object(Bucket=sys.argv[1], Key=key)["Body"].read())
        latest = snapshot.get("latest_checkpoint_result")
        iteration = max(iteration, int(latest["metrics"]["iteration"]) if latest else 0)
print(iteration)
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
    # profile.where: auto with RAY_ADDRESS: measured on a node that trains, not on the head
    assert any(f"measured on Ray node {ip} " in repro for ip in cluster.worker_ips), repro[-3000:]
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


def test_3_tune_with_two_trials_and_ablate_with_two_variants_keep_their_runs_in_s3(
    services: ClusterServices,
) -> None:
    cluster, bucket = services.cluster, services.bucket
    root = cluster.private / "sweeps"  # the driver's disk: the data and the outputs
    data = tiny_data(root / "data", train_images=8, val_images=4)
    one_rank = {"num_workers": 1, "cpus_per_worker": 1, "threads": 1}
    raw = tiny_params(**one_rank, iterations=4, checkpoint_every=2, log_every=2, lr_steps=[3])
    raw["storage"] = {
        "tune": f"s3://{bucket}/tune",
        "ablate": f"s3://{bucket}/ablate",
        "data": f"s3://{bucket}/staged",
    }
    raw["tune"] = {
        "num_samples": 2, "max_concurrent_trials": 2, "iterations": 4, "eval_every": 2, "grace_period": 2,
        "val_images": 4, "seed": 1, "space": {"train.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}},
    }  # fmt: skip
    raw["ablate"] = {"variants": ["fpn", "bottom_up"], "parallel": 2, "experiment": "ablate-cluster"}
    params = write_params(root / "params.yaml", raw)

    def stage(*args: str) -> str:
        started = time.perf_counter()
        done = cluster.run_in_head(
            [sys.executable, "-m", *args], timeout=900, cwd=REPO_ROOT, env=services.driver_env()
        )
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        print(f"run 3: {args[0]} on the cluster: {time.perf_counter() - started:.1f} s")
        return done.stdout

    stage("stages.tune", "--params", str(params), "--data", str(data),
          "--best-params", str(root / "best.yaml"), "--results", str(root / "tune.csv"))  # fmt: skip
    rows = (root / "tune.csv").read_text().splitlines()
    assert len(rows) == 3, rows  # header + 2 trials
    assert yaml.safe_load((root / "best.yaml").read_text())["train"]["lr"] > 0
    # The trials ran on the worker nodes and logged to the tracking server, as children of the sweep's run.
    trials = services.mlflow(
        "[r.data.tags.get('mlflow.parentRunId') for e in client.search_experiments() "
        "for r in client.search_runs([e.experiment_id]) if 'tune.trial_id' in r.data.tags]"
    )
    assert len(trials) == 2 and len(set(trials)) == 1 and trials[0], trials
    tune_keys = services.keys("tune/")
    assert sum(k.endswith("/train.json") or "/checkpoint_" in k for k in tune_keys) > 0, tune_keys[:20]

    stage("stages.ablate", "--params", str(params), "--data", str(data), "--table", str(root / "ablation.md"),
          "--metrics", str(root / "ablation.json"), "--plots", str(root / "ablation.csv"), "--work", str(root / "work"))  # fmt: skip
    results = json.loads((root / "ablation.json").read_text())
    assert set(results) >= {"fpn", "bottom_up"}, results.keys()
    ablate_keys = services.keys("ablate/")
    runs = {k.split("/")[1] for k in ablate_keys if "/checkpoint_" in k}
    assert len(runs) == 2, ablate_keys[:20]  # one Ray Train run per variant, in the bucket
    assert not (root / "work" / "ray").exists(), "no local Ray storage"
    staged = {k.split("/")[1] for k in services.keys("staged/")}
    assert len(staged) == 1, staged  # the data was copied once, for tune and ablate alike


def test_4_a_lost_worker_node_leaves_one_worker_from_the_s3_checkpoint_and_a_joining_node_is_used(
    services: ClusterServices,
) -> None:
    cluster, bucket = services.cluster, services.bucket
    root = cluster.private / "elastic"
    data = tiny_data(root / "data", train_images=8, val_images=4)
    total = 200  # the node rejoins and the group grows by iteration ~60 here (2026-12-01)
    # lr 0.02 per 16 images, clipped: the tiny params' 0.08 diverges within 200 iterations (NaN at ~56).
    raw = tiny_params(**TWO_RANKS, min_workers=1, resize_check_s=5, iterations=total, checkpoint_every=10,
                      log_every=5, max_failures=6, lr=0.02, grad_clip_norm=10.0)  # fmt: skip
    raw["storage"] = {"train": f"s3://{bucket}/elastic/ray", "data": f"s3://{bucket}/staged"}
    params = write_params(root / "params.yaml", raw)
    status = cluster.shared / "elastic-status"
    command = [
        sys.executable, "-m", "stages.train", "--params", str(params), "--data", str(data),
        "--model-out", f"s3://{bucket}/elastic/model.pt", "--metrics", str(root / "train.json"),
        "--plots", str(root / "loss.csv"), "--status-dir", str(status),
    ]  # fmt: skip
    log = root / "stage.log"
    with log.open("wb") as out:
        stage = cluster.popen_in_head(
            command, env=services.driver_env(), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # Registered by Ray's controller (its snapshot in S3), not only uploaded: the one to resume from,
        # and written by the two-worker group: an elastic run starts on the workers it can place, so a
        # node still freeing the previous test's resources can make it start on one and grow later.
        def checkpointed_by_two() -> bool:
            rank1 = read_status(status, 1)
            if not (rank1 and rank1["world_size"] == 2):
                return False
            return int(services.python(REGISTERED, bucket, "elastic/ray/")) > rank1["start_iteration"]

        wait_for(checkpointed_by_two, "a checkpoint in S3 registered by two workers", stage, log, timeout=300)
        victim = read_status(status, 1)
        assert victim is not None and victim["world_size"] == 2 and victim["iteration"] < total, victim
        node = cluster.worker_ips.index(victim["node_ip"]) + 1
        killed_at = time.monotonic()
        cluster.kill_worker_node(node)

        def alone() -> dict | None:
            rank0 = read_status(status, 0)
            ok = rank0 and rank0["world_size"] == 1 and rank0["iteration"] > rank0["start_iteration"]
            return rank0 if ok else None

        wait_for(alone, "one worker training on", stage, log, timeout=420)
        recovery, resumed = time.monotonic() - killed_at, alone()
        assert resumed is not None and resumed["node_ip"] == cluster.worker_ips[2 - node], resumed

        joined_at = time.time()
        cluster.start_worker_node(node)  # the machine comes back: a node joins the cluster

        def two_again() -> bool:
            ranks = [read_status(status, k) for k in (0, 1)]
            return all(r and r["world_size"] == 2 and r["time"] > joined_at for r in ranks)

        wait_for(two_again, "two workers again after the node joined", stage, log, timeout=420)
        regrown, grown = time.time() - joined_at, read_status(status, 0)
        assert stage.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if stage.poll() is None:
            stage.kill()
    repeated = victim["iteration"] - resumed["start_iteration"]
    print(
        f"run 4: worker node {node} killed at iteration {victim['iteration']}; one worker went on from the S3 "
        f"checkpoint at iteration {resumed['start_iteration']} ({repeated} iterations repeated), training again "
        f"{recovery:.1f} s after the kill; the node rejoined and two workers trained again {regrown:.1f} s later, from iteration "
        f"{grown['start_iteration']} of {total}"
    )
    metrics = json.loads((root / "train.json").read_text())
    assert metrics["iterations"] == total and metrics["attempts"] >= 3, (metrics, log.read_text()[-8000:])
    ranks = [read_status(status, k) for k in (0, 1)]
    assert all(r["world_size"] == 2 and r["iteration"] == total for r in ranks), ranks
    assert steps_in(root / "loss.csv") == list(range(1, total + 1)), "no step lost, none counted twice"
    text = log.read_text()
    assert "resumed on 1 workers (the checkpoint's run had 2)" in text
    assert "resumed on 2 workers (the checkpoint's run had 1)" in text
    # One MLflow run holds every phase; steps trained again after a restart are logged again.
    extra = json.loads(services.python(MODEL_EXTRA, bucket, "elastic/model.pt"))
    run_id = extra["mlflow_run_id"]
    assert services.mlflow(f"client.get_run({run_id!r}).info.status") == "FINISHED"
    history = services.mlflow(f"[(m.step, m.value) for m in client.get_metric_history({run_id!r}, 'lr')]")
    counts = Counter(step for step, _ in history)
    assert sorted(counts) == list(range(1, total + 1)) and max(counts.values()) <= 3, counts
    # After the warmup the lr follows the global batch: 0.02 x 4 / 16 with two workers, x 2 / 16 with one.
    assert sorted({round(value, 9) for step, value in history if step > 2}) == [0.0025, 0.005]
