"""fpn.roi_align.roi_align_gather computes torchvision's roi_align: values and gradients."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from fpn.roi_align import roi_align_gather


def _inputs(n: int, c: int, h: int, w: int, num_rois: int, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feature = torch.randn(n, c, h, w, generator=g)
    img_w, img_h = w / scale, h / scale
    corner = torch.rand(num_rois, 2, generator=g) * torch.tensor([img_w, img_h])
    size = torch.rand(num_rois, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.6 + 0.1
    boxes = torch.cat([corner, corner + size], dim=1)
    extra = torch.tensor(
        [
            [0.0, 0.0, img_w, img_h],  # the whole map: samples on the last row/column
            [img_w - 1, img_h - 1, img_w, img_h],  # a corner cell
            [5.0, 5.0, 5.2, 5.3],  # smaller than a cell (clamped to 1x1)
            [-3 / scale, -3 / scale, 2 / scale, 2 / scale],  # partly outside: samples beyond -1 count 0
            [img_w + 0.5 / scale, 0.0, img_w + 4 / scale, 3 / scale],  # outside to the right
        ]
    )
    boxes = torch.cat([boxes, extra])
    image = torch.randint(0, n, (boxes.shape[0], 1), generator=g).float()
    return feature, torch.cat([image, boxes], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    ("shape", "scale", "output_size", "sampling_ratio"),
    [
        ((2, 8, 20, 24), 1 / 4, 7, 2),
        ((1, 5, 9, 7), 1 / 32, 7, 2),
        ((2, 3, 16, 16), 1 / 8, 5, 1),
        ((1, 4, 12, 10), 1 / 16, 14, 3),
    ],
)
def test_matches_torchvision(shape, scale, output_size, sampling_ratio, aligned) -> None:
    feature, rois = _inputs(*shape, num_rois=40, scale=scale)
    expected = roi_align(feature, rois, output_size, scale, sampling_ratio, aligned)
    got = roi_align_gather(
        feature,
        rois,
        output_size=output_size,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    channels_last = roi_align_gather(
        feature.contiguous(memory_format=torch.channels_last),
        rois,
        output_size=output_size,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    torch.testing.assert_close(channels_last, expected, rtol=1e-5, atol=1e-5)


def test_gradient_matches_torchvision() -> None:
    feature, rois = _inputs(2, 6, 14, 18, num_rois=30, scale=1 / 8, seed=1)
    upstream = torch.randn(rois.shape[0], 6, 7, 7, generator=torch.Generator().manual_seed(2))
    ours = feature.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    theirs = feature.clone().requires_grad_()
    (
        roi_align_gather(ours, rois, output_size=7, spatial_scale=1 / 8, sampling_ratio=2) * upstream
    ).sum().backward()
    (roi_align(theirs, rois, 7, 1 / 8, 2) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_no_rois_and_bad_sampling_ratio() -> None:
    feature = torch.randn(1, 4, 8, 8, requires_grad=True)
    empty = roi_align_gather(feature, torch.zeros(0, 5), output_size=7, spatial_scale=0.25, sampling_ratio=2)
    assert empty.shape == (0, 4, 7, 7)
    empty.sum().backward()
    assert feature.grad is not None and not feature.grad.any()
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_gather(feature, torch.zeros(1, 5), output_size=7, spatial_scale=0.25, sampling_ratio=0)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_gather_reads_a_row_contiguous_table_whatever_the_layout(
    n: int, memory_format: torch.memory_format, monkeypatch: pytest.MonkeyPatch
) -> None:
    # embedding_bag on a column-strided table (an NCHW map of one image, reshaped as a view) is ~10x
    # slower: every layout must reach it as contiguous (N*H*W, C) rows, with the same values.
    feature, rois = _inputs(n, 6, 10, 12, num_rois=7, scale=1 / 4)
    feature = feature.contiguous(memory_format=memory_format)
    tables = []
    embedding_bag = torch.nn.functional.embedding_bag

    def record(index, table, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        tables.append(table)
        return embedding_bag(index, table, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "embedding_bag", record)
    got = roi_align_gather(feature, rois, output_size=7, spatial_scale=1 / 4, sampling_ratio=2)
    assert len(tables) == 1 and tables[0].is_contiguous() and tables[0].shape == (n * 10 * 12, 6)
    torch.testing.assert_close(got, roi_align(feature, rois, 7, 1 / 4, 2), rtol=1e-5, atol=1e-5)
