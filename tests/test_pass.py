"""The core pass on small models of our own: one per op kind, form and awkward shape."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import spd_rewrite
from spd_rewrite import SPDConv, SPDMaxPool
from spd_rewrite.rules import parse_rule_set

EXACT_RTOL = 1e-4


def _rewrite(model, x, **kwargs):
    torch.manual_seed(0)
    return spd_rewrite.rewrite(model.eval(), x, **kwargs)


def _assert_close(reference: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.shape == reference.shape
    bound = EXACT_RTOL * reference.abs().max().item()
    assert (actual - reference).abs().max().item() <= bound


class StridedConv(nn.Module):
    def __init__(self, dims: int = 2, groups: int = 1, stride: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(8, 8, 3, stride=stride, padding=1, groups=groups)
        self.head = conv(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class FunctionalOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, stride=2, padding=1)
        x = F.max_pool2d(x, 3, 2, 1)
        x = F.avg_pool2d(x, 2)
        return torch.max_pool2d(x, 2, 2)


class Untraceable(nn.Module):
    """Branches on a tensor value, so torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.down(x)
        return self.down(-x)


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = Untraceable()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.block(self.stem(x))).flatten(1)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_strided_conv_each_dimension(dims):
    x = torch.randn(1, 8, *([9] * dims))
    model = StridedConv(dims)
    result = _rewrite(model, x, transfer="exact")

    assert result.report.totals.replaced == 1
    assert result.report.totals.downsampling_left == 0
    assert isinstance(result.model.get_submodule("conv"), SPDConv)
    _assert_close(model(x), result.model(x))


def test_depthwise_conv_stays_depthwise():
    x = torch.randn(2, 8, 15, 16)
    model = StridedConv(groups=8)
    result = _rewrite(model, x, transfer="exact")

    conv = result.model.get_submodule("conv").conv
    assert conv.groups == 8
    assert conv.in_channels == 32
    assert conv.weight.shape == (8, 4, 3, 3)
    _assert_close(model(x), result.model(x))


@pytest.mark.parametrize("size", [7, 8, 9, 31])
def test_odd_sizes_keep_output_shape(size):
    x = torch.randn(1, 3, size, size + 2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),  # padding 0: output is not input // 2
        nn.MaxPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
    )
    expected = model.eval()(x).shape
    result = _rewrite(model, x)

    assert result.model(x).shape == expected
    assert result.report.totals.downsampling_left == 0
    assert result.report.totals.replaced == 3


def test_functional_ops_are_replaced_exactly_with_spd_max():
    rules = parse_rule_set(
        """
        name = "exact-pools"
        [[rule]]
        name = "max"
        op = ["max_pool"]
        action = "spd-max"
        [[rule]]
        name = "rest"
        kernel = "compact"
        """
    )
    x = torch.randn(1, 3, 33, 30)
    model = FunctionalOps()
    result = _rewrite(model, x, rules=rules, transfer="exact")

    names = [layer.name for layer in result.report.layers]
    assert names == ["conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_1"]
    assert result.report.totals.downsampling_left == 0
    assert all(layer.transfer == "exact" for layer in result.report.layers)
    _assert_close(model(x), result.model(x))
    # The functional conv's parameters moved into the block.
    assert "weight" not in dict(result.model.named_parameters())


def test_max_pool_spd_conv_is_reported_approximate():
    x = torch.randn(1, 4, 16, 16)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.MaxPool2d(2))
    result = _rewrite(model, x, transfer="exact")

    layer = result.report.layers[0]
    assert layer.name == "1"
    assert layer.transfer == "approximate"
    assert layer.max_abs_error is not None and layer.max_abs_error > 0


def test_untraceable_submodule_becomes_leaf_and_is_rewritten_inside():
    x = torch.randn(1, 3, 32, 32)
    model = WithUntraceable()
    result = _rewrite(model, x, transfer="exact")

    leaves = result.report.leaves
    assert [leaf.name for leaf in leaves] == ["block"]
    assert "untraceable" in leaves[0].reason
    assert {layer.name for layer in result.report.layers} == {"stem", "block.down"}
    assert isinstance(result.model.get_submodule("block.down"), SPDConv)
    assert result.report.totals.downsampling_left == 0
    _assert_close(model(x), result.model(x))


def test_graph_is_linted_and_original_untouched():
    model = StridedConv()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _rewrite(model, torch.randn(1, 8, 16, 16))

    assert isinstance(result.model, fx.GraphModule)
    result.model.graph.lint()
    assert isinstance(model.conv, nn.Conv2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_second_run_replaces_nothing():
    x = torch.randn(1, 8, 16, 16)
    first = _rewrite(StridedConv(), x)
    second = _rewrite(first.model, x)

    assert second.report.totals.replaced == 0
    assert second.report.totals.downsampling_left == 0
    torch.testing.assert_close(second.model(x), first.model(x))


def test_modules_mode_keeps_class_and_attributes():
    model = StridedConv()
    model.custom_flag = "kept"
    x = torch.randn(1, 8, 16, 16)
    result = _rewrite(model, x, mode="modules", transfer="exact")

    assert type(result.model) is StridedConv
    assert result.model.custom_flag == "kept"
    assert isinstance(result.model.conv, SPDConv)
    _assert_close(model(x), result.model(x))


def test_global_pools_are_never_matched():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(x).flatten(1) + x.mean([2, 3]) + F.adaptive_max_pool2d(x, 1).flatten(1)

    result = _rewrite(Head(), torch.randn(1, 4, 8, 8))

    assert result.report.totals.replaced == 0
    reasons = {skip.name: skip.reason for skip in result.report.skips}
    assert reasons["pool"] == "global pooling is never a match"
    assert reasons["mean"] == "global pooling is never a match"


def test_remove_action_drops_pool_and_allows_shape_change():
    rules = parse_rule_set(
        """
        [[rule]]
        name = "drop-pools"
        op = ["max_pool"]
        action = "remove"
        """
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
    x = torch.randn(1, 3, 8, 8)
    result = _rewrite(model, x, rules=rules)

    assert result.report.layers[0].action == "remove"
    assert result.model(x).shape == (1, 4, 8, 8)
    assert result.report.output_shapes_after == (1, 4, 8, 8)


def test_keep_and_include_exclude_globs():
    rules = parse_rule_set(
        """
        [[rule]]
        name = "keep-stem"
        include = ["0"]
        action = "keep"
        [[rule]]
        name = "rest"
        """
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
    result = _rewrite(model, torch.randn(1, 3, 16, 16), rules=rules)

    assert [layer.name for layer in result.report.layers] == ["1"]
    assert result.report.totals.downsampling_left == 1
    kept = [skip for skip in result.report.skips if skip.downsampling]
    assert kept[0].name == "0"
    assert kept[0].reason == "rule 'keep-stem' keeps it"


def test_first_n_downsampling_steps():
    rules = parse_rule_set("[[rule]]\nname = 'first-two'\nfirst = 2\n")
    model = nn.Sequential(*[nn.Conv2d(2, 2, 3, 2, 1) for _ in range(3)])
    result = _rewrite(model, torch.randn(1, 2, 32, 32), rules=rules)

    assert [layer.name for layer in result.report.layers] == ["0", "1"]
    assert result.report.totals.downsampling_left == 1


def test_module_called_twice_is_replaced_once():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(3, 3, 3, 2, 1)

        def forward(self, x):
            return self.down(self.down(x))

    model = Twice()
    x = torch.randn(1, 3, 16, 16)
    result = _rewrite(model, x, transfer="exact")

    assert len(result.report.layers) == 2
    calls = [n for n in result.model.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["down", "down"]
    _assert_close(model(x), result.model(x))


def test_residual_add_with_strided_shortcut():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branch = nn.Conv2d(4, 8, 3, 2, 1)
            self.shortcut = nn.Conv2d(4, 8, 1, 2)

        def forward(self, x):
            return operator.add(self.branch(x), self.shortcut(x))

    model = Block()
    x = torch.randn(1, 4, 17, 17)
    result = _rewrite(model, x, transfer="exact")

    assert result.report.totals.replaced == 2
    _assert_close(model(x), result.model(x))


def test_spd_max_exact_in_modules_mode():
    rules = parse_rule_set("[[rule]]\nname = 'max'\nop = ['max_pool']\naction = 'spd-max'\n")
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=False))
    x = torch.randn(1, 2, 13, 11)
    result = _rewrite(model, x, rules=rules, mode="modules")

    assert isinstance(result.model[0], SPDMaxPool)
    torch.testing.assert_close(result.model(x), model(x))


def test_verification_rejects_wrong_channel_input():
    model = StridedConv()
    with pytest.raises(spd_rewrite.ModelForwardError, match=r"input of shape \(1, 3, 16, 16\)"):
        _rewrite(model, torch.randn(1, 3, 16, 16))


def test_report_dict_has_issue_fields():
    result = _rewrite(StridedConv(), torch.randn(1, 8, 16, 16))
    data = result.report.to_dict()

    layer = data["layers"][0]
    for key in ("name", "op", "action", "in_shape", "out_shape", "params_before", "params_after"):
        assert key in layer
    assert layer["in_shape"] == [1, 8, 16, 16]
    assert layer["out_shape"] == [1, 8, 8, 8]
    assert layer["params_before"] == 8 * 8 * 9 + 8
    assert layer["params_after"] == 8 * 32 * 9 + 8
    totals = data["totals"]
    assert totals["replaced"] == 1
    assert totals["downsampling_left"] == 0
    assert totals["params_after"] - totals["params_before"] == 8 * 24 * 9
