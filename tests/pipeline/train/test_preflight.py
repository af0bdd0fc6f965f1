"""Bad training params fail before any work, with the key in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cluster import check_fits
from pipeline.config import ConfigError, params_from_dict
from pipeline.train.preflight import check_num_classes, check_train_params


def params(**train: object):
    return params_from_dict({"train": train, "model": {"backbone": "resnet18", "num_classes": 3}})


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"num_workers": 0}, "train.num_workers: must be >= 1, got 0"),
        ({"cpus_per_worker": 0.0}, "train.cpus_per_worker: must be > 0, got 0.0"),
        ({"batch_size": 0}, "train.batch_size: must be >= 1, got 0"),
        ({"lr": -0.02}, "train.lr: must be > 0, got -0.02"),
        ({"momentum": 1.0}, "train.momentum: must be in [0, 1), got 1.0"),
        ({"weight_decay": -1e-4}, "train.weight_decay: must be >= 0.0"),
        ({"iterations": 0}, "train.iterations: must be >= 1, got 0"),
        ({"warmup_factor": 0.0}, "train.warmup_factor: must be in (0, 1]"),
        ({"lr_steps": [80, 60]}, "train.lr_steps: must be increasing"),
        ({"amp": "fp8"}, "train.amp: must be one of bf16, fp16, off, got 'fp8'"),
        ({"cpu_amp": "fp16"}, "train.cpu_amp: must be one of auto, bf16, off, got 'fp16'"),
        ({"checkpoint_every": 0}, "train.checkpoint_every: must be >= 1, got 0"),
        ({"log_every": 0}, "train.log_every: must be >= 1, got 0"),
        ({"threads": -1}, "train.threads: must be >= 0, got -1"),
        ({"grad_clip_norm": 0.0}, "train.grad_clip_norm: must be > 0, got 0.0"),
        ({"flip_prob": 1.5}, "train.flip_prob: must be in [0, 1], got 1.5"),
        ({"experiment": " "}, "train.experiment: must name an MLflow experiment"),
        ({"init_weights": "no/such/file.pth"}, "train.init_weights: 'no/such/file.pth' is neither"),
        ({"init_weights": "torchvision-coco"}, "needs model.backbone: resnet50, got 'resnet18'"),
    ],
)
def test_bad_train_params_name_the_key(train: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_train_params(params(**train))
    assert message in str(caught.value)


def test_good_params_pass(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"x")
    check_train_params(params())
    check_train_params(params(init_weights=str(weights), lr_steps=[], amp="off", max_failures=-1))
    check_train_params(params(init_weights="imagenet"))


def test_num_classes_must_match_the_data() -> None:
    cats = [{"label": 1, "id": 2, "name": "circle"}, {"label": 2, "id": 5, "name": "square"}]
    with pytest.raises(ConfigError, match=r"model.num_classes: 3, but data/categories.json has 2"):
        check_num_classes(params(), cats, "data/categories.json")


def test_cluster_must_fit_the_request() -> None:
    cpu_only = {"CPU": 2.0, "GPU": 0.0}
    with pytest.raises(ConfigError, match="train.use_gpu: true, but the test cluster has no GPU"):
        check_fits(params(use_gpu=True), cpu_only, "the test cluster")
    with pytest.raises(
        ConfigError, match=r"train.cpus_per_worker: 2 workers x 2 CPUs = 4 CPUs, but .* has 2"
    ):
        check_fits(params(num_workers=2, cpus_per_worker=2.0), cpu_only, "the test cluster")
    with pytest.raises(ConfigError, match="train.num_workers: 2 workers with one GPU each"):
        check_fits(params(num_workers=2, use_gpu=True), {"CPU": 8.0, "GPU": 1.0}, "x")
    check_fits(params(num_workers=2, cpus_per_worker=0.5), cpu_only, "the test cluster")


def test_each_worker_must_fit_whole_on_one_node() -> None:
    # 3 CPUs in all, but no node holds a 2-CPU worker: the totals alone would let Ray wait forever.
    nodes = [{"CPU": 1.5, "GPU": 0.0}, {"CPU": 1.5, "GPU": 0.0}]
    with pytest.raises(
        ConfigError,
        match=r"train.cpus_per_worker: 1 workers of 2 CPUs each, and a worker runs whole on one node: the "
        r"nodes of the test cluster \(1.5 CPUs/0 GPUs, 1.5 CPUs/0 GPUs\) hold 0 at once, not 1",
    ):
        check_fits(params(cpus_per_worker=2.0), {"CPU": 3.0, "GPU": 0.0}, "the test cluster", nodes=nodes)
    # GPUs: a node with 4 CPUs and no GPU holds no GPU worker; 2 GPU nodes of 1 CPU hold one each.
    gpu_nodes = [{"CPU": 4.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 2.0}]
    total = {"CPU": 6.0, "GPU": 3.0}
    check_fits(params(num_workers=2, use_gpu=True), total, "x", nodes=gpu_nodes)
    with pytest.raises(ConfigError, match=r"3 workers of 1 CPUs and 1 GPU each, .* hold 2 at once, not 3"):
        check_fits(params(num_workers=3, use_gpu=True), total, "x", nodes=gpu_nodes)
    with pytest.raises(
        ConfigError, match=r"^ablate.parallel: 2 runs x 1 workers of 1 CPUs each, .* hold 1 at once, not 2"
    ):
        check_fits(
            params(),
            {"CPU": 2.0},
            "x",
            runs=2,
            runs_key="ablate.parallel",
            nodes=[{"CPU": 0.5}, {"CPU": 1.5}],
        )
