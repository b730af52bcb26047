"""Tests of the bundled targets: ResNet, YOLOv5 v6.0 and the registry. Baselines only."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.fx
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spd_rewrite.errors import ModelSpecError
from spd_rewrite.targets import (
    Detect,
    YOLOv5,
    build_target,
    compute_strides,
    find_detect,
    get_target,
    list_targets,
    resnet,
    yolov5,
)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def shared_yolov5(variant: str) -> YOLOv5:
    """A YOLOv5 build shared by tests that only read it."""
    return yolov5(variant)


class DetectLeafTracer(torch.fx.Tracer):
    """Trace everything except Detect, the way the pass treats the detection head."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Detect) or super().is_leaf_module(module, qualified_name)


def trace_with_detect_leaf(model: nn.Module) -> torch.fx.GraphModule:
    graph = DetectLeafTracer().trace(model)
    graph.lint()
    return torch.fx.GraphModule(model, graph)


# ResNet


@pytest.mark.parametrize(
    ("depth", "stem", "num_classes", "expected"),
    [
        (18, "imagenet", 1000, 11_689_512),
        (50, "imagenet", 1000, 25_557_032),
        (18, "lowres", 10, 11_173_962),
        (50, "lowres", 10, 23_520_842),
    ],
)
def test_resnet_parameter_count(depth, stem, num_classes, expected):
    model = resnet(depth, stem=stem, num_classes=num_classes)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_matches_torchvision_state_dict(depth):
    ours = resnet(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    assert count_parameters(ours) == count_parameters(reference)

    ours_shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    reference_shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert ours_shapes == reference_shapes


def test_resnet18_forward_matches_torchvision():
    ours = resnet(18).eval()
    reference = torchvision.models.resnet18(weights=None).eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = ours(x)
        expected = reference(x)
    assert out.shape == (1, 1000)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [32, 64])
def test_resnet_lowres_forward_shape(size):
    model = resnet(18, stem="lowres", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)


def test_resnet_lowres_stem_layout():
    model = resnet(50, stem="lowres", num_classes=10)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_resnet_bottleneck_stride_on_3x3_conv():
    block = resnet(50).layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_resnet_custom_classes_and_channels():
    model = resnet(34, stem="lowres", num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32))
    assert model.conv1.in_channels == 1
    assert out.shape == (1, 7)


def test_resnet_invalid_depth_message():
    with pytest.raises(ValueError, match=r"invalid ResNet depth 20; expected one of 18, 34"):
        resnet(20)


def test_resnet_invalid_stem_message():
    with pytest.raises(ValueError, match=r"invalid ResNet stem 'cifar'"):
        resnet(18, stem="cifar")


def test_resnet_traces_with_fx():
    model = resnet(18, stem="lowres", num_classes=10).eval()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


# YOLOv5 model


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("n", 1_872_157), ("s", 7_235_389), ("m", 21_190_557), ("l", 46_563_709)],
)
def test_yolov5_parameter_count(variant, expected):
    assert count_parameters(shared_yolov5(variant)) == expected


# GFLOPs at 640x640 that YOLOv5 v6.0 prints in its model summaries.
@pytest.mark.parametrize(
    ("variant", "published_gflops"), [("n", 4.5), ("s", 16.5), ("m", 49.0), ("l", 109.1)]
)
def test_yolov5_gflops_at_640(variant, published_gflops):
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate of convs and matmuls only. YOLOv5's
    # model summary prints 2 * thop's MAC count, which also covers some other layers, so the
    # test allows 1%. Meta tensors make the forward shape-only.
    model = yolov5(variant).to("meta").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 640, 640, device="meta"))
    gflops = counter.get_total_flops() / 1e9
    assert gflops == pytest.approx(published_gflops, rel=0.01)


@pytest.mark.parametrize(
    ("variant", "stem_channels", "first_c3_bottlenecks"),
    [("n", 16, 1), ("s", 32, 1), ("m", 48, 2), ("l", 64, 3)],
)
def test_yolov5_scales_width_and_depth(variant, stem_channels, first_c3_bottlenecks):
    model = shared_yolov5(variant)
    assert model.model[0].conv.out_channels == stem_channels
    assert model.model[0].conv.kernel_size == (6, 6)
    assert len(model.model[2].m) == first_c3_bottlenecks


def test_yolov5_batchnorm_settings():
    model = shared_yolov5("n")
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(norms) > 0
    assert all(norm.eps == 1e-3 for norm in norms)
    assert all(norm.momentum == 0.03 for norm in norms)


def test_yolov5n_eval_forward_at_320():
    model = yolov5("n").eval()
    with torch.no_grad():
        decoded, raw_maps = model(torch.randn(1, 3, 320, 320))
    assert decoded.shape == (1, 3 * (40 * 40 + 20 * 20 + 10 * 10), 85)
    assert [tuple(raw.shape) for raw in raw_maps] == [
        (1, 3, 40, 40, 85),
        (1, 3, 20, 20, 85),
        (1, 3, 10, 10, 85),
    ]


def test_yolov5_training_forward_shapes():
    model = yolov5("n", num_classes=3, in_channels=1).train()
    raw_maps = model(torch.randn(2, 1, 64, 64))
    assert isinstance(raw_maps, list)
    assert [tuple(raw.shape) for raw in raw_maps] == [
        (2, 3, 8, 8, 8),
        (2, 3, 4, 4, 8),
        (2, 3, 2, 2, 8),
    ]


def test_yolov5_strides_and_anchors():
    detect = find_detect(shared_yolov5("s"))
    assert detect.stride.tolist() == [8.0, 16.0, 32.0]
    assert detect.anchors.shape == (3, 3, 2)
    assert detect.anchors[2, 2].tolist() == [373.0, 326.0]


def test_compute_strides_restores_buffers_and_mode():
    model = yolov5("n").eval()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    strides = compute_strides(model, size=128)
    assert strides.tolist() == [8.0, 16.0, 32.0]
    assert not model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_compute_strides_reads_map_sizes():
    # Removing the stem's stride halves every map, so the measured strides must halve too.
    model = yolov5("n")
    model.model[0].conv.stride = (1, 1)
    assert compute_strides(model).tolist() == [4.0, 8.0, 16.0]


def test_find_detect_rejects_model_without_head():
    with pytest.raises(ValueError, match="expected one Detect module in the model, found 0"):
        find_detect(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("training", [True, False])
def test_yolov5_fx_trace_matches_eager(training):
    model = yolov5("n").train(training)
    gm = trace_with_detect_leaf(model).train(training)

    detect_nodes = [node for node in gm.graph.nodes if node.op == "call_module"]
    assert detect_nodes[-1].target == "model.24"
    assert not any(str(node.target).startswith("model.24.") for node in gm.graph.nodes)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        out = gm(x)
    if training:
        expected_maps, out_maps = expected, out
    else:
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
        expected_maps, out_maps = expected[1], out[1]
    assert len(out_maps) == 3
    for got, want in zip(out_maps, expected_maps, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# Detect head on a tiny map


def identity_detect(num_classes: int, anchors: list[list[float]]) -> Detect:
    """A one-level Detect whose 1x1 conv copies its input, so raw values equal the input."""
    na = len(anchors[0]) // 2
    channels = na * (num_classes + 5)
    detect = Detect(num_classes, anchors, [channels])
    with torch.no_grad():
        detect.m[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        detect.m[0].bias.zero_()
        detect.stride.fill_(8.0)
    return detect


def test_detect_training_returns_raw_maps():
    detect = identity_detect(num_classes=1, anchors=[[10, 20, 30, 40]]).train()
    x = torch.randn(1, 12, 2, 3)
    raw_maps = detect([x])
    assert len(raw_maps) == 1
    raw = raw_maps[0]
    assert raw.shape == (1, 2, 2, 3, 6)
    # Channel a*no + k of the conv output is field k of anchor a.
    assert raw[0, 1, 1, 2, 4] == x[0, 1 * 6 + 4, 1, 2]
    assert raw[0, 0, 0, 1, 0] == x[0, 0, 0, 1]


def test_detect_eval_decoding_by_hand():
    detect = identity_detect(num_classes=1, anchors=[[10, 20, 30, 40]]).eval()
    x = torch.randn(1, 12, 2, 3)
    with torch.no_grad():
        decoded, raw_maps = detect([x])
    assert decoded.shape == (1, 2 * 2 * 3, 6)
    assert raw_maps[0].shape == (1, 2, 2, 3, 6)

    def sigmoid(value: torch.Tensor) -> float:
        return 1 / (1 + math.exp(-float(value)))

    anchor_sizes = [(10, 20), (30, 40)]
    stride = 8.0
    ny, nx = 2, 3
    for anchor in range(2):
        for row in range(ny):
            for col in range(nx):
                fields = [x[0, anchor * 6 + k, row, col] for k in range(6)]
                expected = [
                    (sigmoid(fields[0]) * 2 - 0.5 + col) * stride,
                    (sigmoid(fields[1]) * 2 - 0.5 + row) * stride,
                    (sigmoid(fields[2]) * 2) ** 2 * anchor_sizes[anchor][0],
                    (sigmoid(fields[3]) * 2) ** 2 * anchor_sizes[anchor][1],
                    sigmoid(fields[4]),
                    sigmoid(fields[5]),
                ]
                # Decoded rows run anchor-major, then row, then column.
                index = anchor * ny * nx + row * nx + col
                got = decoded[0, index].tolist()
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-5), (anchor, row, col)


def test_detect_rebuilds_grid_for_each_size():
    detect = identity_detect(num_classes=1, anchors=[[10, 20, 30, 40]]).eval()
    with torch.no_grad():
        small, _ = detect([torch.zeros(1, 12, 2, 2)])
        large, _ = detect([torch.zeros(1, 12, 4, 5)])
    assert small.shape == (1, 2 * 2 * 2, 6)
    assert large.shape == (1, 2 * 4 * 5, 6)
    # Zero logits put the centre at (0.5 + col, 0.5 + row) * stride. Index 19 is row 3, column 4.
    assert large[0, 19, 0:2].tolist() == [4.5 * 8, 3.5 * 8]


def test_detect_initialize_biases_priors():
    detect = Detect(80, [[10, 13, 16, 30, 33, 23]], [16])
    detect.stride.fill_(8.0)
    before = detect.m[0].bias.detach().clone().view(3, 85)
    detect.initialize_biases()
    after = detect.m[0].bias.detach().view(3, 85)
    delta = after - before
    assert delta[:, 4].tolist() == pytest.approx([math.log(8 / 80**2)] * 3, rel=1e-5)
    assert delta[:, 5].tolist() == pytest.approx([math.log(0.6 / 79.01)] * 3, rel=1e-5)
    assert delta[:, 0:4].abs().max().item() == 0.0


def test_detect_initialize_biases_needs_stride():
    detect = Detect(80, [[10, 13, 16, 30, 33, 23]], [16])
    with pytest.raises(ValueError, match="Detect.stride is not set; call compute_strides first"):
        detect.initialize_biases()


# Registry

BASELINE_NAMES = [
    *(f"resnet{depth}" for depth in (18, 34, 50, 101, 152)),
    *(f"resnet{depth}-lowres" for depth in (18, 34, 50, 101, 152)),
    *(f"yolov5{variant}" for variant in "nsml"),
]


def test_list_targets_names():
    names = [info.name for info in list_targets()]
    expected = []
    for baseline in BASELINE_NAMES:
        expected += [baseline, f"{baseline}-spd", f"{baseline}-spd-reference"]
    assert names == expected


@pytest.mark.parametrize(
    ("name", "task", "input_size", "num_classes", "baseline", "rules"),
    [
        ("resnet50", "classification", 224, 1000, "resnet50", None),
        ("resnet18-lowres", "classification", 32, 10, "resnet18-lowres", None),
        ("yolov5s", "detection", 640, 80, "yolov5s", None),
        ("yolov5s-spd", "detection", 640, 80, "yolov5s", "paper"),
        ("resnet18-lowres-spd-reference", "classification", 32, 10, "resnet18-lowres", "reference"),
    ],
)
def test_get_target_metadata(name, task, input_size, num_classes, baseline, rules):
    info = get_target(name)
    assert info.name == name
    assert info.task == task
    assert info.input_size == input_size
    assert info.num_classes == num_classes
    assert info.baseline == baseline
    assert info.rules == rules
    assert info.input_sizes[0] == input_size
    assert info.description


def test_lowres_targets_accept_64():
    assert get_target("resnet50-lowres").input_sizes == (32, 64)


def test_target_info_is_frozen():
    info = get_target("resnet18")
    with pytest.raises(AttributeError):
        info.name = "resnet19"


def test_get_target_unknown_name_message():
    with pytest.raises(ModelSpecError) as caught:
        get_target("resnet19")
    message = str(caught.value)
    assert "\n" not in message
    assert "unknown target 'resnet19'" in message
    assert "resnet18" in message
    assert "`spd-rewrite targets` lists all target names" in message


def test_get_target_unknown_without_match():
    with pytest.raises(ModelSpecError, match=r"unknown target 'alexnet'; `spd-rewrite targets`"):
        get_target("alexnet")


def test_build_target_unknown_name_raises():
    with pytest.raises(ModelSpecError, match=r"did you mean yolov5s"):
        build_target("yolo5s")


def test_build_target_defaults():
    classifier = build_target("resnet18-lowres")
    detector = build_target("yolov5n")
    assert isinstance(detector, YOLOv5)
    assert classifier.fc.out_features == 10
    assert find_detect(detector).nc == 80
    assert count_parameters(detector) == 1_872_157


def test_build_target_overrides_classes_and_channels():
    model = build_target("resnet18", num_classes=5, in_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64))
    assert out.shape == (1, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, r"invalid num_classes 0 for target 'yolov5n'; use 1 or more"),
        ({"in_channels": 0}, r"invalid in_channels 0 for target 'yolov5n'; use 1 or more"),
    ],
)
def test_build_target_rejects_invalid_sizes(kwargs, message):
    with pytest.raises(ModelSpecError, match=message):
        build_target("yolov5n", **kwargs)
