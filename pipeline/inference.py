"""Run a trained detector over images: batched, on the GPU when there is one, optionally on Ray.

Coordinates: the detector resizes each image itself and returns boxes in the pixels of the image
it was given. The preprocessed split stores the ORIGINAL images (`pipeline.dataset`), so
`predict_split`'s detections are in original pixels, what COCO's ground truth is in (the COCO
protocol: original JPEGs, resized in memory). Images travel as uint8 and become float 0..1 on
the device (`pipeline.dataset.to_model_input`). Labels are the model's contiguous 1..K;
`categories` (categories.json, also stored in the model file) maps label -> COCO category id and name.

With ``num_workers > 0`` the split's images are dealt into that many parts, each a Ray task (1 CPU,
and 1 GPU when the cluster has GPUs) that loads the model file from the object store and reads its
images' rows from the shard files (it gets the split's small index and its positions in it): on a
multi-node cluster ``data_root`` must be on storage every node sees.
The cluster is the one named by ``RAY_ADDRESS``, else a local one started (and stopped) here.
"""

from __future__ import annotations

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
from pipeline.model_file import LoadedModel, load_model_bytes, load_model_file


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
    """PIL image (any mode: L, RGBA, ...) -> uint8 Tensor[3, H, W], RGB."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def detect(
    model: torch.nn.Module, images: Sequence[torch.Tensor], device: torch.device
) -> tuple[list[ImageDetections], float]:
    """One batched forward pass over uint8 (or float 0..1) images; per-image detections (input pixels,
    image_id -1) and its seconds."""
    batch = [dataset.to_model_input(image, device) for image in images]
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


def _batches(index: dataset.SplitIndex, positions: Sequence[int], batch_size: int) -> list[list[int]]:
    # Similar aspect ratios together: less padding in a batch, so less wasted compute.
    ratios = index.aspect_ratios
    ordered = sorted(positions, key=lambda i: (ratios[i], index.image_ids[i]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def predict_entries(
    model: torch.nn.Module,
    index: dataset.SplitIndex,
    positions: Sequence[int],
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[ImageDetections], float]:
    """Detections (original image pixels) for the images at ``positions`` of ``index``, and the model seconds."""
    model.to(device).eval()
    reader = dataset.ShardReader(index)
    results: list[ImageDetections] = []
    model_seconds = 0.0
    for batch in tqdm(
        _batches(index, positions, batch_size), desc="evaluate", unit="batch", disable=not progress
    ):
        images = [reader.image(i)[0] for i in batch]
        detections, seconds = detect(model, images, device)
        model_seconds += seconds
        for i, det in zip(batch, detections, strict=True):
            det.image_id = int(index.image_ids[i])
            results.append(det)
    return results, model_seconds


def _predict_part(
    model_bytes: bytes, index: dataset.SplitIndex, positions: list[int], batch_size: int
) -> tuple[list[ImageDetections], float]:
    """Body of one Ray task: load the model file from bytes, run `predict_entries` on its positions."""
    loaded = load_model_bytes(model_bytes, "the model file sent to this Ray task")
    return predict_entries(
        loaded.model, index, positions, batch_size=batch_size, device=default_device(), progress=False
    )


def _predict_on_ray(
    model_file: Path, index: dataset.SplitIndex, positions: list[int], *, batch_size: int, num_workers: int
) -> tuple[list[ImageDetections], float, str]:
    import ray  # only this path needs Ray

    with connected(log_to_driver=False, dashboard=False):
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_predict_part)
        model_ref, index_ref = ray.put(model_file.read_bytes()), ray.put(index)
        parts = [positions[i::num_workers] for i in range(num_workers) if positions[i::num_workers]]
        pending = [task.remote(model_ref, index_ref, part, batch_size) for part in parts]
        detections: list[ImageDetections] = []
        model_seconds = 0.0
        with tqdm(total=len(positions), desc=f"evaluate ({len(parts)} Ray workers)", unit="img") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                part_detections, seconds = ray.get(done[0])
                detections.extend(part_detections)
                model_seconds += seconds
                bar.update(len(part_detections))
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
    more runs that many Ray tasks over parts of the split. ``limit`` keeps the first images of the index.
    """
    if batch_size < 1:
        raise InferenceError(f"evaluate.batch_size must be >= 1, got {batch_size}")
    model_file = Path(model_file)
    index = dataset.read_index(data_root, split)
    positions = list(range(len(index)))[:limit]
    start = time.perf_counter()
    if num_workers > 0:
        detections, model_seconds, device = _predict_on_ray(
            model_file, index, positions, batch_size=batch_size, num_workers=num_workers
        )
    else:
        loaded = loaded or load_model_file(model_file)
        dev = default_device()
        detections, model_seconds = predict_entries(
            loaded.model, index, positions, batch_size=batch_size, device=dev
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
