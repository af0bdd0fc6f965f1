"""Load torchvision weights into our detector: a whole ``fasterrcnn_resnet50_fpn`` (or any
torchvision FasterRCNN with a ResNet-FPN backbone) state dict, or a plain torchvision ResNet
(ImageNet classifier) state dict for the bottom-up pathway only.

Key mapping (torchvision -> ours):
    backbone.body.<x>                       -> backbone.<x>
    backbone.fpn.inner_blocks.<i>.0.<p>     -> neck.lateral_convs.<i>.<p>
    backbone.fpn.layer_blocks.<i>.0.<p>     -> neck.output_convs.<i>.<p>
    rpn.head.conv.0.0.<p> (or conv.<p>)     -> rpn.head.conv.<p>   (every level's copy if unshared)
    rpn.head.{cls_logits,bbox_pred}.<p>     -> the same names
    roi_heads.box_head.fc{6,7}.<p>          -> the same names
    roi_heads.box_predictor.<x>             -> roi_heads.predictor.<x>
    plain ResNet <x> (fc.* dropped)         -> backbone.<x>
BatchNorm's ``num_batches_tracked`` is dropped or kept as ours needs (frozen BN has none).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor, nn

_RULES = (
    (re.compile(r"^backbone\.body\."), "backbone."),
    (re.compile(r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?"), r"neck.lateral_convs.\1."),
    (re.compile(r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?"), r"neck.output_convs.\1."),
    (re.compile(r"^rpn\.head\.conv\.(?:0\.0\.)?"), "rpn.head.conv."),
    (re.compile(r"^roi_heads\.box_predictor\."), "roi_heads.predictor."),
)


class LoadReport(NamedTuple):
    """What `load_torchvision_weights` did: our keys loaded, source keys not used, and our
    keys left at their initial values."""

    loaded: list[str]
    unused: list[str]
    missing: list[str]


def map_torchvision_key(key: str) -> str:
    """Our parameter name for one torchvision detection key (unchanged when no rule applies)."""
    for pattern, replacement in _RULES:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key


def _is_detection_state_dict(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith("backbone.body.") for k in state_dict)


def load_torchvision_weights(
    model: nn.Module, state_dict: dict[str, Tensor], *, strict: bool = True
) -> LoadReport:
    """Copy torchvision weights into ``model`` (a `fpn.Detector`).

    ``state_dict`` is either a torchvision FasterRCNN state dict (every part is loaded) or a
    torchvision ResNet state dict (only the backbone is loaded; ``fc`` is ignored).
    With ``strict`` (default), any shape mismatch, any source key without a place in our
    model, and (for a detection state dict) any of our weights left unloaded raise a
    ValueError naming the keys. ``strict=False`` skips those (e.g. to fine-tune torchvision's
    COCO weights with another number of classes) and reports them.
    """
    ours = model.state_dict()
    detection = _is_detection_state_dict(state_dict)
    mapped: dict[str, Tensor] = {}
    unused: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        if detection:
            target = map_torchvision_key(key)
        elif key.startswith("fc."):
            continue  # the ImageNet classifier
        else:
            target = "backbone." + key
            if target.startswith("backbone.layer4.") and not hasattr(model.backbone, "layer4"):
                continue  # the single-scale C4 baseline never builds res5
        if target.endswith("num_batches_tracked") and target not in ours:
            continue  # frozen BN keeps no counter
        targets = [target]
        if target not in ours and target.startswith("rpn.head."):
            # Unshared RPN heads (rpn.head.conv.<level>.weight, ...): torchvision's one shared
            # head initialises every level's head.
            head, _, param = target.rpartition(".")
            per_level = re.compile(re.escape(head) + r"\.\d+\." + re.escape(param))
            targets = [k for k in ours if per_level.fullmatch(k)]
        if not targets or any(t not in ours for t in targets):
            unused.append(key)
            continue
        for t in targets:
            if ours[t].shape != value.shape:
                mismatched.append(f"{key} {tuple(value.shape)} -> {t} {tuple(ours[t].shape)}")
            else:
                mapped[t] = value
    missing = sorted(k for k in ours if k not in mapped and not k.endswith("num_batches_tracked"))
    if not detection:
        missing = [k for k in missing if k.startswith("backbone.")]
    if strict and (unused or mismatched or missing):
        raise ValueError(
            "load_torchvision_weights: state dict does not fit the model: "
            f"unused source keys {unused[:10]}{'...' if len(unused) > 10 else ''}, "
            f"shape mismatches {mismatched[:10]}, "
            f"model keys not loaded {missing[:10]}{'...' if len(missing) > 10 else ''}"
        )
    with torch.no_grad():
        for key, value in mapped.items():
            ours[key].copy_(value)
    return LoadReport(loaded=sorted(mapped), unused=unused + mismatched, missing=missing)
