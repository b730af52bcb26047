"""SPD versions of the bundled targets, as the pass produces them."""

from __future__ import annotations

import pytest
import torch

import spd_rewrite
from spd_rewrite.targets import build_target, get_target
from spd_rewrite.targets.summary import downsampling_modules
from spd_rewrite.targets.yolov5 import compute_strides, find_detect

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
YOLOS = ["yolov5n", "yolov5s", "yolov5m", "yolov5l"]


def _outputs_shapes(output):
    if torch.is_tensor(output):
        return tuple(output.shape)
    return [_outputs_shapes(item) for item in output]


@pytest.mark.parametrize(
    ("baseline", "size", "classes"),
    [(name, 224, 1000) for name in RESNETS] + [(f"{name}-lowres", 32, 10) for name in RESNETS],
)
def test_resnet_spd_leaves_no_downsampling(baseline, size, classes):
    torch.manual_seed(0)
    spd = build_target(f"{baseline}-spd").eval()

    assert downsampling_modules(spd) == 0
    assert downsampling_modules(build_target(baseline)) > 0
    if baseline in ("resnet18", "resnet50", "resnet18-lowres", "resnet50-lowres"):
        with torch.no_grad():
            assert spd(torch.randn(1, 3, size, size)).shape == (1, classes)


def test_lowres_resnet_spd_runs_at_64():
    spd = build_target("resnet18-lowres-spd").eval()
    with torch.no_grad():
        assert spd(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("variant", YOLOS)
def test_yolov5_spd_builds_without_downsampling(variant):
    torch.manual_seed(0)
    spd = build_target(f"{variant}-spd").eval()
    assert get_target(f"{variant}-spd").input_size == 640
    assert downsampling_modules(spd) == 0
    assert find_detect(spd).stride.tolist() == [8.0, 16.0, 32.0]


def test_yolov5n_spd_runs_at_640():
    torch.manual_seed(0)
    spd = build_target("yolov5n-spd").eval()
    x = torch.randn(1, 3, 640, 640)
    with torch.no_grad():
        decoded, raw = spd(x)
    assert decoded.shape == (1, 25200, 85)
    assert _outputs_shapes(raw) == [(1, 3, 80, 80, 85), (1, 3, 40, 40, 85), (1, 3, 20, 20, 85)]


def test_yolov5_detect_outputs_survive_exact_rewrite():
    torch.manual_seed(0)
    base = build_target("yolov5n", num_classes=3).eval()
    x = torch.randn(2, 3, 96, 128)
    result = spd_rewrite.rewrite(base, x, transfer="exact")
    spd = result.model
    compute_strides(spd)

    assert [leaf.module_type for leaf in result.report.leaves] == ["Detect"]
    assert find_detect(spd).stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        decoded, raw = spd(x)
        decoded_base, raw_base = base(x)
    bound = 1e-4 * decoded_base.abs().max().item()
    assert (decoded - decoded_base).abs().max().item() <= bound

    # Training mode: raw maps with batch statistics, the same in both.
    spd.train()
    base.train()
    with torch.no_grad():
        maps = spd(x)
        maps_base = base(x)
    assert isinstance(maps, list) and len(maps) == 3
    for got, expected in zip(maps, maps_base, strict=True):
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_unknown_spd_target_name():
    with pytest.raises(spd_rewrite.ModelSpecError, match=r"unknown target 'resnet18-spdd'"):
        build_target("resnet18-spdd")
