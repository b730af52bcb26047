"""Replacement blocks: one module per replaced op, holding its SPD layer and stride-1 op.

Each block takes the place of the strided op (as a submodule of the same name in ``mode="modules"``,
or as one ``call_module`` node in a graph), so the state dict reads ``<layer>.spd`` and
``<layer>.conv``.
"""

from __future__ import annotations

import torch
from torch import nn

from spd_rewrite.ops.avg_pool_divisor import AvgPoolDivisorCorrection
from spd_rewrite.ops.phase_max import PhaseMax
from spd_rewrite.ops.space_to_depth import SpaceToDepth

__all__ = ["ConvSPD", "SPDConv", "SPDMaxPool", "REPLACEMENT_TYPES"]


class SPDConv(nn.Module):
    """Space-to-depth, then a stride-1 conv: ``conv(spd(x))``.

    With ``correction`` (exact average pooling whose divisor varies at the borders), the conv
    output is rescaled per position: ``correction(conv(spd(x)), x)``.
    """

    def __init__(
        self,
        spd: SpaceToDepth,
        conv: nn.Module,
        correction: AvgPoolDivisorCorrection | None = None,
    ) -> None:
        super().__init__()
        self.spd = spd
        self.conv = conv
        self.correction = correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.spd(x))
        if self.correction is not None:
            y = self.correction(y, x)
        return y


class ConvSPD(nn.Module):
    """A stride-1 conv, then space-to-depth: ``spd(conv(x))``; its output is ``scale^d`` wider."""

    def __init__(self, conv: nn.Module, spd: SpaceToDepth) -> None:
        super().__init__()
        self.conv = conv
        self.spd = spd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spd(self.conv(x))


class SPDMaxPool(nn.Module):
    """Space-to-depth padded with ``-inf``, then the stride-free max: exact max pooling."""

    def __init__(self, spd: SpaceToDepth, pool: PhaseMax) -> None:
        super().__init__()
        self.spd = spd
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.spd(x))


# Modules the tracer keeps as leaves and the matcher recognises as already rewritten.
REPLACEMENT_TYPES = (SPDConv, ConvSPD, SPDMaxPool, SpaceToDepth, PhaseMax, AvgPoolDivisorCorrection)
