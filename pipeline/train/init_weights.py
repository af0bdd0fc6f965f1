"""Where training starts from (``train.init_weights``), resolved to a local file before any work.

* ``null`` -- random initialisation (the embedded default: the synthetic data trains from scratch).
* a path -- a torchvision state dict: ``fasterrcnn_resnet50_fpn`` COCO weights or an ImageNet
  ResNet (loaded with ``torch.load(weights_only=True)`` and `fpn.load_torchvision_weights`).
* ``imagenet`` -- torchvision's ImageNet weights of ``model.backbone``.
* ``torchvision-coco`` -- torchvision's ``fasterrcnn_resnet50_fpn`` COCO weights.

The named ones are downloaded into torch's hub cache (``$TORCH_HOME/hub/checkpoints``) by the
driver, once, before Ray starts; offline, that fails at once with the URL and how to pass a
local file instead.

On a Ray cluster no node but the driver's needs the file: `share_init_weights` puts its bytes
in Ray's object store once, and every rank reads them from there (`read_init_weights`, still
``torch.load(weights_only=True)``: nothing is unpickled from the file).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from pipeline.config import ConfigError, Params


def weights_url(params: Params) -> str | None:
    """The torchvision URL behind ``train.init_weights`` (None for null or a path)."""
    from torchvision.models import (
        ResNet18_Weights,
        ResNet34_Weights,
        ResNet50_Weights,
        ResNet101_Weights,
    )
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    value = params.train.init_weights
    if value == "torchvision-coco":
        return FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url
    if value == "imagenet":
        imagenet = {
            "resnet18": ResNet18_Weights.IMAGENET1K_V1,
            "resnet34": ResNet34_Weights.IMAGENET1K_V1,
            "resnet50": ResNet50_Weights.IMAGENET1K_V1,
            "resnet101": ResNet101_Weights.IMAGENET1K_V1,
        }
        if params.model.backbone not in imagenet:
            raise ConfigError(
                f"train.init_weights: no ImageNet weights known for model.backbone {params.model.backbone!r}"
            )
        return imagenet[params.model.backbone].url
    return None


def resolve_init_weights(params: Params) -> str | None:
    """A local file holding the starting weights, or None for a random start (may download)."""
    value = params.train.init_weights
    if value is None:
        return None
    url = weights_url(params)
    if url is None:
        return str(Path(value).expanduser().resolve())
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if target.is_file():
        return str(target)
    try:
        download_checkpoint(url, target)
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, timeouts, a bad hash ... all mean "not here"
        raise ConfigError(
            f"train.init_weights: {value!r} needs {url}, which could not be downloaded "
            f"({type(err).__name__}: {err}). Offline, fetch that file elsewhere and either put it at "
            f"{target} or set train.init_weights to its local path"
        ) from err
    return str(target)


def download_checkpoint(url: str, target: Path) -> None:
    """Download ``url`` to ``target``, whole or not at all, checked against its name's hash.

    torchvision names its files ``<name>-<first 8+ hex digits of the SHA-256>.pth``; that prefix
    is verified (torch.hub's own convention). The file is written to a temporary name and
    renamed when whole, so an interrupted or corrupt download leaves nothing at ``target``.
    """
    found = re.search(r"-([a-f0-9]{8,})\.", Path(urlparse(url).path).name)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(
        url, str(target), hash_prefix=found.group(1) if found else None, progress=True
    )


def share_init_weights(path: str | None) -> Any:
    """The bytes of the start weights file in Ray's object store: the ``ObjectRef`` ranks read; None for None.

    Call on a driver connected to the cluster (``ray.init`` done); the object lives while it runs.
    """
    if path is None:
        return None
    import ray  # lazy: --no-ray never needs it

    return ray.put(Path(path).read_bytes())


def read_init_weights(path: str, ref: Any = None) -> dict[str, torch.Tensor]:
    """The start weights' state dict: from ``ref`` (`share_init_weights`) when given, else the file ``path``.

    Both load with ``torch.load(weights_only=True)``, onto the CPU.
    """
    if ref is None:
        return torch.load(path, map_location="cpu", weights_only=True)
    import ray

    return torch.load(io.BytesIO(ray.get(ref)), map_location="cpu", weights_only=True)
