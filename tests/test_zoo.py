"""torchvision models rewritten with the ``paper`` rules: no downsampling left, same output shape.

The unmarked test covers a spread of architectures at a small input size; the slow test runs
``benchmarks/zoo_sweep.py`` over every classification model and detection/segmentation backbone.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import spd_rewrite

torchvision = pytest.importorskip("torchvision")

SWEEP_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_sweep.py"

# (model, input size): the smallest size near 64 px that the model accepts, 299 for inception_v3.
SMALL_ZOO = [
    ("resnet18", 64),
    ("resnet50", 64),
    ("mobilenet_v3_small", 64),
    ("efficientnet_b0", 64),
    ("vgg11_bn", 64),
    ("densenet121", 64),
    ("regnet_x_400mf", 64),
    ("convnext_tiny", 64),
    ("googlenet", 64),
    ("inception_v3", 299),
]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("zoo_sweep", SWEEP_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("zoo_sweep", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "size"), SMALL_ZOO, ids=[name for name, _ in SMALL_ZOO])
def test_zoo_model_rewrites_fully(name: str, size: int):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init_weights notice
        model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)

    result = spd_rewrite.rewrite(model, x, rules="paper")

    report = result.report
    assert report.totals.downsampling_left == 0, report.left
    assert report.totals.replaced >= 4
    assert report.output_shapes_after == report.output_shapes_before
    with torch.no_grad():
        assert result.model(x).shape == model(x).shape


def test_backbone_rewrites_fully():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None
    )
    backbone = model.backbone.eval()
    x = torch.randn(1, 3, 64, 64)

    result = spd_rewrite.rewrite(backbone, x, rules="paper")

    assert result.report.totals.downsampling_left == 0, result.report.left
    with torch.no_grad():
        expected = backbone(x)
        found = result.model(x)
    assert list(found) == list(expected)  # the same feature-map keys
    for key in expected:
        assert found[key].shape == expected[key].shape


def _sweep_names() -> list[str]:
    sweep = _load_sweep()
    return sweep.classification_names() + sweep.backbone_names()


@pytest.mark.slow
@pytest.mark.parametrize("name", _sweep_names())
def test_sweep_model(name: str):
    sweep = _load_sweep()
    row = sweep.sweep_one(name)
    assert row.status == "ok"
    assert row.downsampling_left == 0
