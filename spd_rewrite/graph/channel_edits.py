"""Channel layouts of widened tensors, and the layers that read them, rebuilt to fit.

A conv-first block multiplies its output channels by ``factor``; a concat of such a tensor with
others mixes runs of widened and original channels. A :data:`Layout` lists those runs in channel
order as :class:`Segment` records. Within a segment, original channel ``c`` sits at widened channel
``c*factor + phase`` (order ``"unshuffle"``) or ``phase*channels + c`` (order ``"reference"``);
phase 0 contains the original values (see :mod:`spd_rewrite.transfer.widen`).

:data:`LAYER_CHANNELS` pairs, per supported layer type, the readers of its input and output
channel counts with the editor that rebuilds it for a widened input. No torch.fx here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spd_rewrite.errors import WeightTransferError
from spd_rewrite.ops.space_to_depth import ChannelOrder
from spd_rewrite.transfer.widen import widen_groupnorm

__all__ = [
    "LAYER_CHANNELS",
    "LayerChannels",
    "Layout",
    "Segment",
    "WidenError",
    "layer_channels",
    "merge_segments",
    "original_width",
    "widened_width",
]


@dataclass(frozen=True)
class Segment:
    """A run of ``channels`` original channels, each widened to ``factor`` channels."""

    channels: int
    factor: int
    order: ChannelOrder


Layout = tuple[Segment, ...]


class WidenError(Exception):
    """Raised when a layer cannot be rebuilt for a widened layout. The message gives the reason."""


def original_width(layout: Layout) -> int:
    return sum(segment.channels for segment in layout)


def widened_width(layout: Layout) -> int:
    return sum(segment.channels * segment.factor for segment in layout)


def merge_segments(layout: Layout) -> Layout:
    """Join neighbouring unwidened runs, so that equal channel layouts compare equal."""
    merged: list[Segment] = []
    for segment in layout:
        if segment.channels == 0:
            continue
        if merged and segment.factor == 1 and merged[-1].factor == 1:
            merged[-1] = Segment(merged[-1].channels + segment.channels, 1, "unshuffle")
        elif segment.factor == 1:
            merged.append(Segment(segment.channels, 1, "unshuffle"))
        else:
            merged.append(segment)
    return tuple(merged)


def _spread(values: torch.Tensor, layout: Layout, dim: int, phase_zero_only: bool) -> torch.Tensor:
    """Widen ``values`` along ``dim`` to the layout: every phase a copy, or phase 0 and zeros."""
    pieces = []
    start = 0
    for segment in layout:
        piece = values.narrow(dim, start, segment.channels)
        start += segment.channels
        if segment.factor == 1:
            pieces.append(piece)
            continue
        # (..., C, ...) -> (..., C, factor, ...) for "unshuffle", (..., factor, C, ...) otherwise.
        phase_axis = dim + 1 if segment.order == "unshuffle" else dim
        copies = piece.unsqueeze(phase_axis)
        if phase_zero_only:
            shape = list(copies.shape)
            shape[phase_axis] = segment.factor
            wide = copies.new_zeros(shape)
            wide.narrow(phase_axis, 0, 1).copy_(copies)
        else:
            wide = copies.repeat_interleave(segment.factor, dim=phase_axis)
        pieces.append(wide.flatten(dim, dim + 1))
    return torch.cat(pieces, dim=dim)


def _widen_per_channel(module: nn.Module, layout: Layout, count_attribute: str) -> nn.Module:
    """Copy ``module`` with every per-channel parameter and buffer replicated to each phase.

    Batch norm statistics and affine parameters, instance norm and PReLU weights are per-channel
    vectors, so each phase gets its original channel's values and phase 0 computes the original.
    """
    channels = original_width(layout)
    wide = copy.deepcopy(module)
    with torch.no_grad():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dim() == 1 and parameter.shape[0] == channels:
                values = _spread(parameter.detach(), layout, 0, phase_zero_only=False)
                setattr(wide, name, nn.Parameter(values, requires_grad=parameter.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dim() == 1 and buffer.shape[0] == channels:
                setattr(wide, name, _spread(buffer, layout, 0, phase_zero_only=False))
    setattr(wide, count_attribute, widened_width(layout))
    return wide


def _widen_groupnorm(module: nn.Module, layout: Layout, exact: bool) -> nn.Module:
    assert isinstance(module, nn.GroupNorm)
    widened = [segment for segment in layout if segment.factor > 1]
    if len(layout) != 1 or len(widened) != 1:
        raise WidenError(
            "a group norm after a concat of widened and original channels would mix groups"
        )
    segment = widened[0]
    try:
        return widen_groupnorm(module, segment.factor, segment.order)
    except WeightTransferError as error:
        raise WidenError(str(error)) from None


def _widen_conv(module: nn.Module, layout: Layout, exact: bool) -> nn.Module:
    """Copy a conv with input channels widened: original weights at phase 0, or fresh weights."""
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    groups = module.groups
    if groups > 1:
        if len(layout) != 1:
            raise WidenError(
                f"a conv with groups={groups} after a concat of widened and original channels "
                "would mix groups"
            )
        if exact and layout[0].order == "reference" and layout[0].factor > 1:
            raise WidenError(
                f"a conv with groups={groups} cannot read phase 0 exactly in channel_order = "
                '"reference", because that order separates the phases of one channel; use '
                'channel_order = "unshuffle" or transfer = "fresh"'
            )
    # Each group reads its own slice of the input, so a grouped conv is widened per group.
    per_group = tuple(
        Segment(segment.channels // groups, segment.factor, segment.order) for segment in layout
    )

    wide = copy.deepcopy(module)
    wide.in_channels = widened_width(layout)
    with torch.no_grad():
        if exact:
            # (O, C/g, *k) -> (O, C*factor/g, *k), zeros outside phase 0.
            weight = _spread(module.weight.detach(), per_group, 1, phase_zero_only=True)
            wide.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        else:
            shape = (module.out_channels, wide.in_channels // groups, *module.kernel_size)
            wide.weight = nn.Parameter(module.weight.new_empty(shape))
            wide.reset_parameters()
    return wide


def _widen_linear(module: nn.Module, layout: Layout, exact: bool, positions: int) -> nn.Module:
    """Copy a linear layer that reads a flattened ``(N, C, *spatial)`` tensor with wider C."""
    assert isinstance(module, nn.Linear)
    out_features = module.out_features
    wide = copy.deepcopy(module)
    wide.in_features = widened_width(layout) * positions
    with torch.no_grad():
        if exact:
            # (O, C*P) -> (O, C, P): feature c*P + p reads channel c at position p.
            weight = module.weight.detach().reshape(out_features, -1, positions)
            weight = _spread(weight, layout, 1, phase_zero_only=True)
            wide.weight = nn.Parameter(
                weight.reshape(out_features, -1), requires_grad=module.weight.requires_grad
            )
        else:
            wide.weight = nn.Parameter(module.weight.new_empty(out_features, wide.in_features))
            wide.reset_parameters()
    return wide


@dataclass(frozen=True)
class LayerChannels:
    """Channel readers and the input editor of one layer type.

    ``edit_in(module, layout, exact, positions)`` returns a copy of the layer for an input of that
    layout (``positions`` spatial positions per channel for a linear layer after a flatten). A
    per-channel layer (``per_channel``) passes the layout on to its output; the others return the
    original channels, so the widening ends there. ``exact`` is false where the edited layer
    computes only an approximation of the original.
    """

    read_in: Callable[[nn.Module], int]
    read_out: Callable[[nn.Module], int]
    edit_in: Callable[[nn.Module, Layout, bool, int], nn.Module]
    per_channel: bool
    exact: bool = True


def _norm_features(module: nn.Module) -> int:
    return int(module.num_features)  # type: ignore[arg-type]


def _norm_editor(module: nn.Module, layout: Layout, exact: bool, positions: int) -> nn.Module:
    return _widen_per_channel(module, layout, "num_features")


def _prelu_editor(module: nn.Module, layout: Layout, exact: bool, positions: int) -> nn.Module:
    return _widen_per_channel(module, layout, "num_parameters")


_CONV = LayerChannels(
    read_in=lambda m: int(m.in_channels),  # type: ignore[arg-type]
    read_out=lambda m: int(m.out_channels),  # type: ignore[arg-type]
    edit_in=lambda m, layout, exact, positions: _widen_conv(m, layout, exact),
    per_channel=False,
)
_NORM = LayerChannels(_norm_features, _norm_features, _norm_editor, per_channel=True)

# Checked in order with isinstance, so subclasses share their base's entry.
LAYER_CHANNELS: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], LayerChannels], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _CONV),
    (
        nn.Linear,
        LayerChannels(
            read_in=lambda m: int(m.in_features),  # type: ignore[arg-type]
            read_out=lambda m: int(m.out_features),  # type: ignore[arg-type]
            edit_in=_widen_linear,
            per_channel=False,
        ),
    ),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), _NORM),
    (
        nn.GroupNorm,
        LayerChannels(
            read_in=lambda m: int(m.num_channels),  # type: ignore[arg-type]
            read_out=lambda m: int(m.num_channels),  # type: ignore[arg-type]
            edit_in=lambda m, layout, exact, positions: _widen_groupnorm(m, layout, exact),
            per_channel=True,
            # Each widened group also averages the phases outside phase 0.
            exact=False,
        ),
    ),
    (
        nn.PReLU,
        LayerChannels(
            read_in=lambda m: int(m.num_parameters),  # type: ignore[arg-type]
            read_out=lambda m: int(m.num_parameters),  # type: ignore[arg-type]
            edit_in=_prelu_editor,
            per_channel=True,
        ),
    ),
)


def layer_channels(module: nn.Module) -> LayerChannels | None:
    """Return the channel readers and editor for ``module``'s type, or None if unsupported."""
    for types, entry in LAYER_CHANNELS:
        if isinstance(module, types):
            return entry
    return None
