"""Held-out AP for the sweep: an oracle scores 1, no detections 0, a real tiny detector something in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fpn import ModelConfig, build_detector
from pipeline.tune.holdout import HoldoutSet
from tests.train_samples import TINY_MODEL, tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("holdout-data"), train_images=2, val_images=5)


class Replay(torch.nn.Module):
    """Eval-mode stand-in for a detector: returns the given outputs, one per image, in order."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.outputs.pop(0) for _ in images]


def test_first_images_by_id_and_ground_truth(data: Path) -> None:
    holdout = HoldoutSet.load(data, "val2017", 3)
    assert len(holdout) == 3 and holdout.image_ids == sorted(holdout.image_ids)
    assert all(image.dtype == torch.float32 and image.shape[0] == 3 for image in holdout.images)
    assert len(HoldoutSet.load(data, "val2017", 50)) == 5, "fewer when the split has fewer"


def test_oracle_scores_one_and_no_detections_zero(data: Path) -> None:
    holdout = HoldoutSet.load(data, "val2017", 5)
    gt = holdout.ground_truth
    perfect = []
    for image_id in holdout.image_ids:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(
            -1, 4
        )
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        perfect.append({"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels})
    assert sum(len(o["boxes"]) for o in perfect) > 0, "the tiny synthetic images have boxes"
    scores = holdout.evaluate(Replay(perfect))
    assert scores["val_ap50"] == pytest.approx(1.0, abs=1e-6) and scores["val_ap"] == pytest.approx(
        1.0, abs=1e-6
    )
    empty = {
        "boxes": torch.zeros((0, 4)),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    assert holdout.evaluate(Replay([empty] * 5)) == {"val_ap50": 0.0, "val_ap": 0.0}


def test_untrained_detector_scores_in_range(data: Path) -> None:
    torch.manual_seed(0)
    model = build_detector(ModelConfig(**TINY_MODEL))
    scores = HoldoutSet.load(data, "val2017", 2).evaluate(model)
    assert set(scores) == {"val_ap50", "val_ap"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert not model.training


def test_bad_input(data: Path) -> None:
    with pytest.raises(ValueError, match="num_images"):
        HoldoutSet.load(data, "val2017", 0)
    with pytest.raises(Exception, match="val2099"):
        HoldoutSet.load(data, "val2099", 3)
