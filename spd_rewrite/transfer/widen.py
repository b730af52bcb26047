"""Widen the consumers of a tensor that a space-to-depth layer has multiplied in channels.

In the conv-then-SPD layout a conv with stride ``s`` becomes the same conv with stride 1 followed
by ``SpaceToDepth(s)`` with no ``pad_before`` and the default ``block_offset``. Phase 0 of that
SPD tensor is exactly the original strided output, and the other ``factor - 1`` phases (``factor``
being the product of the scales) hold the stride-1 outputs in between. Downstream layers
therefore see ``factor`` times the channels:

* order ``"unshuffle"``: original channel ``c`` is SPD channel ``c*factor``, its phases follow it;
* order ``"reference"``: original channel ``c`` is SPD channel ``c``, the first ``C`` channels.

Per-channel layers (batch norm in eval mode, activations) are widened by copying their parameters
to every phase. The first layer that mixes channels (a conv or linear layer) reads only phase 0
when built with ``exact=True``, which makes the whole chain equal to the original. No torch.fx
here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from spd_rewrite.errors import WeightTransferError
from spd_rewrite.ops.space_to_depth import ChannelOrder

__all__ = [
    "widen_batchnorm",
    "widen_conv_input",
    "widen_groupnorm",
    "widen_linear_input",
]

_BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm
_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def widen_batchnorm(bn: _BatchNorm, factor: int, order: ChannelOrder = "unshuffle") -> _BatchNorm:
    """Build a batch norm over ``factor`` times the channels, copying each channel to its phases.

    The result equals the original on every phase in eval mode (or whenever running statistics
    are used). In training mode each phase channel gathers its own batch statistics, so it drifts
    from the original.

    Raises:
        WeightTransferError: ``bn`` is not a standard batch norm, or ``factor`` is below 1.
    """
    _check_widen_args(factor, order)
    if not isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
        raise WeightTransferError(
            f"expected nn.BatchNorm1d, 2d, 3d or nn.SyncBatchNorm, got {type(bn).__name__}"
        )

    wide = _batchnorm_class(bn)(
        bn.num_features * factor,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=_device_of(bn),
        dtype=_dtype_of(bn),
    )
    if isinstance(bn, nn.SyncBatchNorm):
        wide.process_group = bn.process_group

    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            values = getattr(bn, name)
            if values is not None:
                getattr(wide, name).copy_(_replicate(values, factor, order))
        if bn.num_batches_tracked is not None and wide.num_batches_tracked is not None:
            wide.num_batches_tracked.copy_(bn.num_batches_tracked)
    wide.train(bn.training)
    return wide


def widen_groupnorm(
    gn: nn.GroupNorm, factor: int, order: ChannelOrder = "unshuffle"
) -> nn.GroupNorm:
    """Build a group norm over ``factor`` times the channels, copying each channel to its phases.

    The number of groups stays, and every phase gets its channel's affine parameters.

    NOTE: approximate, not exact. Each widened group contains the phases of the original group's
    channels, so its mean and variance are taken over every stride-1 output, not only over the
    strided ones (phase 0) that the original normalised.

    Raises:
        WeightTransferError: order ``"reference"`` with more than one group, because that order
            separates the phases of one channel and groups would mix original groups.
    """
    _check_widen_args(factor, order)
    if order == "reference" and gn.num_groups > 1:
        raise WeightTransferError(
            f"a group norm with {gn.num_groups} groups cannot keep its groups after an SPD layer "
            f"with order 'reference'; use order 'unshuffle'"
        )

    wide = nn.GroupNorm(
        gn.num_groups,
        gn.num_channels * factor,
        eps=gn.eps,
        affine=gn.affine,
        device=_device_of(gn),
        dtype=_dtype_of(gn),
    )
    if gn.affine:
        with torch.no_grad():
            wide.weight.copy_(_replicate(gn.weight, factor, order))
            wide.bias.copy_(_replicate(gn.bias, factor, order))
    wide.train(gn.training)
    return wide


def widen_conv_input(
    conv: _Conv, factor: int, order: ChannelOrder = "unshuffle", exact: bool = True
) -> _Conv:
    """Build a conv that takes ``factor`` times the input channels of ``conv``.

    Args:
        conv: the consumer of the widened tensor.
        factor: the channel factor of the SPD layer, the product of its scales.
        order: the channel order of the SPD layer.
        exact: place the original weights at phase 0 and zeros at the other phases, so the conv
            computes exactly the original. Otherwise return a freshly initialised conv of the
            widened shape.

    The stride, padding, dilation, groups, bias and padding mode stay. With order
    ``"unshuffle"`` the phases of one channel stay in that channel's group.

    Raises:
        WeightTransferError: ``conv`` is not a standard conv, or ``exact`` with ``groups > 1``
            and order ``"reference"``.
    """
    _check_widen_args(factor, order)
    if not isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        raise WeightTransferError(f"expected nn.Conv1d, 2d or 3d, got {type(conv).__name__}")
    if exact and order == "reference" and conv.groups > 1:
        raise WeightTransferError(
            f"a conv with groups={conv.groups} cannot read phase 0 exactly after an SPD layer "
            f"with order 'reference', because that order separates the phases of one channel; "
            f"use order 'unshuffle' or exact=False"
        )

    # Any: torch's stubs type kernel_size, stride, ... per class, but ours come from ``conv``.
    conv_class: Any = _conv_class(conv)
    wide: _Conv = conv_class(
        conv.in_channels * factor,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if exact:
        with torch.no_grad():
            wide.weight.copy_(_phase_zero_weight(conv.weight, factor, order))
            if conv.bias is not None and wide.bias is not None:
                wide.bias.copy_(conv.bias)
    wide.train(conv.training)
    return wide


def widen_linear_input(
    linear: nn.Linear,
    factor: int,
    order: ChannelOrder = "unshuffle",
    exact: bool = True,
    spatial_size: int = 1,
) -> nn.Linear:
    """Build a linear layer that takes ``factor`` times the channels of ``linear``'s input.

    Args:
        linear: the consumer of the widened tensor, after a flatten of ``(N, C, *spatial)``.
        factor: the channel factor of the SPD layer, the product of its scales.
        order: the channel order of the SPD layer.
        exact: place the original weights at phase 0 and zeros at the other phases; otherwise
            return a freshly initialised layer of the widened shape.
        spatial_size: how many spatial positions each channel contributes to the flattened
            features (1 after global pooling). Feature ``c*spatial_size + p`` is read from
            channel ``c``, position ``p``.

    Raises:
        WeightTransferError: ``spatial_size`` does not divide the input features.
    """
    _check_widen_args(factor, order)
    if spatial_size < 1 or linear.in_features % spatial_size != 0:
        raise WeightTransferError(
            f"spatial_size {spatial_size} does not divide the {linear.in_features} input "
            f"features of the linear layer; pass the number of positions per channel"
        )

    wide = nn.Linear(
        linear.in_features * factor,
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    if exact:
        out_features = linear.out_features
        channels = linear.in_features // spatial_size
        # (O, C, P) -> (O, C*factor, P) -> (O, C*factor*P): the flattened feature order.
        weight = linear.weight.reshape(out_features, channels, spatial_size)
        weight = _phase_zero_weight(weight, factor, order)
        with torch.no_grad():
            wide.weight.copy_(weight.reshape(out_features, -1))
            if linear.bias is not None:
                wide.bias.copy_(linear.bias)
    wide.train(linear.training)
    return wide


def _phase_zero_weight(weight: torch.Tensor, factor: int, order: ChannelOrder) -> torch.Tensor:
    """Spread ``weight`` (O, C, ...) to (O, C*factor, ...) with zeros outside phase 0."""
    out_channels, channels = weight.shape[:2]
    wide = weight.new_zeros(out_channels, channels * factor, *weight.shape[2:])
    if order == "unshuffle":
        # Channel c*factor + phase; phase 0 is every factor-th channel.
        wide[:, ::factor] = weight.detach()
    else:
        # Channel phase*C + c; phase 0 is the first C channels.
        wide[:, :channels] = weight.detach()
    return wide


def _replicate(values: torch.Tensor, factor: int, order: ChannelOrder) -> torch.Tensor:
    """Copy a per-channel vector (C,) to (C*factor,) in the SPD channel order."""
    if order == "unshuffle":
        # [v0, v0, ..., v1, v1, ...]: channel c*factor + phase.
        return values.repeat_interleave(factor)
    # [v0, v1, ..., v0, v1, ...]: channel phase*C + c.
    return values.repeat(factor)


# Subclasses widen to the torch class they derive from, since their constructors may differ.


def _batchnorm_class(bn: _BatchNorm) -> type[_BatchNorm]:
    if isinstance(bn, nn.SyncBatchNorm):
        return nn.SyncBatchNorm
    if isinstance(bn, nn.BatchNorm1d):
        return nn.BatchNorm1d
    if isinstance(bn, nn.BatchNorm2d):
        return nn.BatchNorm2d
    return nn.BatchNorm3d


def _conv_class(conv: _Conv) -> type[_Conv]:
    if isinstance(conv, nn.Conv1d):
        return nn.Conv1d
    if isinstance(conv, nn.Conv2d):
        return nn.Conv2d
    return nn.Conv3d


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(_float_tensors(module), None)
    return tensor.device if tensor is not None else None


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    tensor = next(_float_tensors(module), None)
    return tensor.dtype if tensor is not None else None


def _float_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Yield the floating-point parameters and buffers of ``module``."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            yield tensor


def _check_widen_args(factor: int, order: str) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise WeightTransferError(f"factor must be a positive integer, got {factor!r}")
    if order not in ("unshuffle", "reference"):
        raise WeightTransferError(f"order must be 'unshuffle' or 'reference', got {order!r}")
