"""Run a trained detector over images: batched, on the GPU when there is one, optionally on Ray.

Coordinates: the detector returns boxes in the pixels of the image it was given. For the
preprocessed validation split (images already resized by ``scale_x``/``scale_y`` of index.json)
`predict_split` maps them back to the ORIGINAL image by dividing by those scales, which is what
COCO's ground truth is in. Labels are the model's contiguous 1..K; `categories` (categories.json,
also stored in the model file) maps label -> COCO category id and name.

With ``num_workers > 0`` the split is cut into that many shards, each a Ray task (1 CPU, and 1 GPU
when the cluster has GPUs) that loads the model file from the object store and reads its images
from ``data_root``: on a multi-node cluster ``data_root`` must be on storage every node sees.
The cluster is the one named by ``RAY_ADDRESS``, else a local one started (and stopped) here.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline import dataset
from pipeline.cluster import connected
from pipeline.model_file import LoadedModel, load_model_file


class InferenceError(ValueError):
    """Data the detector cannot be run on; the message names the file."""


@dataclass
class ImageDetections:
    """The detector's output on one image, as numpy arrays.

    boxes (N, 4) and proposals (P, 4) are xyxy pixels of the frame named by the producer
    (`predict_split`: the original image); labels (N,) are contiguous 1..K.
    """

    image_id: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    proposals: np.ndarray
    proposal_scores: np.ndarray


@dataclass
class InferenceRun:
    """Detections of a whole split, and how long the detector took.

    ``model_seconds`` sums the forward passes only (CUDA synchronised); ``wall_seconds`` is the
    whole inference including image decoding, model loading and Ray scheduling.
    """

    detections: list[ImageDetections]
    model_seconds: float
    wall_seconds: float
    device: str
    num_workers: int


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode: L, RGBA, ...) -> float32 Tensor[3, H, W] in 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as Tensor[3, H, W] float 0..1; `InferenceError` naming it if unreadable."""
    try:
        with Image.open(path) as image:
            return image_to_tensor(image)
    except (OSError, ValueError) as err:
        raise InferenceError(f"{path}: cannot read image: {err}") from err


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def detect(
    model: torch.nn.Module, images: Sequence[torch.Tensor], device: torch.device
) -> tuple[list[ImageDetections], float]:
    """One batched forward pass; returns per-image detections (input pixels, image_id -1) and its seconds."""
    batch = [image.to(device, non_blocking=True) for image in images]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = model(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    empty = torch.zeros((0, 4))
    detections = [
        ImageDetections(
            image_id=-1,
            boxes=out["boxes"].float().cpu().numpy(),
            scores=out["scores"].float().cpu().numpy(),
            labels=out["labels"].cpu().numpy().astype(np.int64),
            proposals=out.get("proposals", empty).float().cpu().numpy(),
            proposal_scores=out.get("proposal_scores", empty[:, 0]).float().cpu().numpy(),
        )
        for out in outputs
    ]
    return detections, seconds


def to_original_frame(det: ImageDetections, image_id: int, scale_x: float, scale_y: float) -> ImageDetections:
    """Divide x by ``scale_x`` and y by ``scale_y`` (resized frame -> original image pixels)."""
    scale = np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    return ImageDetections(
        image_id=int(image_id),
        boxes=det.boxes / scale,
        scores=det.scores,
        labels=det.labels,
        proposals=det.proposals / scale,
        proposal_scores=det.proposal_scores,
    )


def _batches(entries: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    # Similar aspect ratios together: less padding in a batch, so less wasted compute.
    ordered = sorted(entries, key=lambda e: (e.get("aspect_ratio", 1.0), e["image_id"]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def predict_entries(
    model: torch.nn.Module,
    split_dir: Path,
    entries: list[dict[str, Any]],
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[ImageDetections], float]:
    """Detections (original image frame) for index entries of one split folder, and the model seconds."""
    model.to(device).eval()
    results: list[ImageDetections] = []
    model_seconds = 0.0
    for batch in tqdm(_batches(entries, batch_size), desc="evaluate", unit="batch", disable=not progress):
        images = [read_image(split_dir / entry["file"]) for entry in batch]
        detections, seconds = detect(model, images, device)
        model_seconds += seconds
        for entry, det in zip(batch, detections, strict=True):
            results.append(to_original_frame(det, entry["image_id"], entry["scale_x"], entry["scale_y"]))
    return results, model_seconds


def _predict_shard(
    model_bytes: bytes, split_dir: str, entries: list[dict[str, Any]], batch_size: int
) -> tuple[list[ImageDetections], float]:
    """Body of one Ray task: load the model file from bytes, run `predict_entries` on the shard."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(model_bytes)
        loaded = load_model_file(path)
    return predict_entries(
        loaded.model, Path(split_dir), entries, batch_size=batch_size, device=default_device(), progress=False
    )


def _predict_on_ray(
    model_file: Path, split_dir: Path, entries: list[dict[str, Any]], *, batch_size: int, num_workers: int
) -> tuple[list[ImageDetections], float, str]:
    import ray  # only this path needs Ray

    with connected(log_to_driver=False, dashboard=False):
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_predict_shard)
        model_ref = ray.put(model_file.read_bytes())
        shards = [entries[i::num_workers] for i in range(num_workers) if entries[i::num_workers]]
        # Absolute: a task's working directory is Ray's copy of the code (pipeline.runtime_env).
        images = str(split_dir.resolve())
        pending = [task.remote(model_ref, images, shard, batch_size) for shard in shards]
        detections: list[ImageDetections] = []
        model_seconds = 0.0
        with tqdm(total=len(entries), desc=f"evaluate ({len(shards)} Ray workers)", unit="img") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                shard_detections, seconds = ray.get(done[0])
                detections.extend(shard_detections)
                model_seconds += seconds
                bar.update(len(shard_detections))
        return detections, model_seconds, "cuda" if gpus else "cpu"


def predict_split(
    model_file: str | Path,
    data_root: str | Path,
    split: str,
    *,
    batch_size: int,
    num_workers: int = 0,
    loaded: LoadedModel | None = None,
    limit: int | None = None,
) -> InferenceRun:
    """Detections of every image of a preprocessed split, in original image pixels, sorted by image id.

    ``num_workers`` 0 runs in this process (``loaded``, if given, saves loading the file again);
    more runs that many Ray tasks over shards. ``limit`` keeps the first images of the index.
    """
    if batch_size < 1:
        raise InferenceError(f"evaluate.batch_size must be >= 1, got {batch_size}")
    model_file, split_dir = Path(model_file), Path(data_root) / split
    entries = dataset.read_index(data_root, split)["images"][:limit]
    start = time.perf_counter()
    if num_workers > 0:
        detections, model_seconds, device = _predict_on_ray(
            model_file, split_dir, entries, batch_size=batch_size, num_workers=num_workers
        )
    else:
        loaded = loaded or load_model_file(model_file)
        dev = default_device()
        detections, model_seconds = predict_entries(
            loaded.model, split_dir, entries, batch_size=batch_size, device=dev
        )
        device = dev.type
    detections.sort(key=lambda d: d.image_id)
    return InferenceRun(
        detections=detections,
        model_seconds=model_seconds,
        wall_seconds=time.perf_counter() - start,
        device=device,
        num_workers=num_workers,
    )


def _xywh_array(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) float64 COCO xywh, rounded to 0.01 px."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    """(N, 4) xyxy -> N COCO [x, y, w, h] lists, rounded to 0.01 px."""
    return _xywh_array(boxes).tolist()


def label_to_category(categories: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """label (1..K) -> {"label", "id", "name"}."""
    return {int(c["label"]): c for c in categories}


def coco_results(
    detections: Sequence[ImageDetections], categories: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """COCO results list (bbox xywh, COCO category ids) of detections already in the original frame."""
    by_label = label_to_category(categories)
    results = []
    for det in detections:
        unknown = sorted(set(det.labels.tolist()) - set(by_label))
        if unknown:
            raise InferenceError(f"model predicted label(s) {unknown}, which the categories do not have")
        for bbox, score, label in zip(
            _xywh(det.boxes), det.scores.tolist(), det.labels.tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": det.image_id,
                    "category_id": int(by_label[label]["id"]),
                    "bbox": bbox,
                    "score": round(score, 5),
                }
            )
    return results


def proposal_results(detections: Sequence[ImageDetections]) -> list[dict[str, Any]]:
    """Proposals as class-less COCO results (bbox xywh, score) for `pipeline.evaluate.coco_eval.proposal_recall`."""
    return [
        {"image_id": det.image_id, "bbox": bbox, "score": score}
        for det in detections
        for bbox, score in zip(_xywh(det.proposals), det.proposal_scores.tolist(), strict=True)
    ]


def proposal_arrays(detections: Iterable[ImageDetections]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Proposals image by image for `pipeline.evaluate.coco_eval.streaming_proposal_recall`.

    Yields ``(image_id, boxes, scores)``: boxes (P, 4) float64 COCO xywh rounded to 0.01 px and
    scores (P,) float64, in the order of ``det.proposals``: the numbers `proposal_results` gives,
    as arrays and one image at a time (nothing is built for the whole split).
    """
    for det in detections:
        scores = np.asarray(det.proposal_scores, dtype=np.float64).reshape(-1)
        yield det.image_id, _xywh_array(det.proposals), scores


def detection_records(
    det: ImageDetections, categories: Sequence[dict[str, Any]], *, score_thresh: float = 0.0
) -> list[dict[str, Any]]:
    """JSON-ready detections of one image: bbox xyxy and xywh (same frame as ``det``), COCO id and name."""
    by_label = label_to_category(categories)
    records = []
    for xyxy, xywh, score, label in zip(
        det.boxes.tolist(), _xywh(det.boxes), det.scores.tolist(), det.labels.tolist(), strict=True
    ):
        if score < score_thresh:
            continue
        category = by_label.get(label, {"id": -1, "name": f"label {label}"})
        records.append(
            {
                "bbox_xyxy": [round(v, 2) for v in xyxy],
                "bbox": xywh,
                "score": round(score, 5),
                "category_id": int(category["id"]),
                "category_name": str(category["name"]),
            }
        )
    return records


def predict_images(
    loaded: LoadedModel,
    images: Sequence[Image.Image],
    *,
    batch_size: int = 1,
    device: torch.device | None = None,
) -> list[ImageDetections]:
    """Detections on original images (any size; the detector resizes them itself), in their pixels."""
    device = device or default_device()
    loaded.model.to(device).eval()
    results: list[ImageDetections] = []
    for start in range(0, len(images), batch_size):
        batch = [image_to_tensor(image) for image in images[start : start + batch_size]]
        detections, _ = detect(loaded.model, batch, device)
        results.extend(detections)
    return results
