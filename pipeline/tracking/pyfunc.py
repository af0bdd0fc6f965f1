"""The detector as an MLflow model: a pyfunc wrapper around the model file, and its safe loader.

Why a pyfunc and not ``mlflow.pytorch``: the detector takes a list of differently sized images,
which ``torch.export`` (mlflow.pytorch's default ``pt2``) fits badly, and the ``pickle`` format
unpickles arbitrary code. Here the logged model carries the very model file stage train wrote
(artifact ``model_file``) and loads it with `pipeline.model_file.load_model_file`
(``torch.load(weights_only=True)``). The wrapper is logged as code (`pipeline.tracking.model_code`,
MLflow's "models from code"), not pickled, and the code of `fpn` and `pipeline` travels with it
(``code_paths``), so ``models:/fpn-detector@champion`` gives the same detections as the file.
Stage evaluate logs it (`log_detector`); it is the one MLflow model of a run, the one the registry's
``champion`` alias points at.

Pyfunc interface (for ``mlflow models serve`` and ``mlflow.pyfunc.load_model(...).predict``):
input a DataFrame with a binary column ``image`` (encoded JPEG/PNG bytes); output one row per
detection: ``image_index, x1, y1, x2, y2`` (original image pixels), ``score``, ``category_id``
(COCO id), ``category_name``; param ``score_thresh`` (default 0.0).

Loading (`load_detector`): a model file path, or an MLflow model URI (``models:/<name>@<alias>``,
``models:/<name>/<version>``, ``models:/<model id>``, ``runs:/<run id>/<model name>``) resolved
through an explicit client. The model's ``MLmodel`` is read first (plain YAML) and anything but a
pyfunc logged from code -- an ``mlflow.pytorch`` model saved with pickle, a pickled (cloudpickle)
python model, another flavor -- is refused with `UnsafeModelError` before any of its files is
loaded.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from pipeline.inference import default_device, detection_records, predict_images
from pipeline.model_file import LoadedModel, load_model_file
from pipeline.tracking.run import TrackedRun, mlflow_client
from pipeline.tracking.run import tracking_uri as default_tracking_uri

MODEL_NAME = "fpn_detector"
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
# What MLflow writes in MLmodel for a pyfunc logged from code (``python_model`` given as a file).
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
_URI_SCHEMES = ("models", "runs", "mlflow-artifacts")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_REQUIREMENTS = ("torch", "torchvision", "mlflow", "pillow", "numpy", "pandas")


class UnsafeModelError(ValueError):
    """An MLflow model refused before loading: not a pyfunc logged from code; the message says why."""


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: loads the model file artifact; `loaded` is the `LoadedModel` after loading."""

    loaded: LoadedModel

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the model file artifact (``torch.load(weights_only=True)``)."""
        self.loaded = load_model_file(context.artifacts[MODEL_FILE_ARTIFACT])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per detection (`OUTPUT_COLUMNS`) for the encoded images in column ``image``."""
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


def log_detector(run: TrackedRun, model_file: str | Path, *, name: str = MODEL_NAME) -> ModelInfo | None:
    """Log the model file as a pyfunc model from code to ``run`` (pinned requirements: fast).

    Returns the `ModelInfo` (``model_uri`` is ``models:/<model id>``), or None when a non-strict
    run could not log it (it warned).
    """
    with warnings.catch_warnings():
        # The explicit signature describes the input; an input example would run the detector while logging.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return run.log_pyfunc_model(
            name,
            python_model=str(Path(__file__).with_name("model_code.py")),  # models from code: no pickle
            artifacts={MODEL_FILE_ARTIFACT: str(model_file)},
            code_paths=[str(_PROJECT_ROOT / "fpn"), str(_PROJECT_ROOT / "pipeline")],
            signature=SIGNATURE,
            pip_requirements=_pip_requirements(),
        )


def is_mlflow_uri(source: str | Path) -> bool:
    """True for ``models:/...``/``runs:/...`` style URIs, False for a file path."""
    return isinstance(source, str) and source.split(":/", 1)[0] in _URI_SCHEMES


def model_location(client: MlflowClient, uri: str) -> str:
    """The artifact location (folder URI) of the MLflow model ``uri``, found through ``client`` alone."""
    scheme, _, rest = uri.partition(":/")
    rest = rest.strip("/")
    if scheme == "mlflow-artifacts":
        return uri
    if scheme == "runs":
        run_id, _, name = rest.partition("/")
        if not name:
            raise ValueError(f"{uri}: a runs:/ URI names a model: runs:/<run id>/<model name>")
        run = client.get_run(run_id)
        for model in client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'"):
            if model.source_run_id == run_id:
                return str(model.artifact_location)
        return f"{run.info.artifact_uri.rstrip('/')}/{name}"  # a model stored as plain run artifacts
    if scheme == "models" and "/" not in rest and "@" not in rest:
        return str(client.get_logged_model(rest).artifact_location)  # models:/<model id>
    if scheme == "models":
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            name, version = rest.split("/", 1)
        return str(client.get_model_version_download_uri(name, version))
    raise ValueError(f"{uri}: not an MLflow model URI ({', '.join(f'{s}:/' for s in _URI_SCHEMES)})")


def refusal_reason(flavors: dict[str, Any]) -> str | None:
    """Why an MLmodel's ``flavors`` is not a pyfunc logged from code, or None when it is one."""
    pyfunc = flavors.get("python_function") or {}
    if "pytorch" in flavors:
        pickle_module = pyfunc.get("pickle_module_name") or flavors["pytorch"].get("pickle_module_name")
        if pickle_module:
            return (
                f"it is an mlflow.pytorch model serialized with pickle ({pickle_module}): "
                "loading it unpickles, which can run arbitrary code"
            )
        return "it is an mlflow.pytorch model, not a pyfunc logged from code"
    others = sorted(set(flavors) - {"python_function"})
    if others:
        return f"it has the flavor(s) {', '.join(others)}, not only a pyfunc logged from code"
    if not pyfunc:
        return "its MLmodel has no python_function flavor"
    if pyfunc.get("loader_module") == CODE_MODEL_LOADER and pyfunc.get("model_code_path"):
        return None
    if pyfunc.get("python_model"):
        return (
            f"its python model is pickled ({pyfunc['python_model']}, cloudpickle): "
            "loading it unpickles, which can run arbitrary code"
        )
    return f"it is a pyfunc loaded by {pyfunc.get('loader_module')!r}, not a pyfunc logged from code"


def _download(location: str, path: str, dst: Path, uri: str) -> Path:
    """Download ``<location>/<path>`` (a file or folder; ``path`` may be empty) into ``dst``."""
    artifact = f"{location.rstrip('/')}/{path}" if path else location
    dst.mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=str(dst), tracking_uri=uri)
    )


def load_detector(source: str | Path, *, tracking_uri: str | None = None) -> LoadedModel:
    """A `LoadedModel` from a model file path or an MLflow model URI (``models:/fpn-detector@champion``).

    URIs are resolved against ``tracking_uri`` (default `pipeline.tracking.run.tracking_uri`), which
    serves as the registry too. A model that is not a pyfunc logged from code raises
    `UnsafeModelError` naming the URI, before anything of it is loaded.
    """
    if not is_mlflow_uri(source):
        return load_model_file(source)
    uri = tracking_uri or default_tracking_uri()
    location = model_location(mlflow_client(uri), str(source))
    with tempfile.TemporaryDirectory(prefix="fpn-model-") as tmp:
        mlmodel = yaml.safe_load(_download(location, "MLmodel", Path(tmp) / "mlmodel", uri).read_text())
        reason = refusal_reason(dict((mlmodel or {}).get("flavors") or {}))
        if reason is not None:
            raise UnsafeModelError(
                f"{source}: refused to load: {reason}. Only pyfunc models logged from code "
                "(pipeline.tracking.pyfunc.log_detector) are loaded, so that nothing is unpickled"
            )
        pyfunc = mlflow.pyfunc.load_model(str(_download(location, "", Path(tmp) / "model", uri)))
        wrapper = pyfunc.unwrap_python_model()
    if not isinstance(wrapper, DetectorPyfunc):
        raise ValueError(f"{source}: not an FPN detector model (python model is {type(wrapper).__name__})")
    return wrapper.loaded
