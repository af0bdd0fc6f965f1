"""The trained-model file handed from stage train to evaluate, profile and predict.

One `torch.save` of plain data, loadable with ``torch.load(weights_only=True)``::

    {
        "format": "fpn-model/1",
        "model_config": fpn.ModelConfig.to_dict(),   # architecture, test-time settings
        "state_dict": {name: Tensor},                 # weights
        "categories": [{"label": 1, "id": 18, "name": "dog"}, ...],  # label -> COCO id
        "extra": {...},                               # e.g. mlflow_run_id, data_hash, git_commit
    }

Written to a temporary name beside the target and renamed when whole, so a reader never
sees half a file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fpn import ModelConfig, build_detector
from pipeline.io import atomic_torch_save

FORMAT = "fpn-model/1"


class ModelFileError(ValueError):
    """A file that is not a whole FPN model file; the message names the file."""


@dataclass
class LoadedModel:
    """A detector in eval mode with what travels beside it."""

    model: torch.nn.Module
    config: ModelConfig
    categories: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def save_model_file(
    path: str | Path,
    model: torch.nn.Module,
    config: ModelConfig,
    categories: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the model file atomically (see the module docstring for its layout)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {
            "format": FORMAT,
            "model_config": config.to_dict(),
            "state_dict": state,
            "categories": list(categories),
            "extra": dict(extra or {}),
        },
        path,
    )


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file written by `save_model_file`; the detector comes back in eval mode.

    Raises `ModelFileError` naming ``path`` when it is missing, not a torch file, or not an
    FPN model file (only tensors and plain data are unpickled: ``weights_only=True``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    return _loaded(path, path, map_location)


def load_model_bytes(data: bytes, where: str, map_location: str | torch.device = "cpu") -> LoadedModel:
    """`load_model_file` of a model file's bytes (sent through Ray's object store); errors name ``where``."""
    return _loaded(io.BytesIO(data), where, map_location)


def _loaded(source: Path | io.BytesIO, where: str | Path, map_location: str | torch.device) -> LoadedModel:
    """The model file at ``source`` built into a detector (eval mode); `ModelFileError` names ``where``."""
    path = where
    try:
        blob = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a model file"
        raise ModelFileError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an FPN model file (expected format {FORMAT!r})")
    try:
        config = ModelConfig.from_dict(blob["model_config"], where=f"{path}: model_config")
        model = build_detector(config)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path}: broken FPN model file: {err}") from err
    model.to(map_location).eval()
    return LoadedModel(
        model=model, config=config, categories=list(blob["categories"]), extra=dict(blob.get("extra", {}))
    )
