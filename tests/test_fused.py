"""Tests of the fused execution form of SPDConv blocks: one strided conv on the original input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import spd_rewrite
from spd_rewrite.ops.blocks import SPDConv
from spd_rewrite.ops.fused import FusedSPDConv, fuse_spd_conv, fuse_spd_convs, fusion_records
from spd_rewrite.ops.space_to_depth import SpaceToDepth
from spd_rewrite.targets import build_target

RTOL = 1e-5
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _block(
    dims: int,
    scale: tuple[int, ...],
    channels: int,
    out_channels: int,
    kernel: int,
    padding: int,
    groups: int = 1,
    order: str = "unshuffle",
    pad_before: tuple[int, ...] | None = None,
    block_offset: tuple[int, ...] | None = None,
) -> SPDConv:
    spd = SpaceToDepth(scale, dims, pad_before, block_offset, order=order)
    conv = CONVS[dims](
        channels * math.prod(scale), out_channels, kernel, padding=padding, groups=groups
    )
    return SPDConv(spd, conv).eval()


def _assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    assert error <= RTOL * expected.abs().max().item()


# (dims, scale, kernel, padding, pad_before, block_offset): the layouts the pass builds (same
# kernel, compact kernel, the Focus stem, max-pool-like padding) and odd SPD paddings and crops.
LAYOUTS = [
    (2, (2, 2), 3, 1, None, None),
    (2, (2, 2), 1, 0, None, None),
    (2, (2, 2), 3, 1, (1, 1), (2, 2)),
    (2, (2, 2), 2, 0, (1, 1), (0, 0)),
    (2, (2, 3), 3, 1, (0, 2), (1, 0)),
    (2, (4, 4), 1, 0, None, (0, 0)),
    (2, (2, 2), 3, 0, (3, 3), (-1, -1)),
    (1, (2,), 3, 1, None, None),
    (1, (3,), 2, 1, (1,), (4,)),
    (3, (2, 2, 2), 3, 1, None, None),
    (3, (2, 1, 2), 1, 0, (1, 0, 1), None),
]


@pytest.mark.parametrize("order", ["unshuffle", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}d-{layout[1:4]}")
def test_fused_matches_block_on_odd_sizes(layout, order):
    dims, scale, kernel, padding, pad_before, block_offset = layout
    torch.manual_seed(0)
    block = _block(dims, scale, 3, 5, kernel, padding, 1, order, pad_before, block_offset)
    fused = fuse_spd_conv(block)

    sizes = (9, 10, 11, 12, 13) if dims < 3 else (7, 8, 9)
    checked = 0
    for size in sizes:
        x = torch.randn(2, 3, *[size + axis for axis in range(dims)])
        try:
            expected = block(x)
        except RuntimeError:  # the block's own conv rejects inputs this small
            continue
        _assert_close(expected, fused(x))
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("order", ["unshuffle", "reference"])
@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16])
def test_fused_keeps_groups_exact(groups, order):
    torch.manual_seed(1)
    block = _block(2, (2, 2), 8, 16, 3, 1, groups, order)
    fused = fuse_spd_conv(block)

    for size in (15, 16):
        x = torch.randn(2, 8, size, size + 1)
        _assert_close(block(x), fused(x))


def test_fused_keeps_groups_in_unshuffle_order():
    block = _block(2, (2, 2), 8, 16, 3, 1, groups=4)
    fused = fuse_spd_conv(block)

    assert fused.conv.groups == 4
    assert tuple(fused.conv.kernel_size) == (6, 6)
    assert tuple(fused.conv.stride) == (2, 2)
    assert tuple(fused.conv.padding) == (2, 2)


def test_depthwise_block_fuses_to_depthwise_conv():
    # 8 channels, 32 after SPD, groups=32: each output reads one phase of one input channel.
    block = _block(2, (2, 2), 8, 32, 3, 1, groups=32)
    fused = fuse_spd_conv(block)

    assert fused.conv.groups == 8
    x = torch.randn(1, 8, 14, 14)
    _assert_close(block(x), fused(x))


def test_even_input_needs_no_explicit_pad():
    block = _block(2, (2, 2), 3, 4, 3, 1)
    fused = fuse_spd_conv(block)

    assert fused._axis_padding(0, 64) == ((0, 0), 2)
    # An odd size makes the SPD layer pad one zero at the end, beyond the conv's own padding.
    assert fused._axis_padding(0, 65) == ((0, 1), 2)


def test_fused_matches_yolov5_stem_conv():
    # The Focus block (SPD, then a 3x3 conv) equals a 6x6 stride-2 conv with padding 2.
    torch.manual_seed(2)
    block = _block(2, (2, 2), 3, 16, 3, 1)
    fused = fuse_spd_conv(block)
    x = torch.randn(1, 3, 64, 64)

    stem = nn.Conv2d(3, 16, 6, stride=2, padding=2)
    stem.load_state_dict(fused.conv.state_dict())
    _assert_close(block(x), stem(x))


def test_fuse_bfloat16_block_keeps_dtype():
    block = _block(2, (2, 2), 4, 8, 3, 1).to(torch.bfloat16)
    fused = fuse_spd_conv(block)

    assert fused.conv.weight.dtype == torch.bfloat16
    x = torch.randn(1, 4, 16, 16, dtype=torch.bfloat16)
    error = (fused(x).float() - block(x).float()).abs().max().item()
    assert error <= 0.05 * block(x).float().abs().max().item()


def test_correction_block_is_not_fused():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
    )
    result = spd_rewrite.rewrite(model, torch.randn(1, 3, 16, 16), "paper", transfer="exact")
    block = result.model.get_submodule("1")
    assert block.correction is not None

    with pytest.raises(ValueError, match="average-pool divisor"):
        fuse_spd_conv(block)
    _, records = fusion_records(result.model, force=True)
    assert [(r.name, r.fused) for r in records] == [("1", False)]


def test_fuse_spd_convs_force_on_target():
    model = build_target("resnet18-lowres-spd").eval()
    fused_model, names = fuse_spd_convs(model, force=True)

    assert names == [name for name, m in model.named_modules() if isinstance(m, SPDConv)]
    assert not any(isinstance(m, SPDConv) for m in fused_model.modules())
    assert any(isinstance(m, SPDConv) for m in model.modules())  # the input is not modified
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_close(model(x), fused_model(x))


def test_fuse_spd_convs_measure_records_times():
    model = build_target("resnet18-lowres-spd").eval()
    fused_model, records = fusion_records(model, torch.randn(1, 3, 32, 32), repeats=3)

    assert records
    for record in records:
        assert record.block_seconds is not None and record.block_seconds > 0
        assert record.fused_seconds is not None and record.fused_seconds > 0
        assert isinstance(fused_model.get_submodule(record.name), FusedSPDConv) == record.fused
    # Timing runs under no_grad and must not leave gradients off for the caller.
    assert torch.is_grad_enabled()


def test_fuse_spd_convs_needs_inputs_to_measure():
    model = build_target("resnet18-lowres-spd")

    with pytest.raises(ValueError, match="force=True"):
        fuse_spd_convs(model)


def test_fused_model_saves_and_loads(tmp_path):
    model = build_target("yolov5n-spd").eval()
    fused_model, names = fuse_spd_convs(model, force=True)
    assert "model.0.conv" in names

    folder = spd_rewrite.save(fused_model, tmp_path / "fused")
    loaded = spd_rewrite.load(folder).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], fused_model(x)[0])


@pytest.mark.parametrize("flag", ["--fuse", "--fuse-all"])
def test_cli_rewrite_saves_fused_model(cli, nets_file, tmp_path, flag):
    out = tmp_path / "fused"
    result = cli(
        "rewrite", f"{nets_file}:small_net", "--input-shape", "1,3,32,32", "--out", out, flag
    )

    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    fused = manifest["metadata"]["fused"]
    if flag == "--fuse-all":
        assert fused == ["stem", "pool", "block.conv", "block.shortcut"]
        assert "fused 4 SPDConv blocks: stem, pool, block.conv, block.shortcut" in result.stdout
    loaded = spd_rewrite.load(out)
    kinds = {name: type(m).__name__ for name, m in loaded.named_modules()}
    for name in fused:
        assert kinds[name] == "FusedSPDConv"
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cli_rewrite_without_fuse_keeps_blocks(cli, nets_file, tmp_path):
    out = tmp_path / "spd"
    result = cli("rewrite", f"{nets_file}:small_net", "--input-shape", "1,3,32,32", "--out", out)

    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["metadata"]["fused"] == []
    assert "fused" not in result.stdout
