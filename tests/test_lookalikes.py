"""Ops that look like downsampling but are not, and a second rewrite of a rewritten model.

The pass must leave them alone (same output, nothing replaced), and for the conv and pool ops
among them ``report.skips`` must give the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spd_rewrite

STRIDE_ONE = "stride 1: not a downsampling step"
GLOBAL = "global pooling is never a match"


class TransposedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1)
        self.up3d = nn.ConvTranspose3d(2, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)
        z = self.up3d(y.unflatten(1, (2, 4)))
        return z.flatten(1, 2)


class SPPF(nn.Module):
    """YOLOv5's fast spatial pyramid pooling: three stride-1 max pools and a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        a = self.pool(x)
        b = self.pool(a)
        c = F.max_pool2d(b, 5, 1, 2)
        d = F.avg_pool2d(c, 3, stride=1, padding=1)
        return torch.cat([x, a, b, c, d], 1)


class GlobalPools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.adaptive = nn.AdaptiveAvgPool2d(1)
        self.adaptive_max = nn.AdaptiveMaxPool2d((1, 1))
        self.whole = nn.AvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [
            self.adaptive(x).flatten(1),
            self.adaptive_max(x).flatten(1),
            self.whole(x).flatten(1),
            x.mean((2, 3)),
            torch.mean(x, dim=[-1, -2]),
            F.adaptive_avg_pool2d(x, 1).flatten(1),
        ]
        return torch.cat(parts, 1)


class SizeKeepingAdaptivePool(nn.Module):
    """VGG's head: an adaptive pool to 7x7 that is the identity on a 7x7 map."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) + F.adaptive_max_pool2d(x, (7, 7))


class Interpolations(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        nearest = F.interpolate(x, size=(4, 4), mode="nearest")
        up = F.interpolate(down + nearest, scale_factor=2.0, mode="nearest")
        return up + x


def _rewrite(model: nn.Module, x: torch.Tensor) -> spd_rewrite.RewriteResult:
    return spd_rewrite.rewrite(model.eval(), x, rules="paper", transfer="exact")


def _assert_untouched(model: nn.Module, x: torch.Tensor, result: spd_rewrite.RewriteResult):
    assert result.report.layers == ()
    assert result.report.totals.replaced == 0
    assert result.report.totals.downsampling_left == 0
    with torch.no_grad():
        expected = model(x)
        found = result.model(x)
    assert torch.equal(expected, found)


def _reasons(result: spd_rewrite.RewriteResult) -> dict[str, str]:
    return {skip.name: skip.reason for skip in result.report.skips}


def test_transposed_convs_untouched():
    torch.manual_seed(0)
    model, x = TransposedConvs(), torch.randn(1, 4, 6, 5)
    result = _rewrite(model, x)

    _assert_untouched(model, x, result)
    reasons = _reasons(result)
    assert set(reasons) == {"up", "up3d"}
    assert all("transposed conv or resize" in reason for reason in reasons.values())


def test_sppf_stride_one_pools_skipped():
    torch.manual_seed(0)
    model, x = SPPF(), torch.randn(1, 4, 13, 11)
    result = _rewrite(model, x)

    _assert_untouched(model, x, result)
    skips = [(skip.name, skip.reason) for skip in result.report.skips]
    pool_reasons = [reason for name, reason in skips if "pool" in name]
    assert len(pool_reasons) == 4  # the module called twice, F.max_pool2d and F.avg_pool2d
    assert set(pool_reasons) == {STRIDE_ONE}
    assert ("conv", STRIDE_ONE) in skips


def test_global_pools_skipped():
    torch.manual_seed(0)
    model, x = GlobalPools(), torch.randn(2, 3, 8, 8)
    result = _rewrite(model, x)

    _assert_untouched(model, x, result)
    reasons = _reasons(result)
    assert len(reasons) == 6
    assert set(reasons.values()) == {GLOBAL}


def test_size_keeping_adaptive_pool_skipped():
    torch.manual_seed(0)
    model, x = SizeKeepingAdaptivePool(), torch.randn(1, 3, 7, 7)
    result = _rewrite(model, x)

    _assert_untouched(model, x, result)
    reasons = list(_reasons(result).values())
    assert len(reasons) == 2
    assert all("keeps the map size" in reason for reason in reasons)


def test_downsampling_adaptive_pool_reported_left():
    torch.manual_seed(0)
    model, x = SizeKeepingAdaptivePool(), torch.randn(1, 3, 14, 14)
    result = _rewrite(model, x)

    assert result.report.totals.replaced == 0
    assert result.report.totals.downsampling_left == 2
    reasons = list(_reasons(result).values())
    assert all("has no fixed stride" in reason for reason in reasons)


def test_interpolate_untouched():
    torch.manual_seed(0)
    model, x = Interpolations(), torch.randn(1, 2, 8, 8)
    result = _rewrite(model, x)

    _assert_untouched(model, x, result)
    reasons = _reasons(result)
    assert len(reasons) == 3
    assert all("transposed conv or resize" in reason for reason in reasons.values())


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
    ).eval()


@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_second_rewrite_is_idempotent(mode: str):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 21, 19)
    first = spd_rewrite.rewrite(_small_cnn(), x, rules="paper", mode=mode)
    assert first.report.totals.replaced == 3
    assert first.report.totals.downsampling_left == 0

    second = spd_rewrite.rewrite(first.model, x, rules="paper", mode=mode)
    assert second.report.totals.replaced == 0
    assert second.report.totals.downsampling_left == 0
    assert second.report.totals.params_after == first.report.totals.params_after
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))


def test_second_rewrite_of_resnet18_is_idempotent():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    first = spd_rewrite.rewrite(model, x, rules="paper")

    second = spd_rewrite.rewrite(first.model, x, rules="paper")
    assert second.report.totals.replaced == 0
    assert second.report.totals.downsampling_left == 0
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))
