"""Held-out AP in the training loop: an oracle scores 1, no detections 0, a real tiny detector in [0, 1].

Scoring a model being trained leaves its training as it was: mode, random streams. The loop's
side (reports, MLflow, exact resume with validation on) is in test_loop.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fpn import ModelConfig, build_detector
from pipeline.dataset import DetectionDataset
from pipeline.train.validation import (
    HoldoutSet,
    ValidationSpec,
    mean_loss_since,
    previous_validation,
    score_model,
)
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
    assert all(image.dtype == torch.uint8 and image.shape[0] == 3 for image in holdout.images)
    # Kept as decoded: exactly the dataset's uint8 image.
    first = DetectionDataset(data, "val2017", train=False)
    by_id = {int(image_id): i for i, image_id in enumerate(first.index.image_ids)}
    image, _ = first[by_id[holdout.image_ids[0]]]
    assert torch.equal(holdout.images[0], image)
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


class DrawsInEval(torch.nn.Module):
    """A 'detector' whose eval forward draws from torch's random stream and records the grad mode."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.grad_enabled: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.grad_enabled.append(torch.is_grad_enabled())
        torch.rand(100)
        empty = {
            "boxes": torch.zeros((0, 4)),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        return [empty for _ in images]


def test_score_model_restores_train_mode_and_the_random_stream(data: Path) -> None:
    holdout = HoldoutSet.from_spec(
        ValidationSpec(data_root=str(data), split="val2017", num_images=5, every=1, batch_size=2)
    )
    model = DrawsInEval().train()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert score_model(holdout, model, torch.device("cpu")) == {"val_ap50": 0.0, "val_ap": 0.0}
    assert torch.equal(torch.rand(4), expected), "the stream continues as if nothing had been scored"
    assert model.training, "back in train mode"
    assert model.grad_enabled == [False, False, False], "3 batches of 2, 2, 1 images, without grad"
    model.eval()
    score_model(holdout, model, torch.device("cpu"))
    assert not model.training, "a model scored in eval mode stays in eval mode"


def test_train_loss_is_the_mean_since_the_previous_validation() -> None:
    history = [[step, float(step), 0.0] for step in range(1, 8)]  # [step, loss, ...]: loss = step
    assert mean_loss_since(history, 3) == (4 + 5 + 6 + 7) / 4
    assert mean_loss_since(history, 0) == sum(range(1, 8)) / 7
    assert mean_loss_since(history, 7) != mean_loss_since(history, 7), "no step since: NaN"
    # Validations happen at every checkpoint: every checkpoint_every steps and at the last.
    assert [previous_validation(i, 5) for i in (5, 10, 12)] == [0, 5, 10]
