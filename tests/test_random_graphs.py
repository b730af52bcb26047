"""Property test: random small CNNs are rewritten with the right shapes or rejected with a reason.

Hypothesis draws 1-d, 2-d and 3-d networks of module and functional convs and pools, residual
adds and channel concats, on odd and even input sizes. The layers draw kernels up to 5 (3 in
3-d), strides up to 3, dilation 1 or 2, and any padding, groups, bias, ceil_mode,
count_include_pad and divisor_override that PyTorch accepts. For each network the pass must
either return a model with the original output shapes, at the example input and at a second
input size, or raise an ``SpdRewriteError`` with a message. With exact transfer and ``spd-max``
for max pools the outputs must also agree within ``1e-4 * max|y|``. Downsampling that is left in
place must be listed in the report's skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import spd_rewrite
from spd_rewrite.errors import SpdRewriteError, VerificationError
from spd_rewrite.rules.loader import parse_rule_set

RELATIVE_BOUND = 1e-4
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)

EXACT_RULES = parse_rule_set(
    """
name = "exact-property"

[[rule]]
name = "max-pools"
op = ["max_pool"]
action = "spd-max"
kernel = "compact"

[[rule]]
name = "convs-and-average-pools"
op = ["conv", "avg_pool"]
action = "spd-conv"
kernel = "compact"
""",
    source="<test_random_graphs>",
)

CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MAX_MODULES = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_MODULES = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX_FUNCTIONS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_FUNCTIONS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(frozen=True)
class Conv:
    functional: bool
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    bias: bool
    out_channels: int


@dataclass(frozen=True)
class MaxPool:
    functional: bool
    kernel: int
    stride: int | None  # None: PyTorch's default, the kernel size
    padding: int
    dilation: int
    ceil_mode: bool


@dataclass(frozen=True)
class AvgPool:
    functional: bool
    kernel: int
    stride: int | None
    padding: int
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None


@dataclass(frozen=True)
class Residual:
    """A strided "same"-padded conv plus a strided 1x1 shortcut conv, added."""

    kernel: int
    stride: int
    dilation: int
    out_channels: int


@dataclass(frozen=True)
class Concat:
    """A strided "same"-padded conv and a strided max pool of the same size, concatenated."""

    kernel: int
    stride: int
    out_channels: int


Layer = Conv | MaxPool | AvgPool | Residual | Concat


class RandomNet(nn.Module):
    """A chain of the drawn layers; functional layers keep their weights as parameters."""

    def __init__(self, dims: int, in_channels: int, layers: list[Layer]) -> None:
        super().__init__()
        self.dims = dims
        self.layers = layers
        self.blocks = nn.ModuleList()
        channels = in_channels
        for layer in layers:
            block, channels = self._build(layer, channels)
            self.blocks.append(block)

    def _build(self, layer: Layer, channels: int) -> tuple[nn.Module, int]:
        dims = self.dims
        if isinstance(layer, Conv):
            conv = CONV_MODULES[dims](
                channels,
                layer.out_channels,
                layer.kernel,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
                layer.bias,
            )
            return conv, layer.out_channels
        if isinstance(layer, MaxPool):
            pool = MAX_MODULES[dims](
                layer.kernel, layer.stride, layer.padding, layer.dilation, ceil_mode=layer.ceil_mode
            )
            return pool, channels
        if isinstance(layer, AvgPool):
            extra = {"divisor_override": layer.divisor_override} if dims > 1 else {}
            pool = AVG_MODULES[dims](
                layer.kernel,
                layer.stride,
                layer.padding,
                layer.ceil_mode,
                layer.count_include_pad,
                **extra,
            )
            return pool, channels
        if isinstance(layer, Residual):
            same = layer.dilation * (layer.kernel - 1) // 2
            main = CONV_MODULES[dims](
                channels, layer.out_channels, layer.kernel, layer.stride, same, layer.dilation
            )
            shortcut = CONV_MODULES[dims](channels, layer.out_channels, 1, layer.stride, bias=False)
            return nn.ModuleDict({"main": main, "shortcut": shortcut}), layer.out_channels
        same = (layer.kernel - 1) // 2
        conv = CONV_MODULES[dims](channels, layer.out_channels, layer.kernel, layer.stride, same)
        pool = MAX_MODULES[dims](layer.kernel, layer.stride, same)
        return nn.ModuleDict({"conv": conv, "pool": pool}), layer.out_channels + channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, block in zip(self.layers, self.blocks, strict=True):
            x = self._apply(layer, block, x)
        return x

    def _apply(self, layer: Layer, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dims = self.dims
        if isinstance(layer, Residual):
            return torch.relu(block["main"](x)) + block["shortcut"](x)
        if isinstance(layer, Concat):
            return torch.cat([block["conv"](x), block["pool"](x)], 1)
        if not layer.functional:
            return block(x)
        if isinstance(layer, Conv):
            return CONV_FUNCTIONS[dims](
                x,
                block.weight,
                block.bias,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
        if isinstance(layer, MaxPool):
            return MAX_FUNCTIONS[dims](
                x, layer.kernel, layer.stride, layer.padding, layer.dilation, layer.ceil_mode
            )
        if dims == 1:
            return F.avg_pool1d(
                x,
                layer.kernel,
                layer.stride,
                layer.padding,
                layer.ceil_mode,
                layer.count_include_pad,
            )
        return AVG_FUNCTIONS[dims](
            x,
            layer.kernel,
            layer.stride,
            layer.padding,
            layer.ceil_mode,
            layer.count_include_pad,
            layer.divisor_override,
        )


@st.composite
def _layer(draw: st.DrawFn, channels: int, dims: int) -> Layer:
    kind = draw(st.sampled_from(["conv", "conv", "max", "avg", "residual", "concat"]))
    max_kernel = 3 if dims == 3 else 5
    stride = draw(st.integers(1, 3))
    if kind == "conv":
        kernel = draw(st.integers(1, max_kernel))
        out_channels = draw(st.integers(1, 6))
        divisors = [g for g in range(1, channels + 1) if math.gcd(channels, out_channels) % g == 0]
        return Conv(
            functional=draw(st.booleans()),
            kernel=kernel,
            stride=stride,
            padding=draw(st.integers(0, kernel)),
            dilation=draw(st.integers(1, 2)),
            groups=draw(st.sampled_from(divisors)),
            bias=draw(st.booleans()),
            out_channels=out_channels,
        )
    if kind == "max":
        kernel = draw(st.integers(1, max_kernel))
        return MaxPool(
            functional=draw(st.booleans()),
            kernel=kernel,
            stride=draw(st.sampled_from([None, stride])),
            padding=draw(st.integers(0, kernel // 2)),
            dilation=draw(st.integers(1, 2)),
            ceil_mode=draw(st.booleans()),
        )
    if kind == "avg":
        kernel = draw(st.integers(1, max_kernel))
        return AvgPool(
            functional=draw(st.booleans()),
            kernel=kernel,
            stride=draw(st.sampled_from([None, stride])),
            padding=draw(st.integers(0, kernel // 2)),
            ceil_mode=draw(st.booleans()),
            count_include_pad=draw(st.booleans()),
            divisor_override=draw(st.sampled_from([None, 3])) if dims > 1 else None,
        )
    kernel = draw(st.sampled_from([1, 3] if dims == 3 else [1, 3, 5]))
    if kind == "residual":
        return Residual(kernel, stride, draw(st.integers(1, 2)), draw(st.integers(1, 6)))
    return Concat(kernel, stride, draw(st.integers(1, 6)))


@st.composite
def random_nets(draw: st.DrawFn) -> tuple[RandomNet, torch.Tensor, torch.Tensor]:
    """Draw a network, an example input and a second input of other sizes."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    in_channels = draw(st.integers(1, 4))
    layers = []
    channels = in_channels
    for _ in range(draw(st.integers(1, 3))):
        layer = draw(_layer(channels, dims))
        layers.append(layer)
        if isinstance(layer, (Conv, Residual)):
            channels = layer.out_channels
        elif isinstance(layer, Concat):
            channels += layer.out_channels

    largest = {1: 40, 2: 24, 3: 12}[dims]
    sizes = [draw(st.integers(5, largest)) for _ in range(dims)]
    other = [size + draw(st.integers(1, 7)) for size in sizes]
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))

    torch.manual_seed(seed)
    model = RandomNet(dims, in_channels, layers).eval()
    x = torch.randn(batch, in_channels, *sizes)
    x_other = torch.randn(batch + 1, in_channels, *other)
    # Keep only networks that PyTorch can run at both sizes (no map shrinks below the kernel).
    assume(_runs(model, x) and _runs(model, x_other))
    return model, x, x_other


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        return False
    return True


def _check_left_is_reported(result: spd_rewrite.RewriteResult) -> None:
    report = result.report
    event(f"replaced {min(report.totals.replaced, 3)}+, left {report.totals.downsampling_left}")
    assert report.totals.downsampling_left == len(report.left)
    skipped = {skip.name: skip for skip in report.skips if skip.downsampling}
    for name in report.left:
        assert name in skipped, f"{name} is left in place but not reported as skipped"
        assert skipped[name].reason


def _relative_error(expected: torch.Tensor, found: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (expected - found).abs().max().item() / max(scale, 1e-12)


@SETTINGS
@given(random_nets())
def test_fresh_rewrite_keeps_shapes(case):
    model, x, x_other = case
    try:
        result = spd_rewrite.rewrite(model, x, rules="paper", transfer="fresh")
    except SpdRewriteError as error:
        event(f"rejected: {type(error).__name__}")
        assert str(error).strip()
        assert not isinstance(error, VerificationError), f"a wrong model was built: {error}"
        return

    _check_left_is_reported(result)
    with torch.no_grad():
        for inputs in (x, x_other):
            assert result.model(inputs).shape == model(inputs).shape


@SETTINGS
@given(random_nets())
def test_exact_rewrite_keeps_values(case):
    model, x, x_other = case
    try:
        result = spd_rewrite.rewrite(model, x, rules=EXACT_RULES, transfer="exact")
    except SpdRewriteError as error:
        event(f"rejected: {type(error).__name__}")
        assert str(error).strip()
        assert not isinstance(error, VerificationError), f"a wrong model was built: {error}"
        return

    _check_left_is_reported(result)
    with torch.no_grad():
        for inputs in (x, x_other):
            expected = model(inputs)
            found = result.model(inputs)
            assert found.shape == expected.shape
            assert _relative_error(expected, found) <= RELATIVE_BOUND


@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_rejection_names_reason(mode: str):
    # A reflect-padded strided conv has no SPD form: it is skipped with the reason.
    model = nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1, padding_mode="reflect")).eval()
    result = spd_rewrite.rewrite(model, torch.randn(1, 2, 9, 9), rules="paper", mode=mode)

    assert result.report.totals.downsampling_left == 1
    (skip,) = [skip for skip in result.report.skips if skip.downsampling]
    assert "padding_mode 'reflect'" in skip.reason
