"""Transform: resize to ``min_size`` (one size, or one drawn per training image from a list),
normalise, pad; boxes follow the resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fpn
from fpn.transform import Transform

SIZES = (32, 40, 48, 56)
MAX_SIZE = 200


def make_transform(min_size: int | tuple[int, ...]) -> Transform:
    cfg = fpn.ModelConfig(min_size=min_size, max_size=MAX_SIZE)
    return Transform(
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        size_divisible=cfg.size_divisible,
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
    )


def tiny_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=g) for h, w in ((20, 30), (25, 25), (36, 18), (24, 40))]


def shorter_sides(transform: Transform, images: list[torch.Tensor]) -> list[int]:
    batch, _ = transform(images)
    return [min(size) for size in batch.image_sizes]


def test_training_draws_each_images_size_from_the_list() -> None:
    transform = make_transform(SIZES).train()
    torch.manual_seed(0)
    drawn = [shorter_sides(transform, tiny_images()) for _ in range(5)]
    assert all(side in SIZES for sides in drawn for side in sides)
    assert len({side for sides in drawn for side in sides}) > 1
    # Seeded: the same seed draws the same sizes (torch's default generator, as the loop seeds it).
    torch.manual_seed(0)
    assert [shorter_sides(transform, tiny_images()) for _ in range(5)] == drawn


def test_eval_uses_the_last_size() -> None:
    transform = make_transform(SIZES).eval()
    torch.manual_seed(0)
    assert shorter_sides(transform, tiny_images()) == [SIZES[-1]] * 4


def test_one_size_draws_nothing_and_resizes_as_before() -> None:
    images = tiny_images()
    single = make_transform(48).train()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    batch, _ = single(images)
    assert torch.equal(torch.get_rng_state(), state)  # seeded runs see the same random stream
    # The resize as it was before lists: factor min(min_size / short, max_size / long).
    for image, size, out in zip(images, batch.image_sizes, batch.tensor, strict=True):
        h, w = image.shape[-2:]
        normalised = (image - single.mean) / single.std
        expected = F.interpolate(
            normalised[None],
            scale_factor=min(48 / min(h, w), MAX_SIZE / max(h, w)),
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        assert size == tuple(expected.shape[-2:])
        assert torch.equal(out[:, : size[0], : size[1]], expected)
    # A one-element list and eval mode give the very same tensors.
    assert torch.equal(make_transform((48,)).train()(images)[0].tensor, batch.tensor)
    assert torch.equal(single.eval()(images)[0].tensor, batch.tensor)


def test_boxes_follow_each_images_drawn_size() -> None:
    transform = make_transform(SIZES).train()
    images = tiny_images()[:2]
    targets = [
        {"boxes": torch.tensor([[2.0, 4.0, 12.0, 16.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no objects
    ]
    torch.manual_seed(1)
    batch, scaled = transform(images, targets)
    (h, w), (h0, w0) = batch.image_sizes[0], images[0].shape[-2:]
    expected = targets[0]["boxes"] * torch.tensor([w / w0, h / h0, w / w0, h / h0])
    torch.testing.assert_close(scaled[0]["boxes"], expected)
    assert scaled[1]["boxes"].shape == (0, 4)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="min_size is empty"):
        Transform(
            min_size=(), max_size=MAX_SIZE, size_divisible=32, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
        )
    with pytest.raises(ValueError, match="expected \\(3, H, W\\)"):
        make_transform(SIZES)([torch.rand(1, 20, 20)])
