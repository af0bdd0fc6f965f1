"""The detector as an MLflow model: a pyfunc wrapper around the model file.

Why a pyfunc and not ``mlflow.pytorch``: the detector takes a list of differently sized images,
which ``torch.export`` (mlflow.pytorch's default ``pt2``) fits badly, and the ``pickle`` format
unpickles arbitrary code. Here the logged model carries the very model file stage train wrote
(artifact ``model_file``) and loads it with `pipeline.model_file.load_model_file`
(``torch.load(weights_only=True)``). The wrapper is logged as code (`pipeline.tracking.model_code`,
MLflow's "models from code"), not pickled, and the code of `fpn` and `pipeline` travels with it
(``code_paths``), so ``models:/fpn-detector@champion`` gives the same detections as the file.

Pyfunc interface (for ``mlflow models serve`` and ``mlflow.pyfunc.load_model(...).predict``):
input a DataFrame with a binary column ``image`` (encoded JPEG/PNG bytes); output one row per
detection: ``image_index, x1, y1, x2, y2`` (original image pixels), ``score``, ``category_id``
(COCO id), ``category_name``; param ``score_thresh`` (default 0.0).
"""

from __future__ import annotations

import io
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from pipeline.inference import default_device, detection_records, predict_images
from pipeline.model_file import LoadedModel, load_model_file

MODEL_FILE_ARTIFACT = "model_file"
OUTPUT_COLUMNS = ["image_index", "x1", "y1", "x2", "y2", "score", "category_id", "category_name"]
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema(
        [ColSpec("long", "image_index")]
        + [ColSpec("double", name) for name in ("x1", "y1", "x2", "y2", "score")]
        + [ColSpec("long", "category_id"), ColSpec("string", "category_name")]
    ),
    params=ParamSchema([ParamSpec("score_thresh", "double", 0.0)]),
)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_REQUIREMENTS = ("torch", "torchvision", "mlflow", "pillow", "numpy", "pandas")


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: loads the model file artifact; `loaded` is the `LoadedModel` after loading."""

    loaded: LoadedModel

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.loaded = load_model_file(context.artifacts[MODEL_FILE_ARTIFACT])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        score_thresh = float((params or {}).get("score_thresh", 0.0))
        rows = []
        for index, data in enumerate(model_input["image"]):
            with Image.open(io.BytesIO(data)) as image:
                (det,) = predict_images(self.loaded, [image], device=default_device())
            for rec in detection_records(det, self.loaded.categories, score_thresh=score_thresh):
                rows.append(
                    [index, *rec["bbox_xyxy"], rec["score"], rec["category_id"], rec["category_name"]]
                )
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _pip_requirements() -> list[str]:
    pins = []
    for package in _REQUIREMENTS:
        version = metadata.version(package).split("+")[0]  # drop local tags like +cu130
        pins.append(f"{package}=={version}")
    return pins


def log_detector(model_file: str | Path, *, name: str = "fpn_detector") -> ModelInfo:
    """Log the model file as a pyfunc model to the active MLflow run (pinned requirements: fast).

    Named ``fpn_detector`` so it stands apart from the ``model`` stage train logs (mlflow.pytorch).
    """
    with warnings.catch_warnings():
        # The explicit signature describes the input; an input example would run the detector while logging.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("model_code.py")),  # models from code: no pickle
            artifacts={MODEL_FILE_ARTIFACT: str(model_file)},
            code_paths=[str(_PROJECT_ROOT / "fpn"), str(_PROJECT_ROOT / "pipeline")],
            signature=SIGNATURE,
            pip_requirements=_pip_requirements(),
        )


def is_mlflow_uri(source: str | Path) -> bool:
    """True for ``models:/...``/``runs:/...`` style URIs, False for a file path."""
    return isinstance(source, str) and source.split(":/", 1)[0] in ("models", "runs", "mlflow-artifacts")


def load_detector(source: str | Path) -> LoadedModel:
    """A `LoadedModel` from a model file path or an MLflow model URI (``models:/fpn-detector@champion``).

    For URIs the tracking/registry URI must be set (`pipeline.tracking.registry.use_tracking`).
    """
    if not is_mlflow_uri(source):
        return load_model_file(source)
    pyfunc = mlflow.pyfunc.load_model(str(source))
    wrapper = pyfunc.unwrap_python_model()
    if not isinstance(wrapper, DetectorPyfunc):
        raise ValueError(f"{source}: not an FPN detector model (python model is {type(wrapper).__name__})")
    return wrapper.loaded
