"""Stage evaluate, end to end: measure a model file on the validation split, write the DVC outputs,
log them to the model's MLflow run and register the model (`pipeline.tracking.registry`).

Outputs (paths from the command line):

* metrics JSON (flat, for ``dvc metrics show/diff``): the 12 COCO bbox numbers (AP ... ARl),
  proposal recall ``proposal_AR100, proposal_AR1k, proposal_ARs1k, proposal_ARm1k, proposal_ARl1k``,
  ``AP_<category name>`` per category with ground truth, ``num_images``, and the time per image:
  ``eval_seconds_per_image`` (forward pass only), ``eval_wall_seconds_per_image`` (all of inference:
  decoding, loading, Ray), ``cocoeval_seconds`` (COCOeval of the detections) and
  ``proposal_eval_seconds`` (proposal recall, streamed image by image: COCOeval's numbers).
* PR-curve CSV (DVC plots): ``recall, precision_iou50, precision_iou50_95`` over COCO's 101 recall
  thresholds (area all, 100 detections, averaged over categories).
* pictures: ``<image_id>.jpg`` for the first ``evaluate.num_pictures`` validation images, detections
  scoring >= ``evaluate.draw_score_thresh`` drawn.

MLflow: the run whose id is in the model file's ``extra["mlflow_run_id"]`` (a new run in experiment
``train.experiment`` when absent or unknown to the tracking server) gets the same numbers (prefixed
``eval/``), the CSV, a PR-curve figure, the pictures and the model (pyfunc). The files are written
before anything is sent, so an unreachable tracking server loses only the MLflow side:
`EvaluationOutcome.tracking_error` says what was not logged.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from pipeline.config import Params
from pipeline.dataset import (
    INDEX_FILE,
    ShardReader,
    SplitIndex,
    files_sha256,
    read_categories,
    read_data_hash,
    read_index,
)
from pipeline.evaluate.coco_eval import (
    DetectionEvaluation,
    EvaluationError,
    evaluate_detections,
    load_ground_truth,
    streaming_proposal_recall,
)
from pipeline.evaluate.drawing import draw_detections
from pipeline.inference import (
    ImageDetections,
    InferenceRun,
    coco_results,
    label_to_category,
    predict_split,
    proposal_arrays,
)
from pipeline.io import atomic_directory, atomic_write_text, check_output_folder
from pipeline.model_file import LoadedModel, load_model_file
from pipeline.provenance import git_commit
from pipeline.storage import join_location
from pipeline.tracking.pyfunc import log_detector
from pipeline.tracking.registry import Registration, register_model
from pipeline.tracking.run import TrackedRun, TrackingError, check_tracking_uri, flatten, run_exists


@dataclass
class EvaluationOutcome:
    """What the stage did: the metrics written, and what happened on the MLflow side."""

    metrics: dict[str, float]
    run_id: str | None = None
    registered_version: str | None = None
    decision: str | None = None
    tracking_error: str | None = None
    logged: list[str] = field(default_factory=list)


def slug(name: str) -> str:
    """A category name as a metric-key part: ``traffic light`` -> ``traffic_light``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "unnamed"


def check_same_categories(
    model_categories: list[dict[str, Any]], data_categories: list[dict[str, Any]], *, model: Path, data: Path
) -> None:
    """The model's label -> COCO id mapping must be the data's, or every detection is mislabelled."""
    model_pairs = {(int(c["label"]), int(c["id"])) for c in model_categories}
    data_pairs = {(int(c["label"]), int(c["id"])) for c in data_categories}
    if model_pairs != data_pairs:
        raise EvaluationError(
            f"{model}: its categories (label -> COCO id) differ from {data / 'categories.json'}: "
            f"{len(model_pairs)} vs {len(data_pairs)} categories, first differing (label, id) pairs "
            f"{sorted(model_pairs ^ data_pairs)[:6]}"
        )


def build_metrics(
    det_eval: DetectionEvaluation,
    proposals: dict[str, float],
    run: InferenceRun,
    categories: list[dict[str, Any]],
) -> dict[str, float]:
    """The flat metrics dict written to the metrics JSON (see the module docstring)."""
    n = max(len(run.detections), 1)
    names = {int(c["id"]): str(c["name"]) for c in categories}
    metrics: dict[str, float] = dict(det_eval.metrics)
    metrics.update({f"proposal_{key}": value for key, value in proposals.items()})
    for cat_id, ap in sorted(det_eval.per_category_ap.items()):
        metrics[f"AP_{slug(names.get(cat_id, str(cat_id)))}"] = ap
    metrics["num_images"] = float(len(run.detections))
    metrics["eval_seconds_per_image"] = run.model_seconds / n
    metrics["eval_wall_seconds_per_image"] = run.wall_seconds / n
    metrics["cocoeval_seconds"] = det_eval.seconds
    return metrics


def write_pr_curve(path: Path, det_eval: DetectionEvaluation) -> None:
    """CSV ``recall, precision_iou50, precision_iou50_95`` (one row per COCO recall threshold)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["recall", "precision_iou50", "precision_iou50_95"])
    for r, p50, p in zip(
        det_eval.pr_recall, det_eval.pr_precision_50, det_eval.pr_precision_50_95, strict=True
    ):
        writer.writerow([f"{r:.2f}", f"{p50:.6f}", f"{p:.6f}"])
    atomic_write_text(path, buffer.getvalue())


def write_pictures(
    images_dir: Path,
    index: SplitIndex,
    positions: Sequence[int],
    detections: dict[int, ImageDetections],
    categories: list[dict[str, Any]],
    *,
    score_thresh: float,
) -> list[Path]:
    """Draw detections on the validation images at ``positions`` of ``index`` (original pixels, as the
    detections are); the folder is replaced as a whole."""
    by_label = label_to_category(categories)
    reader = ShardReader(index)
    with atomic_directory(images_dir, stage="evaluate", force=True) as staging:  # checked by run_evaluate
        for i in positions:
            image_id = int(index.image_ids[i])
            det = detections[image_id]
            names = [
                str(by_label.get(int(label), {"name": f"label {label}"})["name"]) for label in det.labels
            ]
            pixels = reader.image(i)[0].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
            drawn = draw_detections(
                Image.fromarray(pixels), det.boxes, names, det.scores, score_thresh=score_thresh
            )
            drawn.save(staging / f"{image_id}.jpg", quality=90)
    return sorted(images_dir.glob("*.jpg"))


def pr_curve_figure(det_eval: DetectionEvaluation) -> Figure:
    """Matplotlib figure of the two PR curves (for MLflow; not attached to pyplot, nothing to close)."""
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(det_eval.pr_recall, det_eval.pr_precision_50, label="IoU 0.5")
    ax.plot(det_eval.pr_recall, det_eval.pr_precision_50_95, label="IoU 0.5:0.95")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="COCO precision-recall (all categories)",
    )
    ax.legend()
    fig.tight_layout()
    return fig


def open_evaluation_run(
    uri: str, params: Params, loaded: LoadedModel, model_path: Path
) -> tuple[TrackedRun, bool]:
    """The model's training run (``extra["mlflow_run_id"]``) when the store at ``uri`` has it, else a
    new run ``evaluate-<file stem>`` in ``train.experiment``; returns (run, resumed). Strict: an
    MLflow failure raises `TrackingError`."""
    run_id = loaded.extra.get("mlflow_run_id")
    if run_id and run_exists(uri, run_id):
        return TrackedRun.open(uri, params.train.experiment, run_id=run_id, strict=True), True
    if run_id:
        print(f"evaluate: run {run_id} named by {model_path} is not on {uri}: starting a new run")
    run = TrackedRun.open(
        uri,
        params.train.experiment,
        run_name=f"evaluate-{model_path.stem}",
        tags={"model_file": str(model_path)},
        strict=True,
    )
    return run, False


def log_results(
    run: TrackedRun,
    params: Params,
    loaded: LoadedModel,
    *,
    metrics: dict[str, float],
    det_eval: DetectionEvaluation,
    files: tuple[Path, Path, Path],
    resumed: bool,
    outcome: EvaluationOutcome,
) -> None:
    """Params (a new run only), metrics as ``eval/<name>``, the files ``(metrics JSON, PR CSV,
    pictures folder)`` under ``evaluation/`` and the PR figure; notes each step in ``outcome``."""
    metrics_path, plots_path, images_dir = files
    if not resumed:
        run.log_params(flatten({"model": loaded.config.to_dict()}))
    run.set_tags({"evaluate.params": json.dumps(dataclasses.asdict(params.evaluate), sort_keys=True)})
    run.log_metrics({f"eval/{key}": value for key, value in metrics.items()}, step=0)
    outcome.logged.append("metrics")
    run.log_artifact(metrics_path, "evaluation")
    run.log_artifact(plots_path, "evaluation")
    run.log_figure(pr_curve_figure(det_eval), "evaluation/pr_curve.png")
    outcome.logged.append("PR curve")
    for picture in sorted(images_dir.glob("*.jpg")):  # the pictures, not the folder's output marker
        run.log_artifact(picture, "evaluation/images")
    outcome.logged.append("pictures")


def register_evaluated(
    run: TrackedRun,
    model_uri: str,
    params: Params,
    loaded: LoadedModel,
    *,
    metrics: dict[str, float],
    data_hash: str | None,
    val_data_hash: str,
) -> Registration:
    """Register the logged model as a version of ``evaluate.registered_model`` (champion policy:
    `pipeline.tracking.registry`), tagged with the metrics (no per-category AP) and the params;
    the run gets the version and the decision as tags ``eval.registered_model/registry_status``."""
    extra_params = loaded.extra.get("params") if isinstance(loaded.extra.get("params"), dict) else {}
    registration = register_model(
        run.client,
        model_uri,
        name=params.evaluate.registered_model,
        metrics={k: v for k, v in metrics.items() if not k.startswith("AP_")},
        params={
            **extra_params,
            "model": loaded.config.to_dict(),
            "evaluate": dataclasses.asdict(params.evaluate),
        },
        data_hash=data_hash,
        val_data_hash=val_data_hash,
        git_commit=loaded.extra.get("git_commit") or git_commit(),
        extra_tags={"eval_git_commit": git_commit(), "mlflow_run_id": run.run_id},
    )
    run.set_tags(
        {
            "eval.registered_model": f"{registration.name}/{registration.version}",
            "eval.registry_status": registration.decision.status,
        }
    )
    return registration


def publish_to_mlflow(
    params: Params,
    loaded: LoadedModel,
    *,
    model_path: Path,
    metrics: dict[str, float],
    det_eval: DetectionEvaluation,
    metrics_path: Path,
    plots_path: Path,
    images_dir: Path,
    data_hash: str | None,
    val_data_hash: str,
    outcome: EvaluationOutcome,
) -> None:
    """Log to the model's run, log the model (pyfunc) and register it; fills ``outcome`` step by
    step and raises at the first MLflow failure (see `run_evaluate`). The run ends FINISHED, or
    FAILED when a step failed."""
    run, resumed = open_evaluation_run(check_tracking_uri(), params, loaded, model_path)
    outcome.run_id = run.run_id
    try:
        files = (metrics_path, plots_path, images_dir)
        log_results(
            run,
            params,
            loaded,
            metrics=metrics,
            det_eval=det_eval,
            files=files,
            resumed=resumed,
            outcome=outcome,
        )
        info = log_detector(run, model_path)
        if info is None:  # only a run that is not strict returns None
            raise TrackingError(f"MLflow at {run.uri}: the model was not logged to run {run.run_id}")
        outcome.logged.append("model")
        registration = register_evaluated(
            run,
            info.model_uri,
            params,
            loaded,
            metrics=metrics,
            data_hash=data_hash,
            val_data_hash=val_data_hash,
        )
        outcome.logged.append("registry")
        outcome.registered_version = registration.version
        outcome.decision = f"{registration.decision.status}: {registration.decision.reason}"
    except BaseException:
        with contextlib.suppress(Exception):  # the first failure is the one to report
            run.finish("FAILED")
        raise
    run.finish("FINISHED")


def _ground_truth_for(index: SplitIndex) -> tuple[Any, list[int]]:
    """The annotation file the index names (a pycocotools ``COCO``) and the split's image ids in it."""
    gt = load_ground_truth(index.annotation_file)
    image_ids = [int(image_id) for image_id in index.image_ids]
    unknown = sorted(set(image_ids) - set(gt.getImgIds()))
    if unknown:
        raise EvaluationError(
            f"{join_location(index.folder, INDEX_FILE)}: image id(s) {unknown[:10]} are not in {index.annotation_file}"
        )
    return gt, image_ids


def _tracking_error(cfg: Any, outcome: EvaluationOutcome, files: list[Path], err: Exception) -> str:
    """What MLflow did not get, for the stage's one error line (the files were written)."""
    steps = ("metrics", "PR curve", "pictures", "model", "registry")
    missing = [step for step in steps if step not in outcome.logged]
    return (
        f"MLflow: not logged: {', '.join(missing)} (model not registered as {cfg.registered_model!r}); "
        f"the files {', '.join(str(f) for f in files)} were written. Cause: {type(err).__name__}: {err}"
    )


def run_evaluate(
    params: Params,
    *,
    model_path: str | Path,
    data_root: str | Path,
    metrics_path: str | Path,
    plots_path: str | Path,
    images_dir: str | Path,
    track: bool = True,
    force: bool = False,
) -> EvaluationOutcome:
    """Evaluate ``model_path`` on ``<data_root>/<data.val_split>``, write the outputs, then (``track``)
    log to MLflow and register. MLflow failures do not raise: see ``tracking_error``."""
    model_path, data_root = Path(model_path), Path(data_root)
    metrics_path, plots_path, images_dir = Path(metrics_path), Path(plots_path), Path(images_dir)
    check_output_folder(
        images_dir, "evaluate", force=force, inputs=[data_root, model_path]
    )  # before any work
    cfg, split = params.evaluate, params.data.val_split
    loaded = load_model_file(model_path)
    index = read_index(data_root, split)
    categories = read_categories(data_root)
    data_hash = read_data_hash(data_root)
    check_same_categories(loaded.categories, categories, model=model_path, data=data_root)
    gt, image_ids = _ground_truth_for(index)

    run = predict_split(
        model_path, data_root, split, batch_size=cfg.batch_size, num_workers=cfg.num_workers, loaded=loaded
    )
    det_eval = evaluate_detections(
        gt, coco_results(run.detections, categories), image_ids=image_ids, where="detections"
    )
    start = time.perf_counter()
    proposals = streaming_proposal_recall(gt, proposal_arrays(run.detections), image_ids=image_ids)
    metrics = build_metrics(det_eval, proposals, run, categories)
    metrics["proposal_eval_seconds"] = time.perf_counter() - start

    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    write_pr_curve(plots_path, det_eval)
    by_id = {det.image_id: det for det in run.detections}
    pictured = range(min(cfg.num_pictures, len(index)))
    write_pictures(images_dir, index, pictured, by_id, categories, score_thresh=cfg.draw_score_thresh)
    outcome = EvaluationOutcome(metrics=metrics)
    if not track:
        return outcome
    try:
        publish_to_mlflow(
            params, loaded, model_path=model_path, metrics=metrics, det_eval=det_eval,
            metrics_path=metrics_path, plots_path=plots_path, images_dir=images_dir,
            data_hash=data_hash,
            val_data_hash=files_sha256([*index.files(), data_root / "categories.json"]),
            outcome=outcome,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - the files are written; report what MLflow did not get
        outcome.tracking_error = _tracking_error(cfg, outcome, [metrics_path, plots_path, images_dir], err)
    return outcome
