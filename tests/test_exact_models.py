"""Exact transfer on real torchvision models: the rewritten model computes the original function."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import spd_rewrite
from spd_rewrite.job import RewriteJob, run_job

EXACT_RTOL = 1e-4

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
    "googlenet",
]
# Each model at 224 through the Python API, and at an odd size through a weights file below.
CASES = [(name, 224) for name in MODELS]


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


@pytest.mark.parametrize(("name", "size"), CASES)
def test_exact_rules_reproduce_outputs(name, size):
    model = _build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    result = spd_rewrite.rewrite(model, x, rules="exact", transfer="exact")

    totals = result.report.totals
    assert totals.downsampling_left == 0
    assert totals.replaced > 0
    assert all(layer.transfer == "exact" for layer in result.report.layers)
    # A second input, not the one the pass verified on.
    other = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(other)
        actual = result.model(other)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= EXACT_RTOL * expected.abs().max().item()
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert totals.max_abs_error is not None
    assert totals.max_abs_error <= EXACT_RTOL * scale


def test_compact_kernel_is_exact_and_cheaper():
    model = _build("resnet18")
    x = torch.randn(1, 3, 64, 64)
    rules = spd_rewrite.rules.parse_rule_set(
        "[[rule]]\nname = 'max'\nop = ['max_pool']\naction = 'spd-max'\n"
        "[[rule]]\nname = 'compact'\nkernel = 'compact'\n"
    )
    compact = spd_rewrite.rewrite(model, x, rules=rules, transfer="exact")
    same = spd_rewrite.rewrite(model, x, rules="exact", transfer="exact")

    layer = next(item for item in compact.report.layers if item.name == "layer2.0.conv1")
    assert "k2" in layer.replacement
    assert layer.flops_after * 9 == layer.flops_before * 16
    assert compact.report.totals.flops_after < same.report.totals.flops_after
    with torch.no_grad():
        expected = model(x)
        actual = compact.model(x)
    assert (actual - expected).abs().max().item() <= EXACT_RTOL * expected.abs().max().item()


@pytest.mark.parametrize("name", MODELS)
def test_weights_file_round_trip_keeps_exactness(tmp_path, name):
    model = _build(name)
    # Non-default BatchNorm statistics, so that passing them through is tested.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)

    outcome = run_job(
        RewriteJob(
            model=f"torchvision.models:{name}",
            input_shape="1,3,225,225",
            rules="exact",
            transfer="exact",
            weights=weights,
            out=tmp_path / "out",
        )
    )
    loaded = spd_rewrite.load(tmp_path / "out").eval()
    # Every tensor outside the replaced layers (norms, their statistics, stride-1 convs) passes
    # through unchanged.
    state, original = loaded.state_dict(), model.state_dict()
    common = sorted(set(state) & set(original))
    assert len(common) > len(original) // 2
    for key in common:
        assert torch.equal(state[key], original[key]), key

    x = torch.randn(1, 3, 225, 225, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        actual = loaded(x)
    assert (actual - expected).abs().max().item() <= EXACT_RTOL * expected.abs().max().item()
    assert outcome.result.report.totals.downsampling_left == 0
