"""Detect objects in images with a trained or registered detector (not a DVC stage).

Run::

    python -m stages.predict --model models:/fpn-detector@champion --out predictions photo1.jpg photo2.jpg
    python -m stages.predict --model models/model.pt --out predictions --score-thresh 0.3 photo.jpg

``--model`` is a model file or an MLflow model URI (``models:/<name>@<alias>``,
``models:/<name>/<version>``, ``runs:/<run id>/fpn_detector``: the pyfunc stage evaluate logs),
resolved against ``MLFLOW_TRACKING_URI`` (else ``sqlite:///<project root>/mlflow.db``). A URI whose
model is not a pyfunc logged from code (e.g. an ``mlflow.pytorch`` pickle) is refused before
loading. Uses the GPU when one is visible.

A registry model is code (it runs its logged ``model_code.py`` and imports its copies of ``fpn/``
and ``pipeline/``), so before loading one its downloaded code is hashed and compared with the hash
recorded for it (tag ``code_sha256`` of the model version, or of the run for ``runs:/``): a
mismatch or a missing hash exits 2 naming the URI and what differs (`pipeline.tracking.pyfunc`).

* ``--expect-code-sha256 HEX`` compares with this hash instead (e.g. `project_code_sha256()` of a
  checkout you trust): it also guards against a tracking store whose tags were changed.
* ``--trust-model-code`` skips the check. DANGEROUS: whoever can write the artifact store (or the
  tracking store) then runs any code they like in this process.

Writes ``<out>/<image stem>.jpg`` with boxes, class names and scores drawn, and
``<out>/detections.json``: ``{"model": ..., "score_thresh": ..., "images": [{"file", "width",
"height", "detections": [{"bbox_xyxy", "bbox" (x, y, w, h), "score", "category_id" (COCO id),
"category_name"}]}]}`` in each original image's pixels.

Bad input exits 2 with one line naming it: every image's header is read first (a missing
file, one that is not an image, or one over PIL's decompression-bomb limit, ~179 Mpx, fails
before the model is loaded), and the outputs are written only once every image was decoded
and detected, so a failure leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline.evaluate.drawing import draw_detections
from pipeline.inference import InferenceError, detection_records, predict_images
from pipeline.io import atomic_write_bytes, atomic_write_text
from pipeline.model_file import LoadedModel, ModelFileError
from pipeline.tracking.pyfunc import is_mlflow_uri, load_detector
from pipeline.tracking.run import TrackingUnavailable, check_tracking_uri
from stages.cli import fail

PICTURE_QUALITY = 90


class ImageInputError(ValueError):
    """An input image that cannot be used; the message starts with its path."""


@dataclass(frozen=True)
class Prediction:
    """One image's drawn picture (JPEG bytes) and its entry of detections.json."""

    picture: bytes
    entry: dict[str, Any]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model file path or MLflow model URI")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--score-thresh", type=float, default=0.5, help="keep detections scoring at least this"
    )
    parser.add_argument(
        "--expect-code-sha256",
        metavar="HEX",
        default=None,
        help="load an MLflow model only if its code hashes to this SHA-256 (instead of the recorded hash)",
    )
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="DANGEROUS: load an MLflow model's code without checking its hash (it runs in this process)",
    )
    parser.add_argument("images", nargs="+", help="image files")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check every image's header, load the model, detect in all images, then write (all or nothing)."""
    args = _parser().parse_args(argv)
    try:
        for file in args.images:
            check_header(file)
    except ImageInputError as err:
        return fail("predict", err)
    try:
        uri = check_tracking_uri() if is_mlflow_uri(args.model) else None
        loaded = load_detector(
            args.model,
            tracking_uri=uri,
            trust_code=args.trust_model_code,
            expect_code_sha256=args.expect_code_sha256,
        )
    except (ModelFileError, TrackingUnavailable, MlflowException, ValueError) as err:  # UnsafeModelError too
        return fail("predict", f"{args.model}: {err}")
    predictions = []
    for file in args.images:
        try:
            predictions.append(predict_one(loaded, file, args.score_thresh))
        except ImageInputError as err:
            return fail("predict", err)
        print(f"{file}: {len(predictions[-1].entry['detections'])} detection(s) >= {args.score_thresh}")
    write_outputs(Path(args.out), args.model, args.score_thresh, predictions)
    print(f"wrote {args.out}/detections.json and {len(predictions)} picture(s)")
    return 0


def check_header(file: str) -> None:
    """Raise `ImageInputError` unless ``file`` exists and its header reads as an image PIL will decode.

    Only the header is read (PIL's `Image.open` is lazy): cheap, and before anything is written.
    """
    try:
        with Image.open(file):
            pass
    except FileNotFoundError:
        raise ImageInputError(f"{file}: image not found") from None
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{file}: too large to decode ({err})") from None
    except OSError as err:
        raise ImageInputError(f"{file}: cannot read image: {err}") from None


def predict_one(loaded: LoadedModel, file: str, score_thresh: float) -> Prediction:
    """Decode ``file`` as RGB, detect, draw; raise `ImageInputError` if it does not decode."""
    try:
        with Image.open(file) as opened:
            image = opened.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"{file}: cannot read image: {err}") from None
    try:
        (det,) = predict_images(loaded, [image])
    except InferenceError as err:
        raise ImageInputError(f"{file}: {err}") from None
    every = detection_records(det, loaded.categories)  # one record per box, in det's order
    names = [record["category_name"] for record in every]
    drawn = draw_detections(image, det.boxes, names, det.scores, score_thresh=score_thresh)
    buffer = io.BytesIO()
    drawn.save(buffer, "JPEG", quality=PICTURE_QUALITY)
    records = [record for record in every if record["score"] >= score_thresh]
    entry = {"file": str(file), "width": image.width, "height": image.height, "detections": records}
    return Prediction(buffer.getvalue(), entry)


def write_outputs(out: Path, model: str, score_thresh: float, predictions: list[Prediction]) -> None:
    """``<out>/<image stem>.jpg`` for each prediction, then ``<out>/detections.json`` (each file atomic)."""
    for prediction in predictions:
        atomic_write_bytes(out / f"{Path(prediction.entry['file']).stem}.jpg", prediction.picture)
    report = {"model": model, "score_thresh": score_thresh, "images": [p.entry for p in predictions]}
    atomic_write_text(out / "detections.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
