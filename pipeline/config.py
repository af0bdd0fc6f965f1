"""Typed pipeline configuration: `params.yaml` is read here, and only here.

Each top-level section of `params.yaml` maps to one frozen dataclass below (`model:` maps to
`fpn.ModelConfig`). Unknown or mistyped keys raise `ConfigError` naming the key, e.g.
``params.yaml: train.lrr: unknown key``. Paths are *not* params: they are given on each
stage's command line in `dvc.yaml`. The one exception is section `storage:`, where Ray keeps its
runs: not a DVC output but state that outlives runs (like the MLflow store), often a bucket, and
a setting a user changes per machine or cluster (`StorageConfig`).

Conventions:

* A params *file* names every section (`read_params_file`): the defaults of the dataclasses
  are the paper's COCO recipe (ResNet-50, 800 px, 90k iterations), so a forgotten section
  must not silently become it. An empty section (``tune: {}`` or a bare ``tune:``) takes
  that section's defaults on purpose. `params_from_dict` (no file) takes partial dicts.
* Floats are finite: ``.inf`` and ``.nan`` are refused for every float key (`_check_type`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fpn.config import PYRAMIDS, ModelConfig


class ConfigError(ValueError):
    """A params file that cannot be turned into typed config; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    """Section `data:` (stage fetch): where the COCO-layout dataset comes from."""

    source: str = "synthetic"  # synthetic | coco | local
    base_url: str = "http://images.cocodataset.org"
    max_images: int | None = None  # per split, the first N of each annotation file (coco, local); None = all
    train_split: str = "train2017"
    val_split: str = "val2017"
    download_workers: int = 8
    retries: int = 3
    timeout_s: float = 30.0
    # Synthetic generator (source: synthetic).
    seed: int = 0
    synthetic_kind: str = "shapes"  # shapes | context (pipeline.fetch.synthetic_context)
    synthetic_train_images: int = 400
    synthetic_val_images: int = 100
    synthetic_width: int = 320
    synthetic_height: int = 256
    # Local copy (source: local; the folder itself is stage fetch's --local-dir argument).
    local_link: bool = False  # hard-link images instead of copying (same filesystem only)

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "coco", "local"):
            raise ValueError(f"source: must be synthetic, coco or local, got {self.source!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images: must be >= 1 or null, got {self.max_images}")
        if self.download_workers < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("download_workers must be >= 1, retries >= 0 and timeout_s > 0")
        if self.synthetic_kind not in ("shapes", "context"):
            raise ValueError(f"synthetic_kind: must be shapes or context, got {self.synthetic_kind!r}")
        if self.synthetic_train_images < 1 or self.synthetic_val_images < 1:
            raise ValueError("synthetic_train_images and synthetic_val_images: must be >= 1")
        if min(self.synthetic_width, self.synthetic_height) < 64:
            raise ValueError("synthetic_width and synthetic_height: must be >= 64 pixels")
        if self.train_split == self.val_split:
            raise ValueError(f"train_split and val_split must differ, both are {self.train_split!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Section `preprocess:`: parallelism, shard size and the quality of converted images.

    There is no resize scale: images are stored at their original size and the detector's
    transform resizes them (to `model.min_size`/`model.max_size`), so the model and its data
    can never disagree.
    """

    workers: int = 0  # processes; 0 = all cores
    jpeg_quality: int = 95  # only for images converted to RGB JPEG (RGB JPEGs keep their bytes)
    # Images per Parquet shard (~160 KB each at COCO's 640x480: 2000 is ~320 MB a shard).
    images_per_shard: int = 2000
    # Larger images (width x height, read from the header before decoding) are skipped and
    # reported. COCO's largest is 640x640 (0.4 Mpx); 50 Mpx is ~150 MB decoded. PIL refuses
    # images over ~179 Mpx (its decompression-bomb limit) whatever this says.
    max_pixels: int = 50_000_000
    # Ray tasks on the cluster at RAY_ADDRESS (a local one if unset). RAY_ADDRESS alone does not
    # switch: the images travel to the tasks and back, which local processes on a big head avoid.
    use_ray: bool = False

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0 (0 = all cores), got {self.workers}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: must be in 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1, got {self.max_pixels}")
        if self.images_per_shard < 1:
            raise ValueError(f"images_per_shard: must be >= 1, got {self.images_per_shard}")


AMP_MODES = ("bf16", "fp16", "off")
CPU_AMP_MODES = ("auto", "bf16", "off")
LOADERS = ("torch", "ray_data")  # train.loader
# Keys that moved: where each one lives now.
MOVED_KEYS = {
    "TrainConfig.storage_path": "it is storage.train now (section storage:)",
}


@dataclass(frozen=True)
class TrainConfig:
    """Section `train:` (stage train): Ray Train scaling, the schedule and checkpointing."""

    num_workers: int = 1
    # Elastic training (Ray Train's ScalingConfig(num_workers=(min_workers, num_workers))): 0 = a
    # fixed num_workers; else the run starts with as many workers as fit, at least min_workers,
    # and after losing a node continues from the latest checkpoint with fewer. The lr follows
    # the global batch (batch_size x workers), see `pipeline.train.elastic`.
    min_workers: int = 0
    # Elastic only: how often (s) Ray Train checks for room for more workers while training; when a
    # node has joined, the run restarts from its latest checkpoint with the larger group.
    resize_check_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 2  # images per worker per step
    lr: float = 0.02  # for `lr_reference_batch` images per step; scaled linearly with the global batch
    lr_reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    iterations: int = 90000
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (60000, 80000)
    amp: str = "bf16"  # bf16 | fp16 | off (used on GPUs only)
    # CPUs: off (float32) | bf16 (bfloat16 autocast) | auto: bf16 where the CPU computes it natively
    # (AVX512-BF16 or AMX: ~1.4x the images/s of float32 for the embedded default), else off.
    cpu_amp: str = "off"
    init_weights: str | None = None  # None (random) | imagenet | torchvision-coco | path to a state dict
    flip_prob: float = 0.5
    loader_workers: int = 0
    # torch: a DataLoader on each worker (loader_workers processes); ray_data: Ray Data streams the
    # shards to each Ray Train worker (`pipeline.train.streaming`; needs CPUs beyond the workers').
    # The same batches either way; without Ray, torch.
    loader: str = "torch"
    checkpoint_every: int = 500
    max_failures: int = 2
    log_every: int = 20
    seed: int = 0
    experiment: str = "fpn"  # MLflow experiment
    threads: int = 0  # torch threads per worker; 0 = the worker's CPUs (Ray) or torch's default
    flush_denormal: bool = True  # CPU: flush denormal floats (a from-scratch detector slows ~3x without)
    grad_clip_norm: float | None = None  # clip the global gradient L2 norm to this; null = no clipping
    # Periodic validation: every `eval_every` iterations (a multiple of checkpoint_every; 0 = off)
    # rank 0 scores the checkpoint on the first `val_images` images of data.val_split; the best
    # checkpoint by val_ap is kept beside the latest (`pipeline.train.best`).
    eval_every: int = 0
    val_images: int = 50
    system_metrics_s: float = 10.0  # MLflow system metrics (CPU, memory, GPU) sampled this often; 0 = off

    @property
    def elastic(self) -> bool:
        """True when the number of workers may change during the run (``min_workers < num_workers``)."""
        return 0 < self.min_workers < self.num_workers

    def __post_init__(self) -> None:
        for key, low in (("num_workers", 1), ("batch_size", 1), ("lr_reference_batch", 1), ("iterations", 1),
                         ("weight_decay", 0.0), ("warmup_iters", 0), ("loader_workers", 0),
                         ("checkpoint_every", 1), ("log_every", 1), ("threads", 0),
                         ("eval_every", 0), ("val_images", 1), ("system_metrics_s", 0.0),
                         ("resize_check_s", 0.0), ("max_failures", -1)):  # fmt: skip  # max_failures -1: retry forever (Ray's convention)
            if getattr(self, key) < low:
                raise ValueError(f"{key}: must be >= {low}, got {getattr(self, key)}")
        for key in ("cpus_per_worker", "lr") + (
            ("grad_clip_norm",) if self.grad_clip_norm is not None else ()
        ):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.warmup_factor <= 1.0:
            raise ValueError(f"warmup_factor: must be in (0, 1], got {self.warmup_factor}")
        if any(b <= a for a, b in zip((0, *self.lr_steps), self.lr_steps, strict=False)):
            raise ValueError(f"lr_steps: must be increasing iterations >= 1, got {list(self.lr_steps)}")
        if self.lr_steps and self.lr_steps[-1] >= self.iterations:
            raise ValueError(
                f"lr_steps: must be < train.iterations ({self.iterations}), got {list(self.lr_steps)}"
            )
        if self.eval_every % self.checkpoint_every:
            raise ValueError(
                f"eval_every: must be a multiple of checkpoint_every ({self.checkpoint_every}): validation "
                f"scores a checkpoint; got {self.eval_every}"
            )
        if self.min_workers < 0 or self.min_workers > self.num_workers:
            raise ValueError(
                f"min_workers: must be 0 (fixed) or in [1, num_workers ({self.num_workers})], got {self.min_workers}"
            )
        if self.elastic and self.loader == "ray_data":
            raise ValueError(
                "loader: ray_data plans each rank's batches for a fixed number of workers; "
                "use loader: torch with min_workers (elastic training)"
            )
        if self.loader not in LOADERS:
            raise ValueError(f"loader: must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.cpu_amp not in CPU_AMP_MODES:
            raise ValueError(f"cpu_amp: must be one of {', '.join(CPU_AMP_MODES)}, got {self.cpu_amp!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob: must be in [0, 1], got {self.flip_prob}")
        if not self.experiment.strip():
            raise ValueError("experiment: must name an MLflow experiment, got an empty string")


@dataclass(frozen=True)
class EvaluateConfig:
    """Section `evaluate:` (stage evaluate): inference batch, registry name, pictures."""

    batch_size: int = 2
    num_workers: int = 0  # Ray workers for inference; 0 = in process
    registered_model: str = "fpn-detector"
    num_pictures: int = 6
    draw_score_thresh: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.num_pictures < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, num_pictures >= 0; got "
                f"{self.batch_size}, {self.num_workers}, {self.num_pictures}"
            )
        if not 0.0 <= self.draw_score_thresh <= 1.0:
            raise ValueError(f"draw_score_thresh: must be in [0, 1], got {self.draw_score_thresh}")
        if not self.registered_model.strip():
            raise ValueError("registered_model: must be a non-empty MLflow model name")


@dataclass(frozen=True)
class ProfileConfig:
    """Section `profile:` (stage profile): what to time and how long.

    Inputs are seeded synthetic images of model.min_size (the last of a list: the test size) x
    model.max_size (height x width); the training step runs at train.batch_size.
    """

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 2
    iterations: int = 5
    compare_torchvision: bool = True
    single_scale_baseline: bool = True
    train_step: bool = True
    channels_last: bool = False
    compile: bool = False
    bf16: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")  # measured where present; cuda is skipped without a GPU
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0  # synthetic inputs and reference weights
    # here | cluster (a Ray task with one training worker's CPUs and GPU) | auto: cluster when
    # RAY_ADDRESS is set (`pipeline.profile.on_cluster`)
    where: str = "auto"

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes: every batch size must be >= 1, got {list(self.batch_sizes)}")
        if self.warmup < 0 or self.iterations < 1:
            raise ValueError(f"need warmup >= 0 and iterations >= 1, got {self.warmup} and {self.iterations}")
        if not self.devices or any(d not in ("cpu", "cuda") for d in self.devices):
            raise ValueError(f"devices: each must be cpu or cuda, got {list(self.devices)}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0, got {self.threads}")
        if self.where not in ("here", "cluster", "auto"):
            raise ValueError(f"where: must be here, cluster or auto, got {self.where!r}")


@dataclass(frozen=True)
class TuneConfig:
    """Section `tune:` (stage tune): Ray Tune search over train/model keys (`pipeline.tune.stage`).

    Each trial trains ``iterations`` iterations, scoring a checkpoint on ``val_images`` held-out
    images of data.val_split every ``eval_every``; ASHA stops the weaker trials at
    ``grace_period * reduction_factor**k`` iterations. The space is checked by
    `pipeline.tune.search_space.parse_space` (it needs the other sections).
    """

    num_samples: int = 8  # trials
    # Trials at once (each takes train.num_workers x train.cpus_per_worker CPUs).
    max_concurrent_trials: int = 1
    iterations: int = 300  # training iterations per trial (the ASHA max_t)
    eval_every: int = 50  # iterations between checkpoints scored on the held-out images
    grace_period: int = 100  # iterations before ASHA may stop a trial
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    metric: str = "val_ap50"  # val_ap50 | val_ap (held-out AP) | train_loss (mean since the last evaluation)
    mode: str = "max"  # max for val_ap50/val_ap, min for train_loss
    val_images: int = 50  # held-out images (the first of data.val_split by image id)
    search: str = "optuna"  # optuna (TPE) | random
    seed: int = 0
    # Search space: "section.key" -> {"type": loguniform|uniform|choice|randint, ...}
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        metrics = {"val_ap50": "max", "val_ap": "max", "train_loss": "min"}
        if self.metric not in metrics:
            raise ValueError(f"metric: must be one of {', '.join(metrics)}, got {self.metric!r}")
        if self.mode != metrics[self.metric]:
            raise ValueError(
                f"mode: {self.metric} is compared with {metrics[self.metric]}, got {self.mode!r}"
            )
        if self.search not in ("optuna", "random"):
            raise ValueError(f"search: must be optuna or random, got {self.search!r}")
        if (
            min(
                self.num_samples,
                self.max_concurrent_trials,
                self.iterations,
                self.eval_every,
                self.val_images,
            )
            < 1
        ):
            raise ValueError(
                "num_samples, max_concurrent_trials, iterations, eval_every, val_images: must be >= 1"
            )
        if not self.eval_every <= self.grace_period <= self.iterations:
            raise ValueError(
                f"grace_period: must be in [eval_every, iterations] = [{self.eval_every}, {self.iterations}], "
                f"got {self.grace_period}"
            )
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor: must be >= 2, got {self.reduction_factor}")


@dataclass(frozen=True)
class AblateConfig:
    """Section `ablate:` (stage ablate): the paper's ablations (Tables 1-3) as one table.

    Each variant is a ``model.pyramid`` trained and evaluated with the rest of ``model:`` and
    ``train:`` unchanged (same data, schedule and seed); ``model.anchor_sizes`` is adapted when
    the variant has a different number of RPN levels (`pipeline.ablate.stage.variant_anchor_sizes`).
    """

    variants: tuple[str, ...] = (
        "single_c4",
        "single_c5",
        "fpn",
        "bottom_up",
        "top_down_no_lateral",
        "p2_only",
    )
    parallel: int = 1  # variants trained side by side (each its own Ray Train run)
    iterations: int | None = None  # None: train.iterations; else lr_steps and warmup_iters scale with it
    experiment: str = "fpn-ablation"  # MLflow experiment of the variants' runs (instead of train.experiment)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants: give at least one pyramid")
        for name in self.variants:
            if name not in PYRAMIDS:
                raise ValueError(f"variants: unknown pyramid {name!r} (choose from {', '.join(PYRAMIDS)})")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: each pyramid at most once, got {list(self.variants)}")
        if self.parallel < 1:
            raise ValueError(f"parallel: must be >= 1, got {self.parallel}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations: must be >= 1 or null, got {self.iterations}")
        if not self.experiment.strip():
            raise ValueError("experiment: must name an MLflow experiment")


# URI schemes pyarrow's ``FileSystem.from_uri`` opens, the call Ray makes for a storage path.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def check_storage_location(location: str) -> None:
    """Raise `ValueError` unless ``location`` is a folder or a URI Ray can keep runs in.

    A folder is any non-empty path (relative ones are under the project root); a URI is
    ``<scheme>://<rest>`` with a scheme of `STORAGE_SCHEMES`. ``s3:/bucket`` (one slash, what
    ``pathlib`` makes of a URI) is refused rather than taken for a folder named ``s3:``.
    """
    if not location.strip() or location != location.strip():
        raise ValueError(f"expected a folder or a URI without surrounding spaces, got {location!r}")
    scheme, sep, rest = location.partition("://")
    if sep:
        # file:///abs/path has an empty host; every other scheme names its bucket (host) first.
        named = rest.strip("/") if scheme.lower() == "file" else rest.split("/", 1)[0]
        if scheme.lower() not in STORAGE_SCHEMES or not named:
            raise ValueError(
                f"expected a folder or <scheme>://<bucket>/<prefix> with a scheme of "
                f"{', '.join(STORAGE_SCHEMES)}, got {location!r}"
            )
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", location):
        raise ValueError(
            f"{location!r} looks like a URI with one slash: write {location.split(':', 1)[0]}://..."
        )


@dataclass(frozen=True)
class StorageConfig:
    """Section `storage:`: where Ray Train and Tune keep their runs (checkpoints, trial state), and
    where a cluster's workers read the training data from.

    Each value is a folder (relative to the project root; on a cluster of several nodes, storage
    every node mounts at the same path, e.g. NFS) or an object-store URI such as
    ``s3://bucket/runs`` (`pipeline.storage`; credentials and endpoint from the ``AWS_*``
    environment, never from here). Not DVC outputs: state that outlives runs, like the MLflow
    store. A stage's ``--storage-path`` overrides its key for one run.
    """

    train: str = "runs/ray"  # stage train's Ray Train runs: <train>/<run name>/checkpoint_<iteration>
    tune: str = "runs/tune"  # stage tune's sweeps: <tune>/<sweep name>/...
    ablate: str | None = None  # stage ablate's Ray Train runs; None: <--work>/ray
    # Where train, tune and ablate copy a local --data folder for the workers, once per data hash
    # (<data>/<data hash>/, `pipeline.data_staging`); None: workers read --data where it is.
    data: str | None = None

    def __post_init__(self) -> None:
        for key in ("train", "tune", "ablate", "data"):
            if getattr(self, key) is None:  # ablate, data: optional
                continue
            try:
                check_storage_location(getattr(self, key))
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None


@dataclass(frozen=True)
class Params:
    """The whole `params.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), e.g. to log to MLflow or hash."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` coerced to ``annotation`` (lists to tuples, ints to floats) or raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if float in args and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            return tuple(_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _section(cls: type, values: Any, where: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            moved = MOVED_KEYS.get(f"{cls.__name__}.{key}")
            if moved:
                raise ConfigError(f"{where}.{key}: moved: {moved}")
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    typed = {key: _check_type(value, hints[key], f"{where}.{key}") for key, value in values.items()}
    try:
        return cls(**typed)
    except (ValueError, TypeError) as err:
        # A message that starts with one of the section's keys ("lr: must be > 0") names it in full.
        first = str(err).split(":", 1)[0]
        raise ConfigError(f"{where}.{err}" if first in known else f"{where}: {err}") from err


def params_from_dict(raw: dict[str, Any], *, where: str = "params") -> Params:
    """Typed `Params` from a nested dict; every problem raises `ConfigError` naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{where}: {key}: unknown section (known: {', '.join(sorted(sections))})")
    hints = typing.get_type_hints(Params)
    return Params(**{key: _section(hints[key], value, f"{where}: {key}") for key, value in raw.items()})


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The params file as a checked nested dict (every key and value as `load_params` checks them).

    Every section of `Params` must be present (see the module docstring). For callers that
    change the dict before typing it (stage tune merges each trial's sample in).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:  # an empty file would otherwise mean every default: the full COCO recipe
        raise ConfigError(f"{path}: empty params file (copy the project's params.yaml and edit it)")
    params_from_dict(raw, where=str(path))  # errors name the file; a mistyped section first
    _check_every_section(raw, path)
    return raw


def _check_every_section(raw: dict[str, Any], path: Path) -> None:
    """Raise `ConfigError` naming the sections of `Params` that ``raw`` (a params file) lacks."""
    missing = [f.name for f in dataclasses.fields(Params) if f.name not in raw]
    if missing:
        raise ConfigError(
            f"{path}: missing section(s) {', '.join(missing)}: a params file names every section, as "
            "its defaults are the paper's COCO recipe (ResNet-50, 800 px, 90k iterations); copy them "
            f"from the project's params.yaml, or write e.g. '{missing[0]}: {{}}' to take its defaults"
        )


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read `params.yaml` (and optional ``{"section.key": value}`` overrides) into `Params`."""
    path = Path(path)
    raw = read_params_file(path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected section.key")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: {section}: expected a mapping")
        raw[section][key] = value
    return params_from_dict(raw, where=str(path))
