"""Conv-first layout: channel propagation through graph topologies, and the `reference` rule set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import spd_rewrite
from spd_rewrite.errors import ChannelPropagationError
from spd_rewrite.graph.channel_edits import Segment, merge_segments
from spd_rewrite.ops.blocks import ConvSPD, SPDConv
from spd_rewrite.rules.loader import parse_rule_set
from spd_rewrite.targets import build_target

RTOL = 1e-5


def conv_first_rules(
    fallback: str = "refuse", channel_order: str = "unshuffle", exclude: tuple[str, ...] = ()
):
    excluded = ", ".join(f'"{name}"' for name in exclude)
    return parse_rule_set(
        f"""
        name = "conv-first-test"
        channel_order = "{channel_order}"

        [[rule]]
        name = "strided"
        op = ["conv"]
        exclude = [{excluded}]
        order = "conv-first"
        fallback = "{fallback}"
        """,
        source="test.toml",
    )


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters, then set eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                module.weight.normal_(generator=generator)
                module.bias.normal_(generator=generator)
    return model.eval()


def assert_same_function(original: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = original(x)
        actual = rewritten(x)
    if torch.is_tensor(expected):
        expected, actual = (expected,), (actual,)
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape
        error = (got - want).abs().max().item()
        assert error <= RTOL * want.abs().max().item()


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("size", [32, 33, 31])
def test_chain_conv_first_exact(size):
    model = randomize_norms(Chain())
    x = torch.randn(1, 16, size, size)

    result = spd_rewrite.rewrite(model, x, conv_first_rules(), transfer="exact")
    gm = result.model
    gm.graph.lint()

    assert isinstance(gm.conv1, ConvSPD)
    assert gm.conv1.conv.stride == (1, 1)
    assert gm.conv1.conv.in_channels == 16
    assert gm.conv1.conv.out_channels == 32
    assert gm.conv1.spd.scale == (2, 2)
    assert gm.bn1.num_features == 128
    assert gm.conv2.in_channels == 128
    assert gm.conv2.out_channels == 64
    with torch.no_grad():
        assert gm(x).shape == (1, 64, (size + 1) // 2, (size + 1) // 2)
    assert_same_function(model, gm, x)
    assert result.report.channel_edits == ("conv1.out -> bn1 -> relu -> conv2.in",)


def test_chain_fresh_transfer_widens_shapes():
    model = Chain().eval()
    x = torch.randn(1, 16, 32, 32)
    gm = spd_rewrite.rewrite(model, x, conv_first_rules(), transfer="fresh").model
    assert gm.conv2.weight.shape == (64, 128, 3, 3)
    # Fresh weights read every phase, not only phase 0.
    assert gm.conv2.weight[:, 1::4].abs().sum() > 0


def test_chain_reference_order_exact():
    model = randomize_norms(Chain())
    x = torch.randn(2, 16, 30, 30)
    gm = spd_rewrite.rewrite(
        model, x, conv_first_rules(channel_order="reference"), transfer="exact"
    ).model
    assert gm.conv1.spd.order == "reference"
    assert_same_function(model, gm, x)


class Residual(nn.Module):
    """A block whose widened branch meets a strided shortcut before any conv absorbs it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.short = nn.Conv2d(8, 16, 1, stride=2)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.short(x))


def test_residual_add_refused_names_node():
    with pytest.raises(ChannelPropagationError, match=r"node 'add'.*residual") as caught:
        spd_rewrite.rewrite(
            Residual().eval(), torch.randn(1, 8, 16, 16), conv_first_rules(exclude=("short",))
        )
    message = str(caught.value)
    assert "conv-first block 'conv'" in message
    assert 'fallback = "spd-first"' in message
    assert "rule 'strided' (test.toml:" in message


def test_residual_add_falls_back_to_spd_first():
    model = randomize_norms(Residual())
    x = torch.randn(1, 8, 16, 16)
    rules = conv_first_rules(fallback="spd-first", exclude=("short",))

    result = spd_rewrite.rewrite(model, x, rules, transfer="exact")

    assert isinstance(result.model.conv, SPDConv)
    assert result.model.bn.num_features == 16
    assert result.report.channel_edits == ()
    assert len(result.report.warnings) == 1
    assert "conv: rule 'strided' fell back to SPD-first" in result.report.warnings[0]
    assert "node 'add'" in result.report.warnings[0]
    assert result.report.layers[0].replacement.startswith("SPD(2)")
    assert_same_function(model, result.model, x)


# Topologies for the table below. Each takes (N, 8, H, W).


class ResidualAbsorbed(nn.Module):
    """ResNet's BasicBlock: the branch's second conv absorbs the widening before the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.short = nn.Conv2d(8, 16, 1, stride=2, bias=False)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.short(x))


class ConcatBothWide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 10, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x) * 0.5], dim=1)
        return self.head(F.silu(self.bn(y)))


class ConcatOneWide(nn.Module):
    """The widened tensor is the second input, so its channels start after the first's."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 10, 1, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.bn(torch.cat((self.short(x), F.hardswish(self.wide(x))), 1)))


class CalledTwice(nn.Module):
    """One strided conv and one batch norm, each called on two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        first = self.bn(self.down(x))
        second = self.bn(self.down(x.flip(-1)))
        return self.head(torch.cat([first, second], 1))


class CalledWithBothWidths(nn.Module):
    """A conv that reads a widened tensor at one call and an original one at the other."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.wide(x)) + self.head(self.short(x))


class DepthwiseConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(F.relu6(self.bn(self.conv(x)))))


class PoolLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.gelu(self.bn(self.conv(x)))), 1))


class MeanViewLinear(nn.Module):
    """Global pooling with a mean, then the ``view(size(0), -1)`` flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.conv(x).mean((2, 3), keepdim=True)
        return self.fc(y.view(y.size(0), -1))


class FlattenLinear(nn.Module):
    """Flatten with spatial positions left: each channel feeds 4 x 4 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class FixedReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(1, 64))


class BranchToOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features = F.relu(self.conv(x))
        return self.head(features), features


class ChannelSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        left, right = torch.chunk(self.conv(x), 2, dim=1)
        return self.head(left) + self.head(right)


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.roll(self.conv(x), 1, dims=2))


def small_chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1)
    )


# (model, excluded names, expected channel edits) for topologies that propagate.
PROPAGATING = {
    "chain": (small_chain, (), ["0.out -> 1 -> 2 -> 3.in"]),
    "residual absorbed": (
        ResidualAbsorbed,
        ("short",),
        ["conv1.out -> bn1 -> relu -> conv2.in"],
    ),
    "concat both widened": (
        ConcatBothWide,
        (),
        ["a.out -> cat[0:24 of 64] -> bn -> silu -> head.in"],
    ),
    "concat one widened": (
        ConcatOneWide,
        ("short",),
        ["wide.out -> hardswish -> cat[10:34 of 34] -> bn -> head.in"],
    ),
    "module called twice": (CalledTwice, (), ["down.out -> bn -> cat[0:32 of 64] -> head.in"]),
    "depthwise consumer": (
        DepthwiseConsumer,
        (),
        ["conv.out -> bn -> relu6 -> depthwise.in"],
    ),
    "pooling before linear": (
        PoolLinear,
        (),
        ["conv.out -> bn -> gelu -> pool -> flatten -> fc.in"],
    ),
    "mean and view before linear": (MeanViewLinear, (), ["conv.out -> mean -> view -> fc.in"]),
    "flatten into linear": (FlattenLinear, (), ["conv.out -> relu -> flatten -> fc.in"]),
}


@pytest.mark.parametrize("topology", list(PROPAGATING))
def test_topology_propagates_exactly(topology):
    model_class, excluded, edits = PROPAGATING[topology]
    model = randomize_norms(model_class())
    x = torch.randn(1, 8, 8, 8)

    result = spd_rewrite.rewrite(model, x, conv_first_rules(exclude=excluded), transfer="exact")

    result.model.graph.lint()
    assert list(result.report.channel_edits) == edits
    assert result.report.warnings == ()
    assert_same_function(model, result.model, x)


# (model, excluded names, node named in the message, part of the reason) for topologies that stop.
STOPPING = {
    "residual add": (Residual, ("short",), "add", "residual connection"),
    "module called with both widths": (
        CalledWithBothWidths,
        ("short",),
        "head_1",
        "called here with its original channels",
    ),
    "fixed reshape": (FixedReshape, (), "reshape", "fixed size"),
    "branch to output": (BranchToOutput, (), "output", "reaches the model's output"),
    "channel split": (ChannelSplit, (), "chunk", "splits the widened tensor"),
    "unknown op": (UnknownOp, (), "roll", "does not know this op"),
}


@pytest.mark.parametrize("topology", list(STOPPING))
def test_topology_stops_with_reason(topology):
    model_class, excluded, node, reason = STOPPING[topology]
    model = model_class().eval()
    x = torch.randn(1, 8, 8, 8)

    with pytest.raises(ChannelPropagationError, match=f"node '{node}'") as caught:
        spd_rewrite.rewrite(model, x, conv_first_rules(exclude=excluded))
    assert reason in str(caught.value)

    fallback = conv_first_rules(fallback="spd-first", exclude=excluded)
    result = spd_rewrite.rewrite(model, x, fallback, transfer="exact")
    assert f"node '{node}'" in result.report.warnings[0]
    assert result.report.channel_edits == ()
    assert_same_function(model, result.model, x)


def test_depthwise_consumer_reference_order_stops():
    with pytest.raises(ChannelPropagationError, match="node 'depthwise'.*groups=16"):
        spd_rewrite.rewrite(
            DepthwiseConsumer().eval(),
            torch.randn(1, 8, 8, 8),
            conv_first_rules(channel_order="reference"),
            transfer="exact",
        )


def test_groupnorm_consumer_is_approximate():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)
    ).eval()
    result = spd_rewrite.rewrite(
        model, torch.randn(1, 8, 8, 8), conv_first_rules(), transfer="exact"
    )
    assert result.model.get_submodule("1").num_channels == 64
    assert result.report.layers[0].transfer == "approximate"
    assert result.report.channel_edits == ("0.out -> 1 -> 2.in",)


def test_merge_segments_joins_original_runs():
    layout = (Segment(3, 1, "reference"), Segment(2, 1, "unshuffle"), Segment(4, 4, "reference"))
    assert merge_segments(layout) == (Segment(5, 1, "unshuffle"), Segment(4, 4, "reference"))


# The reference rule set on the bundled targets.

# Exact counts at 80 classes. NOTE: the released YOLOv5-SPD models are quoted at 2.26M, 8.77M,
# 24.6M and 52.7M parameters (not checked against the released checkpoints here). These counts
# round to 2.26M, 8.78M, 24.7M and 52.7M; with each BatchNorm folded into its conv (YOLOv5 counts
# that way after fusing: num_features fewer per BatchNorm) they round to 2.25M, 8.77M, 24.6M and
# 52.7M. The Focus stem (SPD, then a 3x3 conv on 12 channels) has as many weights as the 6x6 stem.
YOLOV5_SPD_PARAMS = {"n": 2_260_189, "s": 8_779_453, "m": 24_658_653, "l": 52_723_837}
YOLOV5_SPD_FUSED_PARAMS = {"n": 2_253_421, "s": 8_765_917, "m": 24_634_221, "l": 52_685_757}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "variant",
    [
        "n",
        "s",
        pytest.param("m", marks=pytest.mark.slow),
        pytest.param("l", marks=pytest.mark.slow),
    ],
)
def test_yolov5_reference_parameter_counts(variant):
    baseline = build_target(f"yolov5{variant}")
    result = spd_rewrite.rewrite(baseline, torch.randn(1, 3, 64, 64), "reference")
    model = result.model

    batchnorm_features = sum(
        m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert count_parameters(model) == YOLOV5_SPD_PARAMS[variant]
    assert count_parameters(model) - batchnorm_features == YOLOV5_SPD_FUSED_PARAMS[variant]
    rules = {layer.name: layer.rule for layer in result.report.layers}
    assert rules["model.0.conv"] == "yolov5-stem"
    assert isinstance(model.get_submodule("model.0.conv"), SPDConv)
    assert model.get_submodule("model.0.conv").conv.kernel_size == (3, 3)
    conv_first = [name for name, rule in rules.items() if rule == "strided-conv"]
    assert conv_first == [f"model.{i}.conv" for i in (1, 3, 5, 7, 18, 21)]
    # Each conv-first block feeds both input convs of the C3 block after it.
    assert len(result.report.channel_edits) == 12
    assert result.report.warnings == ()


def test_resnet50_lowres_reference_adds_widened_weights():
    baseline = build_target("resnet50-lowres", num_classes=10)
    result = spd_rewrite.rewrite(baseline, torch.randn(1, 3, 32, 32), "reference")

    # Per strided block of width w: BatchNorm 4w (2*3w more) and a 1x1 conv reading 4w (12w^2 more).
    assert count_parameters(result.model) - count_parameters(baseline) == 4_134_144
    assert result.report.channel_edits == tuple(
        f"layer{i}.0.conv2.out -> layer{i}.0.bn2 -> layer{i}.0.relu -> layer{i}.0.conv3.in"
        for i in (2, 3, 4)
    )
    kept = {skip.name for skip in result.report.skips if skip.downsampling}
    assert kept == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}


def test_resnet18_imagenet_reference_exact():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = spd_rewrite.rewrite(model, x, "reference", transfer="exact")

    rules = {layer.name: layer.rule for layer in result.report.layers}
    assert rules == {
        "conv1": "imagenet-stem",
        "maxpool": "strided-pool",
        "layer2.0.conv1": "strided-conv",
        "layer3.0.conv1": "strided-conv",
        "layer4.0.conv1": "strided-conv",
    }
    assert result.model.get_submodule("layer2.0.bn1").num_features == 512
    assert result.model.get_submodule("layer2.0.conv2").in_channels == 512
    assert "layer2.0.conv1.out -> layer2.0.bn1 -> layer2.0.relu -> layer2.0.conv2.in" in (
        result.report.channel_edits
    )
