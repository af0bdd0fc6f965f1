"""Images/s of one training worker with and without Ray Train: the same loop, batch and threads.

    .venv/bin/python benchmarks/bench_train.py --data data/preprocessed              # params.yaml's model/train
    .venv/bin/python benchmarks/bench_train.py --data data/preprocessed --iterations 40 --rounds 2

Runs `pipeline.train.loop.train_worker` for ``--iterations`` steps in this process
(`LocalSession`) and as a one-worker `TorchTrainer` (`pipeline.train.ray_train.fit`, a local Ray
cluster or ``RAY_ADDRESS``'s), alternating ``--rounds`` times (the machine is shared and noisy).
Each run starts from the same seed; no MLflow, one checkpoint at the end. Images/s is over the
steps after ``--warmup`` (per-step times, reporting and checkpointing excluded), so it compares
the loop's compute inside and outside a Ray worker; the Ray row also gives the whole fit's
wall time (cluster start, worker start-up, checkpoint upload). Prints the machine first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline import cluster
from pipeline.config import load_params
from pipeline.dataset import read_data_hash
from pipeline.profile.timing import machine_description
from pipeline.train.checkpoint import history_rows
from pipeline.train.loop import TrainJob, train_worker
from pipeline.train.sessions import LocalSession


def images_per_s(state: dict, warmup: int, batch: int) -> tuple[float, float]:
    """(images/s over the steps after ``warmup``, median step seconds)."""
    times = [r["step_time_s"] for r in history_rows(state)[warmup:]]
    return batch * len(times) / sum(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="preprocessed data (stage preprocess's output)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of images/s")
    parser.add_argument("--rounds", type=int, default=1, help="local/Ray pairs, alternating")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in both (default: train.cpus_per_worker)"
    )
    args = parser.parse_args()

    params = load_params(args.params)
    threads = args.threads or max(1, int(params.train.cpus_per_worker))
    train = dataclasses.replace(
        params.train,
        num_workers=1,
        threads=threads,
        iterations=args.iterations,
        lr_steps=tuple(step for step in params.train.lr_steps if step < args.iterations),
        checkpoint_every=args.iterations,
        log_every=args.iterations,
        max_failures=0,
    )
    params = dataclasses.replace(params, train=train)
    torch.set_num_threads(threads)
    info = machine_description("cpu")
    load = os.getloadavg()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + f", cores {os.cpu_count()}")
    print(f"load average at start: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)")
    print(
        f"model {params.model.backbone} d={params.model.fpn_channels} {params.model.describe_sizes()}, "
        f"batch {train.batch_size}, {args.iterations} steps ({args.warmup} warm-up), {threads} threads, "
        f"Ray worker CPUs {train.cpus_per_worker:g}"
    )
    data_hash = read_data_hash(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for round_index in range(args.rounds):
            for mode in ("local", "ray"):
                job = TrainJob(
                    params=params,
                    data_root=str(Path(args.data).resolve()),
                    run_name=f"bench-{mode}-{round_index}-{os.getpid()}",
                    data_hash=data_hash,
                    git_commit="bench",
                    tracking_uri=None,
                    init_weights_file=None,
                )
                started = time.perf_counter()
                if mode == "local":
                    session = LocalSession(Path(tmp) / job.run_name)
                    train_worker(job, session)
                    state = session.restore()
                else:
                    from pipeline.train import ray_train

                    cluster.connect()
                    state, _ = ray_train.fit(job, str(Path(tmp) / "ray"))
                wall = time.perf_counter() - started
                rate, median = images_per_s(state, args.warmup, train.batch_size)
                rows.append((mode, round_index, rate, median, wall))
                print(
                    f"{mode:6} round {round_index}: {rate:6.2f} img/s, median step {median * 1000:6.0f} ms, wall {wall:5.1f} s"
                )
    print("\nsummary (mean over rounds):")
    for mode in ("local", "ray"):
        rates = [r[2] for r in rows if r[0] == mode]
        print(f"  {mode:6} {statistics.mean(rates):6.2f} img/s")
    local = statistics.mean(r[2] for r in rows if r[0] == "local")
    ray = statistics.mean(r[2] for r in rows if r[0] == "ray")
    print(f"  ray / local: {ray / local:.2f}")
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
