"""The FPN paper's ablations (Tables 1-3 of Lin et al., CVPR 2017) as one reproducible run.

`run_ablation(params, data_root, work)` trains and evaluates every pyramid of ``ablate.variants``
(``single_c4``, ``single_c5``, ``fpn``, ``bottom_up``, ``top_down_no_lateral``, ``p2_only``) on
the same data, with the same ``train:`` schedule and seed and the same ``model:`` settings; only
``model.pyramid`` changes, and ``model.anchor_sizes`` where the variant has another number of
RPN levels (`variant_anchor_sizes`). Each variant is:

1. trained by `pipeline.train.stage.train` (Ray Train; the run is named from its params and the
   data hash, so an interrupted variant resumes its checkpoints and a changed one starts fresh);
2. evaluated by `pipeline.evaluate.stage.run_evaluate` (COCO AP and the RPN's proposal
   recall, no registry: a variant is not a release candidate);
3. logged to the MLflow run its training opened (experiment ``ablate.experiment``): the tag
   ``variant=<pyramid>`` and the evaluation as ``eval/<key>`` metrics with ``eval.json``;
4. kept as ``<work>/<pyramid>/<run name>/result.json`` (written last, atomically). A rerun
   reuses every kept result whose run name still matches and computes only the rest.

``ablate.parallel: N`` trains N variants side by side: N threads of this driver, each fitting
its own `TorchTrainer` on the Ray cluster (``RAY_ADDRESS``, else a local one); Ray queues a run
until the cluster has its workers' CPUs/GPUs free. With several writers at once a SQLite MLflow
store is put behind one local tracking server (`pipeline.tracking.server`).

Layout of ``work``::

    <work>/ray/<run name>/...                Ray Train storage (checkpoints; resumes), unless
                                             storage.ablate names another (s3://... on a cluster)
    <work>/<pyramid>/<run name>/model.pt     model file, train.json, train_loss.csv,
                                             eval.json, pr_curve.csv, eval_images/, result.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fpn.config import ROI_LEVELS, RPN_LEVELS
from pipeline import cluster
from pipeline.cluster import check_fits
from pipeline.config import ConfigError, Params, TrainConfig
from pipeline.dataset import read_data_hash
from pipeline.evaluate.coco_eval import PROPOSAL_KEYS
from pipeline.evaluate.stage import run_evaluate
from pipeline.io import atomic_write_text
from pipeline.storage import resolve_location
from pipeline.tracking.run import TrackedRun, tracking_uri
from pipeline.tracking.server import serve_sqlite
from pipeline.train.init_weights import resolve_init_weights
from pipeline.train.schedule import scaled_lr_steps
from pipeline.train.stage import TrainOutputs, run_name, train

log = logging.getLogger(__name__)

RPN_KEYS = PROPOSAL_KEYS  # AR100, AR1k, ARs1k, ARm1k, ARl1k (Table 1)
DETECTION_KEYS = ("AP", "AP50", "APs", "APm", "APl")  # Tables 2-3 (AP is COCO's .50:.95)
TIMING_KEYS = ("train_images_per_s", "test_ms_per_image")
RESULT_FILE = "result.json"
RESULT_VERSION = 1


class AblationError(RuntimeError):
    """One or more variants failed; the message names each and why. Finished ones are kept."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: a pyramid and the full params its run trains with."""

    name: str  # the model.pyramid value
    params: Params
    run_name: str  # `pipeline.train.stage.run_name` of ``params`` and the data hash

    def folder(self, work: Path) -> Path:
        return work / self.name / self.run_name


@dataclass
class VariantResult:
    """What one variant measured (fractions as COCO gives them; -1 where COCO has no ground truth)
    and which runs produced it."""

    variant: str
    run_name: str
    mlflow_run_id: str | None
    metrics: dict[str, float]  # RPN_KEYS, DETECTION_KEYS, TIMING_KEYS, AP75, iterations, ...
    anchor_sizes: list[int]
    rpn_levels: list[int]
    roi_levels: list[int]
    reused: bool = field(default=False, compare=False)  # read from the work dir, not computed now

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("reused")
        return {"version": RESULT_VERSION, **out}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VariantResult:
        if values.get("version") != RESULT_VERSION:
            raise ValueError(f"result version {values.get('version')!r}, expected {RESULT_VERSION}")
        missing = [k for k in (*RPN_KEYS, *DETECTION_KEYS, *TIMING_KEYS) if k not in values["metrics"]]
        if missing:
            raise ValueError(f"metrics lack {missing}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"reused"}
        return cls(**{k: values[k] for k in fields})


def variant_anchor_sizes(anchor_sizes: tuple[int, ...], pyramid: str) -> tuple[int, ...]:
    """``model.anchor_sizes`` fitted to ``pyramid``'s RPN levels (see `fpn.config.RPN_LEVELS`).

    A single-level RPN (``single_c4``, ``single_c5``, ``p2_only``) takes every size on its one
    level, as the paper's baselines do ("anchors of all 5 scales on C4"), so the sizes are kept.
    A multi-level RPN (P2..P6) needs one size per level: kept when the count matches, else
    spread geometrically from the smallest to the largest given size (one size s: s * 2^i).
    """
    levels = RPN_LEVELS[pyramid]
    sizes = tuple(int(s) for s in anchor_sizes)
    if len(levels) == 1 or len(sizes) == len(levels):
        return sizes
    low, high, n = min(sizes), max(sizes), len(levels)
    if low == high:
        return tuple(low * 2**i for i in range(n))
    return tuple(round(low * (high / low) ** (i / (n - 1))) for i in range(n))


def ablation_schedule(train_cfg: TrainConfig, iterations: int | None) -> TrainConfig:
    """``train:`` shortened (or lengthened) to ``iterations`` (None: unchanged), keeping its shape:
    ``lr_steps`` and ``warmup_iters`` become the same fractions of the new length."""
    if iterations is None or iterations == train_cfg.iterations:
        return train_cfg
    factor = iterations / train_cfg.iterations
    warmup = min(max(1, round(train_cfg.warmup_iters * factor)), iterations) if train_cfg.warmup_iters else 0
    steps = scaled_lr_steps(train_cfg, iterations)
    return dataclasses.replace(train_cfg, iterations=iterations, lr_steps=steps, warmup_iters=warmup)


def variant_params(params: Params, pyramid: str) -> Params:
    """The params one variant trains and evaluates with (`variant_anchor_sizes`, `ablation_schedule`,
    MLflow experiment ``ablate.experiment``). Raises ValueError naming the model field if invalid."""
    model = dataclasses.replace(
        params.model, pyramid=pyramid, anchor_sizes=variant_anchor_sizes(params.model.anchor_sizes, pyramid)
    )
    train_cfg = dataclasses.replace(
        ablation_schedule(params.train, params.ablate.iterations), experiment=params.ablate.experiment
    )
    return dataclasses.replace(params, model=model, train=train_cfg)


def plan_variants(params: Params, data_hash: str) -> list[Variant]:
    """The variants of ``ablate.variants``, in table order, each with its run name.

    A variant whose model config is invalid raises `ConfigError` naming it and the field."""
    variants = []
    for pyramid in params.ablate.variants:
        try:
            vp = variant_params(params, pyramid)
        except ValueError as err:
            raise ConfigError(f"ablate.variants: {pyramid}: {err}") from err
        variants.append(Variant(name=pyramid, params=vp, run_name=run_name(vp, data_hash)))
    return variants


def read_kept_result(variant: Variant, work: Path) -> VariantResult | None:
    """The result a previous run kept for ``variant`` (same run name), or None."""
    path = variant.folder(work) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = VariantResult.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        log.warning("%s: unreadable (%s): computing %s again", path, err, variant.name)
        return None
    if result.variant != variant.name or result.run_name != variant.run_name:
        log.warning("%s: belongs to %s/%s, not %s/%s: computing again", path, result.variant,
                    result.run_name, variant.name, variant.run_name)  # fmt: skip
        return None
    result.reused = True
    return result


def _log_evaluation(
    variant: Variant, run_id: str | None, eval_metrics: dict[str, float], folder: Path
) -> str | None:
    """Tag the variant's training run and add its evaluation to it; returns the run id (None: no MLflow)."""
    uri = tracking_uri()
    run = TrackedRun.open(
        uri,
        variant.params.train.experiment,
        run_id=run_id,
        run_name=variant.run_name,
        tags={"variant": variant.name, "ablation": "true", "run_name": variant.run_name},
    )
    step = int(variant.params.train.iterations)
    run.log_metrics({f"eval/{key}": float(value) for key, value in eval_metrics.items()}, step=step)
    run.log_artifact(folder / "eval.json", "evaluation")
    run.log_artifact(folder / "pr_curve.csv", "evaluation")
    run.finish("FINISHED")
    return run.run_id if run.active else None


def run_variant(
    variant: Variant, data_root: Path, work: Path, storage: str, *, use_ray: bool = True
) -> VariantResult:
    """Train, evaluate and log one variant (or read its kept result); writes ``result.json`` last."""
    kept = read_kept_result(variant, work)
    if kept is not None:
        log.info(
            "[ablate] %s: kept result of run %s (%s)", variant.name, variant.run_name, variant.folder(work)
        )
        return kept
    folder = variant.folder(work)
    folder.mkdir(parents=True, exist_ok=True)
    log.info("[ablate] %s: training run %s -> %s", variant.name, variant.run_name, folder)
    outputs = TrainOutputs(
        model=folder / "model.pt", metrics=folder / "train.json", plots=folder / "train_loss.csv"
    )
    train_metrics = train(variant.params, data_root, outputs, storage_path=storage, use_ray=use_ray)
    log.info("[ablate] %s: evaluating %s", variant.name, outputs.model)
    outcome = run_evaluate(
        variant.params,
        model_path=outputs.model,
        data_root=data_root,
        metrics_path=folder / "eval.json",
        plots_path=folder / "pr_curve.csv",
        images_dir=folder / "eval_images",
        track=False,
        force=True,  # the work folder is ablate's own
    )
    ev = outcome.metrics
    metrics: dict[str, float] = {key: float(ev[f"proposal_{key}"]) for key in RPN_KEYS}
    metrics.update({key: float(ev[key]) for key in (*DETECTION_KEYS, "AP75")})
    metrics["train_images_per_s"] = float(train_metrics["images_per_s"] or 0.0)
    metrics["test_ms_per_image"] = 1000.0 * float(ev["eval_seconds_per_image"])
    metrics["iterations"] = float(train_metrics["iterations"])
    metrics["train_time_s"] = float(train_metrics["train_time_s"])
    metrics["num_val_images"] = float(ev["num_images"])
    run_id = _log_evaluation(variant, train_metrics.get("mlflow_run_id"), ev, folder)
    result = VariantResult(
        variant=variant.name,
        run_name=variant.run_name,
        mlflow_run_id=run_id or train_metrics.get("mlflow_run_id"),
        metrics=metrics,
        anchor_sizes=list(variant.params.model.anchor_sizes),
        rpn_levels=list(RPN_LEVELS[variant.name]),
        roi_levels=list(ROI_LEVELS[variant.name]),
    )
    atomic_write_text(folder / RESULT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    log.info(
        "[ablate] %s: AP %.4f AR1k %.4f (kept in %s)", variant.name, metrics["AP"], metrics["AR1k"], folder
    )
    return result


@dataclass
class AblationRun:
    """Every variant's result in table order, and how the run went."""

    variants: list[Variant]
    results: list[VariantResult]
    data_hash: str
    parallel: int
    wall_time_s: float


def _check_parallel_fits(params: Params, parallel: int, where: str) -> None:
    """Warn when ``parallel`` runs cannot all hold their workers at once on the cluster (Ray queues them)."""
    try:
        check_fits(
            params, cluster.resources(), where, runs=parallel, runs_key="ablate.parallel",
            nodes=cluster.node_resources(),
        )  # fmt: skip
    except ConfigError as err:
        log.warning("%s: Ray runs the rest as resources free up", err)


def run_ablation(
    params: Params, data_root: str | Path, work: str | Path, *, use_ray: bool = True
) -> AblationRun:
    """Train and evaluate every variant (kept results reused); raise `AblationError` if any failed."""
    started = time.perf_counter()
    data_root, work = Path(data_root).resolve(), Path(work).resolve()
    data_hash = read_data_hash(data_root)
    variants = plan_variants(params, data_hash)
    storage = resolve_location(params.storage.ablate or str(work / "ray"))  # storage.ablate: e.g. s3://
    parallel = min(params.ablate.parallel, len(variants)) if use_ray else 1
    if params.ablate.parallel > 1 and not use_ray:
        log.warning("ablate.parallel=%d ignored without Ray: one variant at a time", params.ablate.parallel)
    todo = [v for v in variants if read_kept_result(v, work) is None]
    log.info(
        "[ablate] %d variants (%s), %d kept in %s, %d to run, %d at a time",
        len(variants), ", ".join(v.name for v in variants), len(variants) - len(todo), work, len(todo), parallel,
    )  # fmt: skip
    if todo:
        resolve_init_weights(params)  # download named weights once, before threads race for them
    if todo and use_ray:
        where = cluster.connect()  # in this thread: ray.init is not for several threads at once
        cluster.check_tracking_reachable(tracking_uri(), cluster.node_count(), where)
        _check_parallel_fits(params, parallel, where)

    results: dict[str, VariantResult] = {}
    errors: dict[str, BaseException] = {}
    # Several runs log at once: one server owns a SQLite store (no-op for other URIs).
    serve = serve_sqlite(tracking_uri()) if parallel > 1 and len(todo) > 1 else contextlib.nullcontext()
    with serve, ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="ablate") as pool:
        futures = {
            pool.submit(run_variant, v, data_root, work, storage, use_ray=use_ray): v for v in variants
        }
        bar = tqdm(total=len(variants), desc="ablation variants", unit="variant")
        for future in as_completed(futures):
            variant = futures[future]
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - the others go on; all failures are reported together
                log.error("[ablate] %s failed: %s: %s", variant.name, type(err).__name__, err)
                errors[variant.name] = err
            else:
                results[variant.name] = result
            bar.update(1)
        bar.close()
    if errors:
        detail = "; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in errors.items())
        raise AblationError(
            f"{len(errors)} of {len(variants)} variants failed ({detail}); the {len(results)} finished ones are "
            f"kept in {work} and will not be recomputed on the next run"
        ) from next(iter(errors.values()))
    return AblationRun(
        variants=variants,
        results=[results[v.name] for v in variants],
        data_hash=data_hash,
        parallel=parallel,
        wall_time_s=time.perf_counter() - started,
    )
