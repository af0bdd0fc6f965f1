"""End-to-end fidelity check: torchvision's COCO Faster R-CNN weights through the pipeline's own path.

    python benchmarks/coco_fidelity.py --coco /data/coco --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth
    python benchmarks/coco_fidelity.py --coco /data/coco       # downloads the weights into torch's hub cache
    python benchmarks/coco_fidelity.py --coco ../shared/data/coco-mini --random-weights 0 --min-size 320 --max-size 512

``--coco`` is a COCO-layout folder (``annotations/instances_val2017.json``, ``val2017/*.jpg``).
What runs is the pipeline, not a copy of it: stage fetch's local source (``--local-dir``; only
the validation split, hard-linked where the file system allows), stage preprocess (Parquet
shards of the original JPEG bytes), the model file (`pipeline.model_file`), `predict_split`
(decode, resize inside the model, boxes back in original pixels) and the evaluator
(`pipeline.evaluate.coco_eval`, pycocotools). It prints the 12 COCO bbox numbers beside the
box AP torchvision publishes for these weights (37.0 on val2017 at 800/1333), with the machine
and the date. All 5000 val2017 images at 800x1333 take hours on a CPU (torchvision's model needs
3.4-3.9 s an image on 2 threads; our torchvision-exact config is no faster), minutes on a GPU
(not measured yet); ``--limit N`` evaluates the first N images of the annotation file.

Category ids: torchvision's COCO model has 91 outputs indexed by COCO category id itself
(0 background, 1..90 with the 10 ids COCO never used, named "N/A"). Loaded into
``fpn.ModelConfig.torchvision()`` (``num_classes=90``), label L is COCO id L, so the model file
carries the identity mapping (`torchvision_coco_categories`), not the data's categories.json
(labels 1..80). Detections of the N/A ids are dropped before evaluation: COCOeval scores only
the ground truth's categories, so torchvision's own evaluation ignores them too.

``--random-weights SEED`` uses torchvision's random initialisation (seed given) with the
person class bias raised by ``--boost`` so that boxes pass the 0.05 score threshold, and the box
regression damped (`random_coco_state_dict`): a check of the path (tests/benchmarks/
test_coco_fidelity.py holds it against torchvision's own model), not of the published number. Offline without ``--weights``, it fails at once with the
URL and how to pass a local file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fpn/, pipeline/ and benchmarks/ beside this file, not an installed copy.
if sys.path[:1] != [str(REPO_ROOT)]:
    sys.path.insert(0, str(REPO_ROOT))

import fpn  # noqa: E402
from benchmarks.local_coco import fetch_and_preprocess  # noqa: E402
from pipeline.coco_format import CocoFormatError  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.dataset import read_index  # noqa: E402
from pipeline.evaluate.coco_eval import STANDARD_KEYS, evaluate_detections, load_ground_truth  # noqa: E402
from pipeline.inference import coco_results, predict_split  # noqa: E402
from pipeline.model_file import save_model_file  # noqa: E402
from pipeline.preprocess.stage import PreprocessError  # noqa: E402
from pipeline.profile.timing import machine_description  # noqa: E402
from pipeline.train.init_weights import download_checkpoint  # noqa: E402

DEFAULT_BOOST = 8.0  # random weights: added to the class logits of BOOSTED_CATEGORIES
BOOSTED_CATEGORIES = (1,)  # person
REGRESSION_SCALE = 0.02  # random weights: box deltas scaled down


class FidelityError(RuntimeError):
    """The check cannot run (weights not found or not downloadable); the message says what to do."""


@dataclass(frozen=True)
class FidelityResult:
    """One run of the pipeline on torchvision's weights.

    ``metrics``: the 12 COCO bbox numbers (`STANDARD_KEYS`, 0..1); ``results``: the COCO results
    scored (in the ground truth's categories; bbox xywh in original pixels), ``detections`` their
    number; ``dropped``: detections of torchvision's N/A ids.
    """

    metrics: dict[str, float]
    results: list[dict[str, Any]]
    images: int
    detections: int
    dropped: int
    seconds: float
    device: str


def torchvision_weights_enum() -> Any:
    """torchvision's ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1`` (its URL, category names, box AP)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return FasterRCNN_ResNet50_FPN_Weights.COCO_V1


def published_box_ap() -> float:
    """The box AP (in %, IoU .50:.95, val2017, 800/1333) torchvision publishes for COCO_V1: 37.0."""
    return float(torchvision_weights_enum().meta["_metrics"]["COCO-val2017"]["box_map"])


def torchvision_coco_categories() -> list[dict[str, Any]]:
    """The model file's label -> COCO id mapping for torchvision's 91 outputs: label L is COCO id L.

    ``[{"label": L, "id": L, "name": ...}]`` for L in 1..90; the 10 ids COCO never used are named
    "N/A", as torchvision names them.
    """
    names = torchvision_weights_enum().meta["categories"]  # 91 names, index 0 the background
    return [{"label": label, "id": label, "name": names[label]} for label in range(1, len(names))]


def coco_state_dict(weights: Path | None) -> dict[str, Tensor]:
    """torchvision's COCO ``fasterrcnn_resnet50_fpn`` state dict: from ``weights``, else torch's hub
    cache, downloading it there once; `FidelityError` naming the file or the URL."""
    if weights is None:
        url = torchvision_weights_enum().url
        weights = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not weights.is_file():
            try:
                download_checkpoint(url, weights)
            except Exception as err:  # noqa: BLE001 - offline, a proxy, a bad hash: all mean "not here"
                raise FidelityError(
                    f"torchvision's COCO weights could not be downloaded from {url} "
                    f"({type(err).__name__}: {err}). Offline, fetch that file elsewhere and pass it "
                    f"with --weights FILE (or put it at {weights})"
                ) from err
    if not weights.is_file():
        raise FidelityError(f"{weights}: weights file not found (--weights)")
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        raise FidelityError(f"{weights}: not a torch state dict ({type(err).__name__}: {err})") from err


def random_coco_state_dict(
    seed: int,
    *,
    boost: float = DEFAULT_BOOST,
    boosted: tuple[int, ...] = BOOSTED_CATEGORIES,
    regression_scale: float = REGRESSION_SCALE,
) -> dict[str, Tensor]:
    """A state dict of torchvision's ``fasterrcnn_resnet50_fpn`` (91 outputs, index = COCO id) at
    its random initialisation under ``seed``, made to give detections that sometimes hit objects.

    ``boost`` is added to the class logit biases of the ``boosted`` COCO ids (default person, COCO's
    most frequent category), so their scores pass the 0.05 threshold; the RPN's and the box head's
    regression layers are scaled by ``regression_scale``, so boxes stay near their anchors instead
    of being thrown about by random deltas.
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(seed)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = model.state_dict()
    state["roi_heads.box_predictor.cls_score.bias"][list(boosted)] += boost
    for layer in ("rpn.head.bbox_pred", "roi_heads.box_predictor.bbox_pred"):
        for param in ("weight", "bias"):
            state[f"{layer}.{param}"] *= regression_scale
    return state


def fidelity_model(
    state_dict: dict[str, Tensor], *, min_size: int, max_size: int
) -> tuple[fpn.Detector, Any]:
    """Our detector as ``fpn.ModelConfig.torchvision()`` (same arithmetic as torchvision's) at
    ``min_size``/``max_size``, with ``state_dict`` loaded strictly; returns (model, config)."""
    config = dataclasses.replace(fpn.ModelConfig.torchvision(), min_size=min_size, max_size=max_size)
    model = fpn.build_detector(config)
    fpn.load_torchvision_weights(model, state_dict)
    return model.eval(), config


def scored_results(results: list[dict[str, Any]], category_ids: set[int]) -> tuple[list[dict[str, Any]], int]:
    """The results in ``category_ids`` (what COCOeval scores) and how many others were dropped."""
    kept = [r for r in results if r["category_id"] in category_ids]
    return kept, len(results) - len(kept)


def run_pipeline(
    coco_dir: Path,
    work: Path,
    state_dict: dict[str, Tensor],
    *,
    split: str = "val2017",
    min_size: int = 800,
    max_size: int = 1333,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> FidelityResult:
    """Fetch (local) ``split`` of ``coco_dir`` into ``work``, preprocess it, save the model file and
    evaluate it through `predict_split` and the pipeline's evaluator (see the module docstring).

    ``limit`` keeps the first N images of the annotation file (``data.max_images``); every image
    of that file counts in the evaluation, so an image preprocess skipped counts as missed.
    ``batch_size`` 1 is the COCO protocol (torchvision's reference evaluates one image at a time;
    larger batches pad images to a common size, which moves a few proposals).
    """
    start = time.perf_counter()
    preprocessed = fetch_and_preprocess(coco_dir, work, split, limit=limit, progress=progress)
    model_file = work / "model.pt"
    model, config = fidelity_model(state_dict, min_size=min_size, max_size=max_size)
    categories = torchvision_coco_categories()
    save_model_file(model_file, model, config, categories, extra={"purpose": "coco_fidelity"})
    run = predict_split(model_file, preprocessed, split, batch_size=batch_size)
    gt = load_ground_truth(read_index(preprocessed, split).annotation_file)
    results, dropped = scored_results(coco_results(run.detections, categories), set(gt.getCatIds()))
    evaluation = evaluate_detections(gt, results, image_ids=gt.getImgIds(), where="detections")
    return FidelityResult(
        metrics=evaluation.metrics,
        results=results,
        images=len(gt.getImgIds()),
        detections=len(results),
        dropped=dropped,
        seconds=time.perf_counter() - start,
        device=run.device,
    )


def report(result: FidelityResult, *, random_weights: bool, min_size: int, max_size: int) -> str:
    """The printed report: machine, date, settings, the 12 numbers and torchvision's published AP."""
    machine = machine_description(result.device)
    lines = [
        f"machine: {', '.join(f'{k} {v}' for k, v in machine.items())}",
        f"date: {datetime.date.today().isoformat()}",
        f"weights: {'random (boosted class biases)' if random_weights else 'torchvision COCO_V1'}; "
        f"min_size {min_size}, max_size {max_size}; {result.images} images, {result.detections} "
        f"detections scored ({result.dropped} of N/A ids dropped); {result.seconds:.0f} s",
        "",
        f"{'metric':<8}{'pipeline':>10}{'torchvision (published)':>26}",
    ]
    published = {"AP": f"{published_box_ap():.1f}"}
    for key in STANDARD_KEYS:
        value = result.metrics[key]
        shown = f"{100 * value:.1f}" if value >= 0 else "n/a"  # COCO's -1: no ground truth of that size
        lines.append(f"{key:<8}{shown:>10}{published.get(key, ''):>26}")
    lines.append(
        "\ntorchvision's figure: COCO_V1 weights, val2017 (5000 images), min_size 800, max_size 1333"
        + (" (random weights here: not comparable)" if random_weights else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--coco", type=Path, required=True, help="a COCO-layout folder (stage fetch's --local-dir)"
    )
    p.add_argument(
        "--weights", type=Path, help="torchvision's fasterrcnn_resnet50_fpn COCO .pth (default: download)"
    )
    p.add_argument(
        "--random-weights", type=int, metavar="SEED", help="random weights under this seed instead"
    )
    p.add_argument(
        "--boost", type=float, default=DEFAULT_BOOST, help="foreground bias boost of random weights"
    )
    p.add_argument("--split", default="val2017")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--limit", type=int, help="only the first N images of the annotation file")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--work", type=Path, help="keep the fetched, preprocessed and model files here (new folder)"
    )
    args = p.parse_args(argv)
    if args.random_weights is not None and args.weights is not None:
        p.error("--weights and --random-weights exclude each other")
    try:
        if args.random_weights is not None:
            state = random_coco_state_dict(args.random_weights, boost=args.boost)
        else:
            state = coco_state_dict(args.weights)
        with tempfile.TemporaryDirectory(prefix="coco-fidelity-") as tmp:
            result = run_pipeline(
                args.coco.resolve(), args.work or Path(tmp), state, split=args.split,
                min_size=args.min_size, max_size=args.max_size, limit=args.limit, batch_size=args.batch_size,
            )  # fmt: skip
    except (FidelityError, CocoFormatError, ConfigError, PreprocessError) as err:  # bad input, named
        print(f"coco_fidelity: {err}", file=sys.stderr)
        return 2
    print(report(result, random_weights=args.random_weights is not None, min_size=args.min_size,
                 max_size=args.max_size))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
