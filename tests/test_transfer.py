"""Exactness of the weight transfer, the max-pool form and the widened consumers against torch ops.

Every check compares the SPD replacement with the original ``torch.nn.functional`` op on random
float32 tensors and requires ``max|y_new - y_old| <= 1e-4 * max|y_old|`` with equal shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spd_rewrite.errors import WeightTransferError
from spd_rewrite.ops.avg_pool_divisor import AvgPoolDivisorCorrection
from spd_rewrite.ops.geometry import AxisLayout, WindowAxis, plan_axis
from spd_rewrite.ops.phase_max import PhaseMax
from spd_rewrite.ops.space_to_depth import SpaceToDepth, space_to_depth
from spd_rewrite.transfer import (
    avg_pool_divisor_is_constant,
    avg_pool_weight_divisor,
    spd_avg_pool_weight,
    spd_conv_weight,
    spd_max_pool_init_weight,
    widen_batchnorm,
    widen_conv_input,
    widen_groupnorm,
    widen_linear_input,
)

RELATIVE_BOUND = 1e-4
ORDERS = ("unshuffle", "reference")

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override=None):
    spatial = x.dim() - 2
    if spatial == 1:
        # avg_pool1d has no divisor_override.
        assert divisor_override is None
        return F.avg_pool1d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    pool = F.avg_pool2d if spatial == 2 else F.avg_pool3d
    return pool(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _per_axis(value: int | Sequence[int], spatial: int) -> tuple[int, ...]:
    return (value,) * spatial if isinstance(value, int) else tuple(value)


def _plan(
    kernel,
    stride,
    padding=0,
    dilation=1,
    ceil_mode=False,
    new_kernel: str | None = None,
    spatial: int = 2,
) -> list[AxisLayout]:
    """Plan every axis; ``new_kernel`` is ``None`` (compact) or ``"same"`` (the original size)."""
    layouts = []
    for k, s, p, d in zip(
        _per_axis(kernel, spatial),
        _per_axis(stride, spatial),
        _per_axis(padding, spatial),
        _per_axis(dilation, spatial),
        strict=True,
    ):
        axis = WindowAxis(k, s, p, d, ceil_mode)
        layouts.append(plan_axis(axis, k if new_kernel == "same" else None))
    return layouts


def _spd(x, layouts, order, pad_value=0.0):
    return space_to_depth(
        x,
        [layout.scale for layout in layouts],
        [layout.pad_before for layout in layouts],
        [layout.block_offset for layout in layouts],
        pad_value=pad_value,
        order=order,
    )


def _assert_close(new: torch.Tensor, old: torch.Tensor, case: str = "") -> None:
    assert new.shape == old.shape, f"{case}: shape {tuple(new.shape)} != {tuple(old.shape)}"
    # A max-pool window that covers only padding returns -inf; both sides must agree there.
    infinite = old.isinf()
    assert torch.equal(new.isinf(), infinite), f"{case}: infinities at different places"
    assert torch.equal(new[infinite], old[infinite]), f"{case}: infinities of different sign"
    if infinite.all():
        return
    error = (new - old)[~infinite].abs().max().item()
    scale = old[~infinite].abs().max().item()
    assert error <= RELATIVE_BOUND * scale, f"{case}: max error {error:.3g}, max |y| {scale:.3g}"


def _spd_conv(x, weight, bias, layouts, groups, order):
    """Run the SPD + stride-1 conv replacement of a conv with ``weight``."""
    spatial = x.dim() - 2
    new_weight = spd_conv_weight(weight, layouts, groups, order)
    padding = [layout.padding for layout in layouts]
    return CONV[spatial](_spd(x, layouts, order), new_weight, bias, 1, padding, 1, groups)


def _check_conv(x, weight, bias, stride, padding, dilation, groups, order, new_kernel, case=""):
    spatial = x.dim() - 2
    old = CONV[spatial](x, weight, bias, stride, padding, dilation, groups)
    kernel = tuple(weight.shape[2:])
    layouts = _plan(kernel, stride, padding, dilation, new_kernel=new_kernel, spatial=spatial)
    new = _spd_conv(x, weight, bias, layouts, groups, order)
    _assert_close(new, old, case)


def _spd_max_pool(x, layouts, order):
    phase_max = PhaseMax(layouts, x.shape[1], order)
    return phase_max(_spd(x, layouts, order, pad_value=float("-inf")))


def _spd_avg_pool(x, kernel, layouts, axes, count_include_pad, divisor_override, order):
    """Run the SPD + stride-1 conv replacement of an average pool, with the divisor fix-up."""
    spatial = x.dim() - 2
    kernel = _per_axis(kernel, spatial)
    divisor = avg_pool_weight_divisor(kernel, divisor_override)
    weight = spd_avg_pool_weight(x.shape[1], kernel, layouts, divisor, order)
    padding = [layout.padding for layout in layouts]
    y = CONV[spatial](_spd(x, layouts, order), weight, None, 1, padding)
    if avg_pool_divisor_is_constant(axes, count_include_pad, divisor_override):
        return y
    correction = AvgPoolDivisorCorrection(
        [axis.kernel for axis in axes],
        [axis.stride for axis in axes],
        [axis.padding for axis in axes],
        count_include_pad,
        divisor,
    )
    return correction(y, x)


def _sizes(axis: WindowAxis) -> range:
    """Input sizes from the smallest valid one through two periods of the stride."""
    smallest = max(1, axis.span - 2 * axis.padding)
    return range(smallest, smallest + 2 * axis.stride + 2)


# --- conv: exact transfer -----------------------------------------------------------------------


def test_conv1d_sweep_all_kernels():
    """Kernels 1..7, strides 2..4, padding, dilation, both kernel sizes and orders, many sizes."""
    torch.manual_seed(0)
    checked = 0
    for k in range(1, 8):
        for s in range(2, 5):
            for p in range(0, k // 2 + 1):
                for d in (1, 2):
                    axis = WindowAxis(k, s, p, d)
                    weight = torch.randn(3, 2, k)
                    bias = torch.randn(3)
                    for new_kernel in (None, "same"):
                        layouts = [plan_axis(axis, k if new_kernel == "same" else None)]
                        if not layouts[0].fits_taps:
                            with pytest.raises(WeightTransferError, match="compact"):
                                spd_conv_weight(weight, layouts)
                            continue
                        for order in ORDERS:
                            for size in _sizes(axis):
                                x = torch.randn(2, 2, size)
                                old = F.conv1d(x, weight, bias, s, p, d)
                                new = _spd_conv(x, weight, bias, layouts, 1, order)
                                case = f"k={k} s={s} p={p} d={d} {new_kernel} {order} n={size}"
                                _assert_close(new, old, case)
                                checked += 1
    assert checked > 3000


CONV2D_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, bias, size)
    (4, 6, 3, 2, 1, 1, 1, True, (32, 32)),
    (4, 6, 3, 2, 1, 1, 1, False, (17, 23)),
    (3, 8, 7, 2, 3, 1, 1, True, (31, 30)),
    (4, 6, 1, 2, 0, 1, 1, True, (9, 10)),
    (4, 6, 4, 4, 0, 1, 1, True, (19, 21)),
    (4, 6, 5, 3, 2, 1, 1, True, (20, 14)),
    (4, 6, 3, 2, 2, 2, 1, True, (15, 16)),
    (4, 6, (3, 5), (2, 3), (1, 2), (1, 2), 1, True, (18, 25)),
    (4, 6, (1, 3), (2, 2), (0, 1), 1, 1, True, (13, 13)),
    (8, 12, 3, 2, 1, 1, 4, True, (16, 15)),
    (8, 8, 3, 2, 1, 1, 8, True, (15, 16)),
    (6, 12, 5, 2, 2, 1, 6, False, (21, 11)),
    (6, 6, 6, 4, 3, 1, 2, True, (23, 27)),
]


@pytest.mark.parametrize("new_kernel", [None, "same"])
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, size",
    CONV2D_CASES,
)
def test_conv2d_exact(
    in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, size, new_kernel
):
    torch.manual_seed(1)
    k = _per_axis(kernel, 2)
    weight = torch.randn(out_channels, in_channels // groups, *k)
    bias_tensor = torch.randn(out_channels) if bias else None
    x = torch.randn(2, in_channels, *size)
    orders = ORDERS if groups == 1 else ("unshuffle",)
    for order in orders:
        _check_conv(x, weight, bias_tensor, stride, padding, dilation, groups, order, new_kernel)


CONV3D_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, size)
    (3, 4, 3, 2, 1, 1, 1, (8, 9, 7)),
    (4, 4, 3, 2, 1, 1, 4, (7, 8, 9)),
    (4, 6, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, 2, (5, 9, 10)),
    (2, 3, (2, 3, 4), (2, 3, 4), 0, 1, 1, (9, 10, 11)),
    (2, 3, 3, 2, 2, 2, 1, (9, 8, 10)),
]


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, dilation, groups, size", CONV3D_CASES
)
def test_conv3d_exact(in_channels, out_channels, kernel, stride, padding, dilation, groups, size):
    torch.manual_seed(2)
    k = _per_axis(kernel, 3)
    weight = torch.randn(out_channels, in_channels // groups, *k)
    bias = torch.randn(out_channels)
    x = torch.randn(2, in_channels, *size)
    orders = ORDERS if groups == 1 else ("unshuffle",)
    for order in orders:
        _check_conv(x, weight, bias, stride, padding, dilation, groups, order, None)


def test_conv_compact_kernel_3x3_stride2_is_2x2():
    layouts = _plan(3, 2, 1)
    assert [layout.kernel for layout in layouts] == [2, 2]

    weight = torch.randn(5, 3, 3, 3)
    new_weight = spd_conv_weight(weight, layouts)
    assert new_weight.shape == (5, 12, 2, 2)

    x = torch.randn(1, 3, 11, 12)
    _check_conv(x, weight, None, 2, 1, 1, 1, "unshuffle", None)


def test_conv_weight_keeps_every_tap_once():
    weight = torch.randn(4, 3, 5, 5)
    for order in ORDERS:
        new_weight = spd_conv_weight(weight, _plan(5, 2, 2), order=order)
        assert torch.allclose(new_weight.sum(), weight.sum(), rtol=1e-5)
        assert torch.count_nonzero(new_weight) == torch.count_nonzero(weight)


def test_conv_weight_keeps_dtype():
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert spd_conv_weight(weight, _plan(3, 2, 1)).dtype == torch.float64


def test_conv_weight_too_small_kernel_raises():
    layout = plan_axis(WindowAxis(3, 2, 1), 1)
    assert not layout.fits_taps
    with pytest.raises(WeightTransferError, match='kernel = "compact"'):
        spd_conv_weight(torch.randn(4, 3, 3, 3), [layout, layout])


def test_conv_weight_grouped_reference_raises():
    with pytest.raises(WeightTransferError, match="groups=2.*use order 'unshuffle'"):
        spd_conv_weight(torch.randn(4, 3, 3, 3), _plan(3, 2, 1), groups=2, order="reference")


def test_conv_weight_layout_mismatch_raises():
    weight = torch.randn(4, 3, 3, 3)
    with pytest.raises(WeightTransferError, match="needs 2 layouts, got 1"):
        spd_conv_weight(weight, _plan(3, 2, 1, spatial=1))
    with pytest.raises(WeightTransferError, match="has 5 taps but the kernel has 3"):
        spd_conv_weight(weight, _plan(5, 2, 2))


def test_conv_weight_bad_order_raises():
    with pytest.raises(WeightTransferError, match="order must be"):
        spd_conv_weight(torch.randn(4, 3, 3, 3), _plan(3, 2, 1), order="columns")


def test_conv_weight_gradient_flows():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    spd_conv_weight(weight, _plan(3, 2, 1)).sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


# --- max pool: PhaseMax -------------------------------------------------------------------------


def test_max_pool1d_sweep_all_kernels():
    """Kernels 1..7, strides 2..4, padding, dilation, ceil mode, both orders, many sizes."""
    torch.manual_seed(3)
    checked = 0
    unplanned = []
    for k in range(1, 8):
        for s in range(2, 5):
            for p in range(0, k // 2 + 1):
                for d in (1, 2):
                    for ceil_mode in (False, True):
                        axis = WindowAxis(k, s, p, d, ceil_mode)
                        try:
                            layouts = [plan_axis(axis, None)]
                        except ValueError:
                            unplanned.append(axis)
                            continue
                        for order in ORDERS:
                            for size in _sizes(axis):
                                x = torch.randn(2, 3, size)
                                old = F.max_pool1d(x, k, s, p, d, ceil_mode)
                                new = _spd_max_pool(x, layouts, order)
                                _assert_close(new, old, f"{axis} {order} n={size}")
                                checked += 1
    # Only some ceil-mode pools lack a layout; every floor-mode pool has one.
    assert all(axis.ceil_mode for axis in unplanned)
    assert checked > 3000


MAX_POOL_CASES = [
    # (kernel, stride, padding, dilation, ceil_mode, size)
    (2, 2, 0, 1, False, (32, 32)),
    (2, 2, 0, 1, True, (31, 33)),
    (3, 2, 1, 1, False, (17, 16)),
    (3, 2, 1, 1, True, (18, 19)),
    (3, 2, 0, 1, True, (14, 15)),
    (3, 3, 1, 2, False, (22, 23)),
    (5, 2, 2, 1, False, (9, 12)),
    (7, 4, 3, 1, False, (25, 30)),
    ((2, 3), (2, 3), (1, 1), (1, 2), False, (13, 20)),
    ((3, 1), (2, 2), (1, 0), 1, False, (11, 10)),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode, size", MAX_POOL_CASES)
def test_max_pool2d_exact(kernel, stride, padding, dilation, ceil_mode, size, order):
    torch.manual_seed(4)
    x = torch.randn(2, 5, *size)
    layouts = _plan(kernel, stride, padding, dilation, ceil_mode)
    old = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    _assert_close(_spd_max_pool(x, layouts, order), old)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, ceil_mode, size",
    [
        (2, 2, 0, 1, False, (8, 9, 10)),
        (3, 2, 1, 1, False, (7, 9, 8)),
        (3, 2, 0, 1, True, (8, 9, 7)),
        ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1, False, (5, 9, 8)),
        (3, 2, 1, 2, False, (9, 8, 11)),
    ],
)
def test_max_pool3d_exact(kernel, stride, padding, dilation, ceil_mode, size, order):
    torch.manual_seed(5)
    x = torch.randn(2, 3, *size)
    layouts = _plan(kernel, stride, padding, dilation, ceil_mode, spatial=3)
    old = F.max_pool3d(x, kernel, stride, padding, dilation, ceil_mode)
    _assert_close(_spd_max_pool(x, layouts, order), old)


def test_max_pool_all_negative_input():
    """-inf padding, unlike zero padding, never wins over negative values at the border."""
    x = -torch.rand(1, 2, 9, 10) - 1.0
    layouts = _plan(3, 2, 1)
    _assert_close(_spd_max_pool(x, layouts, "unshuffle"), F.max_pool2d(x, 3, 2, 1))


def test_phase_max_extra_repr():
    phase_max = PhaseMax(_plan(3, 2, 1), 64, "reference")
    text = repr(phase_max)
    assert "channels=64" in text
    assert "scale=(2, 2)" in text
    assert "kernel=(2, 2)" in text
    assert "taps=9" in text
    assert "order='reference'" in text


def test_phase_max_rejects_small_kernel():
    layout = plan_axis(WindowAxis(3, 2, 1), 1)
    with pytest.raises(ValueError, match="cannot hold every tap"):
        PhaseMax([layout, layout], 4)


def test_phase_max_rejects_wrong_channels():
    phase_max = PhaseMax(_plan(2, 2), 4)
    with pytest.raises(ValueError, match=r"expects an SPD tensor \(N, 16"):
        phase_max(torch.randn(1, 12, 5, 5))


# --- average pool: exact conv weight and divisor fix-up -----------------------------------------


def test_avg_pool1d_sweep_all_kernels():
    """Kernels 1..7, strides 2..4, padding, ceil mode, count_include_pad, orders, many sizes."""
    torch.manual_seed(6)
    checked = 0
    for k in range(1, 8):
        for s in range(2, 5):
            for p in range(0, k // 2 + 1):
                for ceil_mode in (False, True):
                    axis = WindowAxis(k, s, p, 1, ceil_mode)
                    try:
                        layouts = [plan_axis(axis, None)]
                    except ValueError:
                        continue
                    for count_include_pad in (True, False):
                        for order in ORDERS:
                            for size in _sizes(axis):
                                x = torch.randn(2, 3, size)
                                old = _avg_pool(x, k, s, p, ceil_mode, count_include_pad)
                                new = _spd_avg_pool(
                                    x, k, layouts, [axis], count_include_pad, None, order
                                )
                                case = f"{axis} include_pad={count_include_pad} {order} n={size}"
                                _assert_close(new, old, case)
                                checked += 1
    assert checked > 2000


AVG_POOL_CASES = [
    # (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, size)
    (2, 2, 0, False, True, None, (32, 32)),
    (2, 2, 0, True, True, None, (31, 33)),
    (3, 2, 1, False, True, None, (17, 16)),
    (3, 2, 1, False, False, None, (17, 16)),
    (3, 2, 1, True, False, None, (18, 19)),
    (3, 2, 0, True, True, None, (14, 15)),
    (3, 2, 1, False, False, 5, (13, 12)),
    (5, 3, 2, False, False, None, (20, 19)),
    ((2, 3), (2, 3), (1, 1), False, False, None, (13, 20)),
    ((3, 2), (2, 2), (1, 0), True, True, None, (11, 10)),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, size",
    AVG_POOL_CASES,
)
def test_avg_pool2d_exact(
    kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, size, order
):
    torch.manual_seed(7)
    x = torch.randn(2, 4, *size)
    k, s, p = _per_axis(kernel, 2), _per_axis(stride, 2), _per_axis(padding, 2)
    axes = [WindowAxis(*args, 1, ceil_mode) for args in zip(k, s, p, strict=True)]
    layouts = [plan_axis(axis, None) for axis in axes]
    old = _avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    new = _spd_avg_pool(x, kernel, layouts, axes, count_include_pad, divisor_override, order)
    _assert_close(new, old)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, size",
    [
        (2, 2, 0, False, (8, 9, 10)),
        (3, 2, 1, False, (7, 9, 8)),
        (3, 2, 0, True, (8, 9, 7)),
        ((1, 3, 3), (1, 2, 2), (0, 1, 1), True, (5, 9, 8)),
    ],
)
def test_avg_pool3d_exact(kernel, stride, padding, ceil_mode, size, count_include_pad):
    torch.manual_seed(8)
    x = torch.randn(2, 3, *size)
    k, s, p = _per_axis(kernel, 3), _per_axis(stride, 3), _per_axis(padding, 3)
    axes = [WindowAxis(*args, 1, ceil_mode) for args in zip(k, s, p, strict=True)]
    layouts = [plan_axis(axis, None) for axis in axes]
    old = _avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad)
    for order in ORDERS:
        new = _spd_avg_pool(x, kernel, layouts, axes, count_include_pad, None, order)
        _assert_close(new, old, order)


def test_avg_pool_depthwise_weight_matches_dense():
    torch.manual_seed(9)
    x = torch.randn(2, 6, 15, 14)
    layouts = _plan(3, 2, 1)
    dense = spd_avg_pool_weight(6, 3, layouts, 9)
    depthwise = spd_avg_pool_weight(6, 3, layouts, 9, depthwise=True)
    assert dense.shape == (6, 24, 2, 2)
    assert depthwise.shape == (6, 4, 2, 2)

    spd = _spd(x, layouts, "unshuffle")
    _assert_close(F.conv2d(spd, depthwise, groups=6), F.conv2d(spd, dense))
    _assert_close(F.conv2d(spd, dense), F.avg_pool2d(x, 3, 2, 1))


def test_avg_pool_depthwise_reference_raises():
    with pytest.raises(WeightTransferError, match="use order 'unshuffle'"):
        spd_avg_pool_weight(6, 3, _plan(3, 2, 1), 9, "reference", depthwise=True)


def test_avg_pool_divisor_constant_only_when_fixed():
    """The helper returns constant exactly when PyTorch's divisor is the kernel size everywhere."""
    torch.manual_seed(10)
    for k in range(1, 7):
        for s in range(2, 5):
            for p in range(0, k // 2 + 1):
                for ceil_mode in (False, True):
                    for count_include_pad in (True, False):
                        axis = WindowAxis(k, s, p, 1, ceil_mode)
                        constant = avg_pool_divisor_is_constant([axis], count_include_pad)
                        # The divisor at every output of every size, as PyTorch computes it:
                        # window sum / window mean on a (1, size) image of ones.
                        divisors = set()
                        for size in range(max(1, k - 2 * p), k + 4 * s):
                            ones = torch.ones(1, 1, 1, size)
                            options = ((1, k), (1, s), (0, p), ceil_mode, count_include_pad)
                            sums = F.avg_pool2d(ones, *options, divisor_override=1)
                            means = F.avg_pool2d(ones, *options)
                            divisors |= set((sums / means).round().int().flatten().tolist())
                        case = f"{axis} include_pad={count_include_pad}"
                        assert constant == (divisors == {k}), f"{case}: divisors {divisors}"


def test_avg_pool_divisor_override_is_constant():
    axis = WindowAxis(3, 2, 1, 1, True)
    assert avg_pool_divisor_is_constant([axis], False, divisor_override=7)
    assert avg_pool_weight_divisor((3, 3), 7) == 7
    assert avg_pool_weight_divisor((3, 3)) == 9


def test_avg_pool_zero_divisor_raises():
    with pytest.raises(WeightTransferError, match="must not be 0"):
        spd_avg_pool_weight(4, 3, _plan(3, 2, 1), 0)


def test_divisor_correction_extra_repr():
    correction = AvgPoolDivisorCorrection((3, 3), (2, 2), (1, 1), False, 9)
    assert repr(correction) == (
        "AvgPoolDivisorCorrection(kernel=(3, 3), stride=(2, 2), padding=(1, 1), "
        "count_include_pad=False, weight_divisor=9)"
    )


# --- learned conv in place of a max pool: initial weight ----------------------------------------


def test_max_pool_init_weight_is_window_mean():
    torch.manual_seed(11)
    x = torch.randn(2, 4, 16, 18)
    layouts = _plan(2, 2)
    for order in ORDERS:
        weight = spd_max_pool_init_weight(4, layouts, order)
        assert weight.shape == (4, 16, 1, 1)
        new = F.conv2d(_spd(x, layouts, order), weight)
        _assert_close(new, F.avg_pool2d(x, 2, 2), order)


def test_max_pool_init_weight_is_approximate():
    torch.manual_seed(12)
    x = torch.randn(2, 4, 16, 18)
    layouts = _plan(3, 2, 1)
    weight = spd_max_pool_init_weight(4, layouts)
    new = F.conv2d(_spd(x, layouts, "unshuffle"), weight)
    old = F.max_pool2d(x, 3, 2, 1)
    assert new.shape == old.shape
    assert (new - old).abs().max() > 0.1


def test_max_pool_init_small_kernel():
    layout = plan_axis(WindowAxis(3, 2, 1), 1)
    weight = spd_max_pool_init_weight(2, [layout, layout])
    assert weight.shape == (2, 8, 1, 1)
    # 2 of the 3 taps per axis fit, so 4 taps of weight 1/4 per channel.
    assert torch.allclose(weight.sum(dim=(1, 2, 3)), torch.ones(2))
    assert torch.count_nonzero(weight) == 8


# --- widened consumers in the conv-then-SPD layout ----------------------------------------------


def _strided_chain(conv2_groups: int = 1) -> nn.Sequential:
    torch.manual_seed(13)
    chain = nn.Sequential(
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, groups=conv2_groups),
    )
    batch_norm = chain[1]
    with torch.no_grad():
        batch_norm.running_mean.uniform_(-1, 1)
        batch_norm.running_var.uniform_(0.5, 2)
        batch_norm.weight.uniform_(0.5, 1.5)
        batch_norm.bias.uniform_(-0.5, 0.5)
    return chain.eval()


def _conv_then_spd(chain: nn.Sequential, order: str) -> nn.Sequential:
    conv = chain[0]
    stride_one = nn.Conv2d(16, 32, 3, stride=1, padding=1)
    stride_one.load_state_dict(conv.state_dict())
    return nn.Sequential(
        stride_one,
        SpaceToDepth(2, order=order),
        widen_batchnorm(chain[1], 4, order),
        nn.ReLU(),
        widen_conv_input(chain[3], 4, order),
    ).eval()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("size", [(32, 32), (31, 29)])
def test_widen_conv_then_spd_chain_exact(size, order):
    chain = _strided_chain()
    wide = _conv_then_spd(chain, order)
    assert wide[2].num_features == 128
    assert wide[4].in_channels == 128

    x = torch.randn(1, 16, *size)
    with torch.no_grad():
        _assert_close(wide(x), chain(x))


@pytest.mark.parametrize("groups", [4, 32])
def test_widen_grouped_consumer_exact(groups):
    chain = _strided_chain(conv2_groups=groups)
    wide = _conv_then_spd(chain, "unshuffle")
    assert wide[4].groups == groups

    x = torch.randn(2, 16, 21, 22)
    with torch.no_grad():
        _assert_close(wide(x), chain(x))


def test_widen_grouped_consumer_reference_raises():
    conv = nn.Conv2d(32, 64, 3, groups=4)
    with pytest.raises(WeightTransferError, match="groups=4.*exact=False"):
        widen_conv_input(conv, 4, "reference")


def test_widen_conv_fresh_keeps_shape_and_options():
    conv = nn.Conv1d(8, 12, 5, stride=3, padding=2, dilation=2, groups=2, padding_mode="reflect")
    wide = widen_conv_input(conv, 3, "unshuffle", exact=False)
    assert isinstance(wide, nn.Conv1d)
    assert wide.weight.shape == (12, 12, 5)
    assert (wide.stride, wide.padding, wide.dilation) == ((3,), (2,), (2,))
    assert wide.groups == 2
    assert wide.padding_mode == "reflect"
    assert wide.bias is not None


def test_widen_conv3d_exact():
    torch.manual_seed(14)
    first = nn.Conv3d(3, 4, 3, stride=2, padding=1)
    second = nn.Conv3d(4, 5, 3, padding=1, bias=False)
    stride_one = nn.Conv3d(3, 4, 3, padding=1)
    stride_one.load_state_dict(first.state_dict())
    x = torch.randn(1, 3, 9, 8, 7)
    for order in ORDERS:
        wide = widen_conv_input(second, 8, order)
        new = wide(space_to_depth(stride_one(x), (2, 2, 2), order=order))
        _assert_close(new, second(first(x)), order)


def test_widen_batchnorm_replicates_per_phase():
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.weight.copy_(torch.tensor([4.0, 5.0, 6.0]))
    bn.num_batches_tracked.fill_(7)

    unshuffled = widen_batchnorm(bn, 2, "unshuffle")
    assert isinstance(unshuffled, nn.BatchNorm1d)
    assert unshuffled.running_mean.tolist() == [1, 1, 2, 2, 3, 3]
    assert unshuffled.weight.tolist() == [4, 4, 5, 5, 6, 6]
    assert unshuffled.num_batches_tracked.item() == 7
    assert unshuffled.training

    referenced = widen_batchnorm(bn, 2, "reference")
    assert referenced.running_mean.tolist() == [1, 2, 3, 1, 2, 3]


def test_widen_batchnorm_without_affine_or_stats():
    bn = nn.BatchNorm3d(4, affine=False, track_running_stats=False, eps=1e-3)
    wide = widen_batchnorm(bn, 8)
    assert isinstance(wide, nn.BatchNorm3d)
    assert wide.num_features == 32
    assert wide.weight is None
    assert wide.running_mean is None
    assert wide.eps == 1e-3


def test_widen_syncbatchnorm_keeps_class():
    bn = nn.SyncBatchNorm(4, momentum=None)
    wide = widen_batchnorm(bn, 2, "reference")
    assert isinstance(wide, nn.SyncBatchNorm)
    assert wide.num_features == 8
    assert wide.momentum is None


def test_widen_batchnorm_rejects_other_layers():
    with pytest.raises(WeightTransferError, match="got LayerNorm"):
        widen_batchnorm(nn.LayerNorm(4), 4)


def test_widen_rejects_bad_factor():
    with pytest.raises(WeightTransferError, match="factor must be a positive integer"):
        widen_batchnorm(nn.BatchNorm2d(4), 0)


@pytest.mark.parametrize("order", ORDERS)
def test_widen_linear_after_flatten_exact(order):
    torch.manual_seed(15)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    stride_one = nn.Conv2d(3, 4, 3, padding=1)
    stride_one.load_state_dict(conv.state_dict())
    linear = nn.Linear(4 * 5 * 6, 7)
    x = torch.randn(2, 3, 10, 11)

    old = linear(conv(x).flatten(1))
    wide = widen_linear_input(linear, 4, order, spatial_size=5 * 6)
    assert wide.in_features == 4 * 4 * 5 * 6
    new = wide(space_to_depth(stride_one(x), (2, 2), order=order).flatten(1))
    _assert_close(new, old)


@pytest.mark.parametrize("order", ORDERS)
def test_widen_linear_after_global_pool_exact(order):
    torch.manual_seed(16)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    stride_one = nn.Conv2d(3, 4, 3, padding=1)
    stride_one.load_state_dict(conv.state_dict())
    linear = nn.Linear(4, 7)
    x = torch.randn(2, 3, 10, 11)

    old = linear(conv(x).amax(dim=(2, 3)))
    wide = widen_linear_input(linear, 4, order)
    new = wide(space_to_depth(stride_one(x), (2, 2), order=order)[..., :5, :6].amax(dim=(2, 3)))
    _assert_close(new, old)


def test_widen_linear_bad_spatial_size_raises():
    with pytest.raises(WeightTransferError, match="spatial_size 7 does not divide the 30"):
        widen_linear_input(nn.Linear(30, 2), 4, spatial_size=7)


def test_widen_groupnorm_keeps_groups():
    gn = nn.GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.copy_(torch.arange(8.0))
    wide = widen_groupnorm(gn, 4)
    assert wide.num_groups == 4
    assert wide.num_channels == 32
    assert wide.weight[:8].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_widen_groupnorm_reference_raises():
    with pytest.raises(WeightTransferError, match="4 groups.*use order 'unshuffle'"):
        widen_groupnorm(nn.GroupNorm(4, 8), 4, "reference")
    assert widen_groupnorm(nn.GroupNorm(1, 8), 4, "reference").num_channels == 32


# --- property test over random small cases ------------------------------------------------------


@st.composite
def _window_cases(draw):
    """Draw 1 to 3 axes of a small strided window op, an input size, groups and an order."""
    spatial = draw(st.integers(1, 3))
    axes = []
    sizes = []
    for _ in range(spatial):
        k = draw(st.integers(1, 5))
        s = draw(st.integers(2, 4))
        p = draw(st.integers(0, k // 2))
        d = draw(st.integers(1, 2))
        axis = WindowAxis(k, s, p, d)
        axes.append(axis)
        smallest = max(1, axis.span - 2 * p)
        sizes.append(draw(st.integers(smallest, smallest + (9 if spatial < 3 else 4))))
    groups = draw(st.sampled_from([1, 2, 4]))
    order = draw(st.sampled_from(ORDERS if groups == 1 else ("unshuffle",)))
    seed = draw(st.integers(0, 2**16))
    return axes, sizes, groups, order, seed


@settings(max_examples=100, deadline=None)
@given(_window_cases(), st.sampled_from([None, "same"]))
def test_property_conv_exact(case, new_kernel):
    axes, sizes, groups, order, seed = case
    spatial = len(axes)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *sizes, generator=generator)
    kernel = [axis.kernel for axis in axes]
    weight = torch.randn(8, 4 // groups, *kernel, generator=generator)
    bias = torch.randn(8, generator=generator)
    stride = [axis.stride for axis in axes]
    padding = [axis.padding for axis in axes]
    dilation = [axis.dilation for axis in axes]
    old = CONV[spatial](x, weight, bias, stride, padding, dilation, groups)

    compact = [plan_axis(axis, None) for axis in axes]
    assert all(layout.fits_taps for layout in compact)
    layouts = [plan_axis(axis, axis.kernel) for axis in axes] if new_kernel else compact
    if all(layout.fits_taps for layout in layouts):
        _assert_close(_spd_conv(x, weight, bias, layouts, groups, order), old, "conv")
    else:
        with pytest.raises(WeightTransferError, match="compact"):
            spd_conv_weight(weight, layouts, groups, order)


@settings(max_examples=100, deadline=None)
@given(_window_cases(), st.booleans(), st.booleans())
def test_property_pools_exact(case, ceil_mode, count_include_pad):
    axes, sizes, _, order, seed = case
    spatial = len(axes)
    x = torch.randn(2, 3, *sizes, generator=torch.Generator().manual_seed(seed))
    kernel = [axis.kernel for axis in axes]
    stride = [axis.stride for axis in axes]
    padding = [axis.padding for axis in axes]
    dilation = [axis.dilation for axis in axes]

    # Some ceil-mode pools have no layout; plan_axis raises ValueError for those.
    windows = list(zip(kernel, stride, padding, dilation, strict=True))
    max_axes = [WindowAxis(k, s, p, d, ceil_mode) for k, s, p, d in windows]
    try:
        max_layouts = [plan_axis(axis, None) for axis in max_axes]
    except ValueError:
        max_layouts = None
    if max_layouts is not None:
        old = MAX_POOL[spatial](x, kernel, stride, padding, dilation, ceil_mode)
        _assert_close(_spd_max_pool(x, max_layouts, order), old, "max pool")

    if spatial == 3 and any(size < k for size, k in zip(sizes, kernel, strict=True)):
        return  # avg_pool3d rejects inputs smaller than the kernel, padding or not.
    avg_axes = [WindowAxis(k, s, p, 1, ceil_mode) for k, s, p, _ in windows]
    try:
        avg_layouts = [plan_axis(axis, None) for axis in avg_axes]
    except ValueError:
        return
    old = _avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad)
    new = _spd_avg_pool(x, kernel, avg_layouts, avg_axes, count_include_pad, None, order)
    _assert_close(new, old, "avg pool")
