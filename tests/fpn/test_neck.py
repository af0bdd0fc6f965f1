"""Top-down pathway + lateral connections, and the ablation variants."""

from __future__ import annotations

import pytest
import torch

from fpn.neck import FeaturePyramid, SingleScale

CHANNELS = {2: 8, 3: 16, 4: 32, 5: 64}


def bottom_up(height: int = 64, width: int = 96) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(2, c, height // 2**k, width // 2**k, generator=g) for k, c in CHANNELS.items()}


def test_fpn_shapes_p2_to_p6() -> None:
    torch.manual_seed(0)
    neck = FeaturePyramid(in_channels=CHANNELS, out_channels=16)
    out = neck(bottom_up())
    assert list(out) == [2, 3, 4, 5, 6]
    for k, p in out.items():
        assert p.shape == (2, 16, -(-64 // 2**k), -(-96 // 2**k))
    # P6 is a stride-2 subsampling of P5.
    torch.testing.assert_close(out[6], out[5][:, :, ::2, ::2])


def test_top_down_reaches_p2() -> None:
    """Changing C5 changes P2 with the top-down pathway, and not without it."""
    torch.manual_seed(0)
    features = bottom_up()
    changed = {**features, 5: features[5] + 1.0}
    for top_down, expect_change in ((True, True), (False, False)):
        neck = FeaturePyramid(in_channels=CHANNELS, out_channels=16, top_down=top_down)
        with torch.no_grad():
            moved = not torch.allclose(neck(features)[2], neck(changed)[2])
        assert moved == expect_change


def test_no_lateral_ignores_c2_to_c4() -> None:
    torch.manual_seed(0)
    neck = FeaturePyramid(in_channels=CHANNELS, out_channels=16, lateral=False)
    assert len(neck.lateral_convs) == 1
    features = bottom_up()
    changed = {**features, 2: features[2] * 3.0, 3: features[3] - 1.0}
    with torch.no_grad():
        torch.testing.assert_close(neck(features)[2], neck(changed)[2])
    assert list(neck(features)) == [2, 3, 4, 5, 6]


def test_linear_no_non_linearities() -> None:
    """No ReLU in the pyramid: with zero biases, P(a*C) = a*P(C)."""
    torch.manual_seed(0)
    neck = FeaturePyramid(in_channels=CHANNELS, out_channels=16)
    features = bottom_up()
    with torch.no_grad():
        out, scaled = neck(features), neck({k: -2.0 * v for k, v in features.items()})
    for k in out:
        torch.testing.assert_close(scaled[k], -2.0 * out[k], rtol=1e-4, atol=1e-5)


def test_p2_only_and_single_scale() -> None:
    torch.manual_seed(0)
    p2 = FeaturePyramid(in_channels=CHANNELS, out_channels=16, output_levels=(2,))
    assert list(p2(bottom_up())) == [2]
    single = SingleScale(in_channels=32, out_channels=16, level=4)
    out = single(bottom_up())
    assert list(out) == [4] and out[4].shape == (2, 16, 4, 6)


def test_needs_top_down_or_lateral() -> None:
    with pytest.raises(ValueError, match="top-down"):
        FeaturePyramid(in_channels=CHANNELS, out_channels=16, top_down=False, lateral=False)
