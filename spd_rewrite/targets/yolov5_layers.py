"""The layers of YOLOv5 v6.0: Conv, Bottleneck, C3, SPPF, Concat and the anchor-based Detect head.

Attribute names (``conv``, ``bn``, ``act``, ``cv1``, ``m``) follow the YOLOv5 code base, so that
module paths such as ``model.2.m.0.cv1.conv`` read the same as in its model summaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["C3", "SPPF", "Bottleneck", "Concat", "Conv", "Detect"]

# YOLOv5 sets these on every BatchNorm2d in place of PyTorch's 1e-5 and 0.1.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class Conv(nn.Module):
    """Conv2d without bias, BatchNorm2d and SiLU. Padding defaults to ``kernel_size // 2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 Conv then 3x3 Conv, with a residual add when ``shortcut`` is set and shapes agree."""

    def __init__(
        self, in_channels: int, out_channels: int, shortcut: bool = True, expansion: float = 0.5
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1)
        self.cv2 = Conv(hidden, out_channels, 3)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cv2(self.cv1(x))
        return x + out if self.add else out


class C3(nn.Module):
    """CSP block with three convs: ``cv3(cat(m(cv1(x)), cv2(x)))``.

    ``m`` is ``repeats`` Bottlenecks, and both branches are ``out_channels // 2`` wide.
    """

    def __init__(
        self, in_channels: int, out_channels: int, repeats: int = 1, shortcut: bool = True
    ) -> None:
        super().__init__()
        hidden = int(out_channels * 0.5)
        self.cv1 = Conv(in_channels, hidden, 1)
        self.cv2 = Conv(in_channels, hidden, 1)
        self.cv3 = Conv(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(
            *(Bottleneck(hidden, hidden, shortcut, expansion=1.0) for _ in range(repeats))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained stride-1 max pools of size ``kernel_size``.

    The pools keep the spatial size, so the pass has no stride to remove here.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1)
        self.cv2 = Conv(hidden * 4, out_channels, 1)
        self.m = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        pooled1 = self.m(x)
        pooled2 = self.m(pooled1)
        return self.cv2(torch.cat((x, pooled1, pooled2, self.m(pooled2)), dim=1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dim``."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


class Detect(nn.Module):
    """Anchor-based YOLOv5 head: one 1x1 conv per feature map, decoded in eval mode.

    Each input map ``i`` gives a raw tensor ``(N, na, ny, nx, 5 + nc)`` whose last axis is
    ``(x, y, w, h, objectness, class scores...)`` as logits.

    * training mode: returns the list of raw maps, one per level.
    * eval mode: returns ``(decoded, raw_maps)``. ``decoded`` is ``(N, sum(na*ny*nx), 5 + nc)``,
      all sigmoid, with boxes in input pixels: ``xy = (2*sigmoid - 0.5 + grid) * stride`` and
      ``wh = (2*sigmoid)**2 * anchor``, the decoding of YOLOv5 v6.0.

    ``anchors`` is a buffer ``(nl, na, 2)`` of anchor widths and heights in input pixels.
    ``stride`` is a buffer ``(nl,)`` of input pixels per map cell, set by
    :func:`spd_rewrite.targets.yolov5.compute_strides`. The grid is rebuilt from each map's size on
    every call, so the head accepts any input size.

    ``forward`` branches on ``self.training``. A ``torch.fx`` trace through Detect would freeze the
    mode it saw, so the pass traces Detect as a leaf module.
    """

    anchors: torch.Tensor
    stride: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        anchors: Sequence[Sequence[float]],
        in_channels: Sequence[int],
    ) -> None:
        super().__init__()
        if len(anchors) != len(in_channels):
            raise ValueError(
                f"Detect got {len(anchors)} anchor levels but {len(in_channels)} input maps"
            )
        self.nc = num_classes
        self.no = num_classes + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        # (nl, na, 2): flat [w0, h0, w1, h1, ...] per level, in input pixels.
        anchor_tensor = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", anchor_tensor)
        self.register_buffer("stride", torch.zeros(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in in_channels)

    def forward(
        self, xs: list[torch.Tensor]
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw_maps = []
        decoded = []
        for i, conv in enumerate(self.m):
            out = conv(xs[i])
            n, _, ny, nx = out.shape
            # (N, na*no, ny, nx) -> (N, na, ny, nx, no)
            out = out.view(n, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw_maps.append(out)
            if not self.training:
                decoded.append(self._decode(out, i).view(n, -1, self.no))

        if self.training:
            return raw_maps
        return torch.cat(decoded, dim=1), raw_maps

    def _decode(self, raw: torch.Tensor, level: int) -> torch.Tensor:
        _, _, ny, nx, _ = raw.shape
        rows = torch.arange(ny, device=raw.device, dtype=raw.dtype)
        cols = torch.arange(nx, device=raw.device, dtype=raw.dtype)
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        # (1, 1, ny, nx, 2) cell offsets, x first.
        grid = torch.stack((grid_x, grid_y), dim=-1).view(1, 1, ny, nx, 2)
        # (1, na, 1, 1, 2) anchor sizes in pixels.
        anchor = self.anchors[level].to(raw.dtype).view(1, self.na, 1, 1, 2)
        stride = self.stride[level].to(raw.dtype)

        y = raw.sigmoid()
        xy = (y[..., 0:2] * 2 - 0.5 + grid) * stride
        wh = (y[..., 2:4] * 2) ** 2 * anchor
        return torch.cat((xy, wh, y[..., 4:]), dim=-1)

    @torch.no_grad()
    def initialize_biases(self, class_frequency: torch.Tensor | None = None) -> None:
        """Set the objectness and class biases to YOLOv5's priors. Needs ``stride`` to be set.

        Objectness assumes about 8 objects in a 640x640 image, spread over the map's cells. Class
        biases assume a uniform class prior of about 0.6 / nc, or ``log(freq / sum(freq))`` when
        ``class_frequency`` is given.
        """
        for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
            if stride <= 0:
                raise ValueError("Detect.stride is not set; call compute_strides first")
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            # (na*no,) -> (na, no): one bias row per anchor.
            bias = conv.bias.view(self.na, -1)
            bias[:, 4] += math.log(8 / (640 / stride) ** 2)
            if class_frequency is None:
                bias[:, 5:] += math.log(0.6 / (self.nc - 0.99))
            else:
                bias[:, 5:] += torch.log(class_frequency / class_frequency.sum())
