"""Stage profile on the hardware that trains: one Ray task with a training worker's resources.

``profile.where`` in params.yaml:

* ``here``: this process, on this machine's CPU (and its GPU, if it has one);
* ``cluster``: one Ray task on the cluster at ``RAY_ADDRESS`` (else a local one) asking for what
  one training worker asks for, ``train.cpus_per_worker`` CPUs and, with ``train.use_gpu``, one
  GPU; so on a cluster whose head node has no GPU the numbers are those of the GPUs that train;
* ``auto`` (the default): ``cluster`` when ``RAY_ADDRESS`` is set (``dvc repro`` on a cluster's
  head node, ``ray job submit``), else ``here``.

The model file's bytes travel through Ray's object store, so the node that profiles needs no
access to the driver's disk; it loads them with `pipeline.model_file.load_model_bytes` (weights
only). The task sends back the `ProfileResult` and the node's address, which is added to the
result's notes; the driver writes the files and logs to MLflow as for a local run.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from pipeline import cluster
from pipeline.config import Params
from pipeline.model_file import load_model_bytes
from pipeline.profile.suite import ProfileResult, run_profile

log = logging.getLogger(__name__)


def runs_on_cluster(where: str) -> bool:
    """Whether ``profile.where`` sends the measurement to a Ray task (``auto``: when RAY_ADDRESS is set)."""
    return where == "cluster" or (where == "auto" and bool(os.environ.get("RAY_ADDRESS")))


def profile_on_cluster(model_file: bytes, params: Params) -> ProfileResult:
    """`run_profile` of the model file's bytes in one Ray task with a training worker's CPUs and GPU."""
    import ray

    t = params.train
    with cluster.connected() as where:
        # One worker's bundle must fit a node, or Ray would wait for it forever.
        one = dataclasses.replace(params, train=dataclasses.replace(t, num_workers=1, min_workers=0))
        cluster.check_fits(one, cluster.resources(), where, nodes=cluster.node_resources())
        task = ray.remote(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0, max_retries=0)(
            _profile_task
        )
        log.info(
            "profile: one Ray task of %s CPUs%s on %s", t.cpus_per_worker, " and 1 GPU" * t.use_gpu, where
        )
        result, node = ray.get(task.remote(model_file, params))
    result.notes.append(f"measured on Ray node {node} ({t.cpus_per_worker:g} CPUs{', 1 GPU' * t.use_gpu})")
    return result


def _profile_task(model_file: bytes, params: Params) -> tuple[ProfileResult, str]:
    """In the task: the model from its bytes, measured as `run_profile` does; and this node's address."""
    import ray

    loaded = load_model_bytes(model_file, "the model file sent to this Ray task")
    result = run_profile(
        loaded.model, loaded.config, params.profile, train_batch_size=params.train.batch_size
    )
    return result, ray.util.get_node_ip_address()
