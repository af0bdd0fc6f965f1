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
through an explicit client. The model is downloaded once, and what is loaded is that download,
after two checks, each refusing with `UnsafeModelError` (naming the URI) before any of its code runs:

1. its ``MLmodel`` (plain YAML): anything but a pyfunc logged from code -- an ``mlflow.pytorch``
   model saved with pickle, a pickled (cloudpickle) python model, another flavor -- is refused;
2. its code: a pyfunc from code *is* code (the models-from-code file, and the ``fpn``/``pipeline``
   copies it imports from), so whoever can write the artifact store could make loading run
   anything. `log_detector` records the code's hash (`pipeline.tracking.code_hash`) as the tag
   ``code_sha256`` of the run, and the registry copies it onto each version. The loader hashes the
   downloaded code the same way and compares it with the hash recorded for the URI (the version's
   tag for ``models:/<name>...``, the logging run's tag for ``runs:/`` and ``models:/<model id>``),
   or with a hash the caller pins (``expect_code_sha256``); a mismatch or a missing hash is
   refused, naming the changed files when this checkout's code is the recorded one. The registry
   is thus trusted code, like a package index: the check catches code changed in the artifact
   store, not a tracking store whose tags were changed too (pin the hash for that).
   ``trust_code=True`` skips this check (``stages.predict --trust-model-code``): dangerous.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
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
from pipeline.tracking.code_hash import (
    CODE_SHA256_TAG,
    code_differences,
    code_digests,
    code_sha256,
    drop_bytecode_caches,
)
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
# The code the logged model carries: the models-from-code file and the code_paths folders.
MODEL_CODE_FILE = Path(__file__).resolve().with_name("model_code.py")
CODE_PATHS = (_PROJECT_ROOT / "fpn", _PROJECT_ROOT / "pipeline")
_SHA256_HEX = frozenset("0123456789abcdef")
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


def project_code_sha256() -> str:
    """The code hash of this checkout's model code: what `log_detector` records, and a hash to pin."""
    return code_sha256(code_digests(MODEL_CODE_FILE, CODE_PATHS))


def log_detector(run: TrackedRun, model_file: str | Path, *, name: str = MODEL_NAME) -> ModelInfo | None:
    """Log the model file as a pyfunc model from code to ``run`` (pinned requirements: fast), and
    tag the run with the hash of the code it carries (tag ``code_sha256``, `project_code_sha256`).

    Returns the `ModelInfo` (``model_uri`` is ``models:/<model id>``), or None when a non-strict
    run could not log it (it warned).
    """
    digest = project_code_sha256()  # of the files as they are copied: before MLflow copies them
    with warnings.catch_warnings():
        # The explicit signature describes the input; an input example would run the detector while logging.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = run.log_pyfunc_model(
            name,
            python_model=str(MODEL_CODE_FILE),  # models from code: no pickle
            artifacts={MODEL_FILE_ARTIFACT: str(model_file)},
            code_paths=[str(path) for path in CODE_PATHS],
            signature=SIGNATURE,
            pip_requirements=_pip_requirements(),
        )
    if info is not None:
        run.set_tags({CODE_SHA256_TAG: digest})
    return info


def is_mlflow_uri(source: str | Path) -> bool:
    """True for ``models:/...``/``runs:/...`` style URIs, False for a file path."""
    return isinstance(source, str) and source.split(":/", 1)[0] in _URI_SCHEMES


@dataclass(frozen=True)
class ResolvedModel:
    """Where an MLflow model URI's artifacts are, and the code hash recorded for it (None: none)."""

    location: str  # artifact folder URI
    code_sha256: str | None  # tag ``code_sha256`` of ``recorded_in``
    recorded_in: str  # e.g. "model version fpn-detector/3", "run 0a1b...": where the tag is looked up


def _run_code_sha256(client: MlflowClient, run_id: str | None) -> str | None:
    """Tag ``code_sha256`` of run ``run_id`` (None without a run or a tag)."""
    return client.get_run(run_id).data.tags.get(CODE_SHA256_TAG) if run_id else None


def _resolve_run_model(client: MlflowClient, uri: str, rest: str) -> ResolvedModel:
    """``runs:/<run id>/<model name>``."""
    run_id, _, name = rest.partition("/")
    if not name:
        raise ValueError(f"{uri}: a runs:/ URI names a model: runs:/<run id>/<model name>")
    run = client.get_run(run_id)
    recorded, where = run.data.tags.get(CODE_SHA256_TAG), f"run {run_id}"
    for model in client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'"):
        if model.source_run_id == run_id:
            return ResolvedModel(str(model.artifact_location), recorded, where)
    # A model stored as plain run artifacts.
    return ResolvedModel(f"{run.info.artifact_uri.rstrip('/')}/{name}", recorded, where)


def _resolve_version(client: MlflowClient, rest: str) -> ResolvedModel:
    """``<name>@<alias>`` or ``<name>/<version>``: the alias is resolved once, to one version."""
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = rest.split("/", 1)
        version = client.get_model_version(name, number)
    return ResolvedModel(
        str(client.get_model_version_download_uri(name, version.version)),
        version.tags.get(CODE_SHA256_TAG),
        f"model version {name}/{version.version}",
    )


def resolve_model(client: MlflowClient, uri: str) -> ResolvedModel:
    """The artifact location of the MLflow model ``uri`` and its recorded code hash, through ``client``."""
    scheme, _, rest = uri.partition(":/")
    rest = rest.strip("/")
    if scheme == "mlflow-artifacts":
        return ResolvedModel(uri, None, "anything: an mlflow-artifacts:/ URI names no run or version")
    if scheme == "runs":
        return _resolve_run_model(client, uri, rest)
    if scheme == "models" and "/" not in rest and "@" not in rest:  # models:/<model id>
        model = client.get_logged_model(rest)
        where = (
            f"run {model.source_run_id} (which logged {rest})"
            if model.source_run_id
            else f"logged model {rest} (no run)"
        )
        return ResolvedModel(
            str(model.artifact_location), _run_code_sha256(client, model.source_run_id), where
        )
    if scheme == "models":
        return _resolve_version(client, rest)
    raise ValueError(f"{uri}: not an MLflow model URI ({', '.join(f'{s}:/' for s in _URI_SCHEMES)})")


def model_location(client: MlflowClient, uri: str) -> str:
    """The artifact location (folder URI) of the MLflow model ``uri``, found through ``client`` alone."""
    return resolve_model(client, uri).location


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


def _downloaded_code(model_dir: Path, pyfunc: dict[str, Any], source: str) -> dict[str, str]:
    """``{name: SHA-256}`` of the code MLflow will run from ``model_dir`` (`code_digests` names).

    That is the file named by ``model_code_path`` (MLflow takes its base name inside the model
    folder) and everything in the folder named by ``code`` (put first on ``sys.path``), which must
    lie inside ``model_dir``. Bytecode caches are deleted first, so none can stand in for the code.
    """
    drop_bytecode_caches(model_dir)
    code_folder = (model_dir / str(pyfunc.get("code") or "code")).resolve()
    if not code_folder.is_relative_to(model_dir.resolve()):
        raise UnsafeModelError(
            f"{source}: refused to load: its code folder {pyfunc.get('code')!r} is outside the model"
        )
    entries = sorted(code_folder.iterdir()) if code_folder.is_dir() else []
    return code_digests(model_dir / Path(str(pyfunc["model_code_path"])).name, entries)


def _mismatch_details(expected: str, actual: dict[str, str]) -> str:
    """The changed files when this checkout's code has hash ``expected``; else why they are unknown."""
    local = code_digests(MODEL_CODE_FILE, CODE_PATHS)
    if code_sha256(local) != expected:
        return "this checkout's code differs from the expected code too, so the changed files are unknown"
    changes = code_differences(local, actual)
    shown = ", ".join(changes[:10]) + (f", and {len(changes) - 10} more" if len(changes) > 10 else "")
    return f"compared with this checkout (the expected code): {shown}"


def check_model_code(
    source: str, model_dir: Path, pyfunc: dict[str, Any], resolved: ResolvedModel, pinned: str | None
) -> None:
    """Raise `UnsafeModelError` unless the code in ``model_dir`` hashes to ``pinned`` (when given)
    or to the hash recorded for the URI (``resolved``); the message names ``source`` and what differs."""
    if pinned is None and resolved.code_sha256 is None:
        raise UnsafeModelError(
            f"{source}: refused to load: no code hash is recorded for it (no tag {CODE_SHA256_TAG} on "
            f"{resolved.recorded_in}), so the code it would run cannot be checked. Pin the hash of code you trust "
            "(stages.predict --expect-code-sha256 HEX), or load it unchecked (--trust-model-code: runs "
            "whatever code the artifact store holds)"
        )
    expected = pinned or str(resolved.code_sha256)
    what = "pinned" if pinned else f"recorded ({resolved.recorded_in}, tag {CODE_SHA256_TAG})"
    actual = _downloaded_code(model_dir, pyfunc, source)
    if code_sha256(actual) == expected:
        return
    raise UnsafeModelError(
        f"{source}: refused to load: its code does not match the {what} hash: expected {expected}, "
        f"the downloaded code hashes to {code_sha256(actual)}; {_mismatch_details(expected, actual)}"
    )


def _check_pin(source: str | Path, pinned: str | None) -> str | None:
    """``pinned`` in lower case after checking it is a SHA-256 in hex and ``source`` is a URI."""
    if pinned is None:
        return None
    if not is_mlflow_uri(source):
        raise ValueError(f"{source}: a model file carries no code: a code hash pins MLflow model URIs only")
    pinned = pinned.strip().lower()
    if len(pinned) != 64 or not set(pinned) <= _SHA256_HEX:
        raise ValueError(f"expected code SHA-256 {pinned!r}: not 64 hexadecimal digits")
    return pinned


def load_detector(
    source: str | Path,
    *,
    tracking_uri: str | None = None,
    trust_code: bool = False,
    expect_code_sha256: str | None = None,
) -> LoadedModel:
    """A `LoadedModel` from a model file path or an MLflow model URI (``models:/fpn-detector@champion``).

    URIs are resolved against ``tracking_uri`` (default `pipeline.tracking.run.tracking_uri`), which
    serves as the registry too. The model is downloaded once and refused with `UnsafeModelError`,
    naming the URI, before anything of it runs, when it is not a pyfunc logged from code or when
    its code does not hash to ``expect_code_sha256`` (if given) or else to the hash recorded for
    it (module docstring). ``trust_code=True`` skips the code check: anyone able to write the
    artifact store then runs code in this process. A model file has no code: nothing to check.
    """
    pinned = _check_pin(source, expect_code_sha256)
    if not is_mlflow_uri(source):
        return load_model_file(source)
    uri = tracking_uri or default_tracking_uri()
    resolved = resolve_model(mlflow_client(uri), str(source))
    with tempfile.TemporaryDirectory(prefix="fpn-model-") as tmp:
        model_dir = _download(resolved.location, "", Path(tmp) / "model", uri)
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        flavors = dict((mlmodel or {}).get("flavors") or {})
        reason = refusal_reason(flavors)
        if reason is not None:
            raise UnsafeModelError(
                f"{source}: refused to load: {reason}. Only pyfunc models logged from code "
                "(pipeline.tracking.pyfunc.log_detector) are loaded, so that nothing is unpickled"
            )
        if not trust_code:
            check_model_code(str(source), model_dir, flavors["python_function"], resolved, pinned)
        pyfunc = mlflow.pyfunc.load_model(str(model_dir))
        wrapper = pyfunc.unwrap_python_model()
    if not isinstance(wrapper, DetectorPyfunc):
        raise ValueError(f"{source}: not an FPN detector model (python model is {type(wrapper).__name__})")
    return wrapper.loaded
