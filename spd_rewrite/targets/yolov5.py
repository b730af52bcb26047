"""YOLOv5 v6.0 detectors (n, s, m, l) built from a declarative layer table.

:data:`YOLOV5_LAYERS` lists the layers of the v6.0 architecture as ``(source, repeats, layer,
args)`` rows at width and depth 1.0. ``source`` is ``-1`` for the previous layer, a layer index, or
a tuple of those. A size variant scales every output width by its width multiple (rounded up to a
multiple of 8) and every repeat count ``n > 1`` to ``max(round(n * depth), 1)``.

The forward loops over the layers and keeps only the outputs that a later row reads, so
``torch.fx.symbolic_trace`` traces everything except :class:`Detect`, which must be a leaf module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spd_rewrite.targets.yolov5_layers import C3, SPPF, Concat, Conv, Detect

__all__ = [
    "COCO_ANCHORS",
    "YOLOV5_LAYERS",
    "YOLOV5_VARIANTS",
    "LayerRow",
    "YOLOv5",
    "compute_strides",
    "find_detect",
    "yolov5",
]

LayerSource = int | tuple[int, ...]
LayerRow = tuple[LayerSource, int, type[nn.Module], list[Any]]

# Anchor (width, height) pairs in pixels for the P3/8, P4/16 and P5/32 maps, fitted on COCO.
COCO_ANCHORS: tuple[tuple[int, ...], ...] = (
    (10, 13, 16, 30, 33, 23),
    (30, 61, 62, 45, 59, 119),
    (116, 90, 156, 198, 373, 326),
)

# (depth multiple, width multiple) per size variant.
YOLOV5_VARIANTS: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
    "l": (1.0, 1.0),
}

# Args: Conv [out_channels, kernel, stride(, padding)], C3 [out_channels(, shortcut)],
# SPPF [out_channels, pool kernel], Upsample [size, scale, mode], Concat [dim], Detect [].
YOLOV5_LAYERS: tuple[LayerRow, ...] = (
    # Backbone. The comment gives the output's stride relative to the input.
    (-1, 1, Conv, [64, 6, 2, 2]),  # 0: /2
    (-1, 1, Conv, [128, 3, 2]),  # 1: /4
    (-1, 3, C3, [128]),
    (-1, 1, Conv, [256, 3, 2]),  # 3: /8
    (-1, 6, C3, [256]),
    (-1, 1, Conv, [512, 3, 2]),  # 5: /16
    (-1, 9, C3, [512]),
    (-1, 1, Conv, [1024, 3, 2]),  # 7: /32
    (-1, 3, C3, [1024]),
    (-1, 1, SPPF, [1024, 5]),  # 9
    # Head: top-down path (FPN) to /8, then bottom-up path (PAN) back to /32.
    (-1, 1, Conv, [512, 1, 1]),  # 10
    (-1, 1, nn.Upsample, [None, 2, "nearest"]),
    ((-1, 6), 1, Concat, [1]),
    (-1, 3, C3, [512, False]),  # 13: /16
    (-1, 1, Conv, [256, 1, 1]),  # 14
    (-1, 1, nn.Upsample, [None, 2, "nearest"]),
    ((-1, 4), 1, Concat, [1]),
    (-1, 3, C3, [256, False]),  # 17: P3, /8
    (-1, 1, Conv, [256, 3, 2]),
    ((-1, 14), 1, Concat, [1]),
    (-1, 3, C3, [512, False]),  # 20: P4, /16
    (-1, 1, Conv, [512, 3, 2]),
    ((-1, 10), 1, Concat, [1]),
    (-1, 3, C3, [1024, False]),  # 23: P5, /32
    ((17, 20, 23), 1, Detect, []),
)

# Layers whose first arg is an output width that the width multiple scales.
_WIDTH_SCALED = (Conv, C3, SPPF)


def _make_divisible(value: float, divisor: int = 8) -> int:
    return math.ceil(value / divisor) * divisor


def _scale_repeats(repeats: int, depth_multiple: float) -> int:
    return max(round(repeats * depth_multiple), 1) if repeats > 1 else repeats


def _sources_of(source: LayerSource) -> tuple[int, ...]:
    return (source,) if isinstance(source, int) else source


def _build_layers(
    rows: Sequence[LayerRow],
    depth_multiple: float,
    width_multiple: float,
    num_classes: int,
    in_channels: int,
    anchors: Sequence[Sequence[float]],
) -> list[nn.Module]:
    """Instantiate one module per row, tracking each row's output channels."""
    layers: list[nn.Module] = []
    out_channels: list[int] = []

    def channels_of(source: int) -> int:
        return in_channels if source == -1 and not out_channels else out_channels[source]

    for index, (source, repeats, layer_type, args) in enumerate(rows):
        repeats = _scale_repeats(repeats, depth_multiple)
        if repeats > 1 and layer_type is not C3:
            raise ValueError(f"layer {index}: only C3 rows may repeat, got {repeats} repeats")
        sources = _sources_of(source)
        if len(sources) > 1 and layer_type not in (Concat, Detect):
            raise ValueError(f"layer {index}: {layer_type.__name__} takes one source, got {source}")

        layer: nn.Module
        if layer_type in _WIDTH_SCALED:
            channels = _make_divisible(args[0] * width_multiple)
            extra = [repeats, *args[1:]] if layer_type is C3 else args[1:]
            layer = layer_type(channels_of(sources[0]), channels, *extra)
        elif layer_type is nn.Upsample:
            channels = channels_of(sources[0])
            size, scale, mode = args
            layer = nn.Upsample(size=size, scale_factor=scale, mode=mode)
        elif layer_type is Concat:
            channels = sum(channels_of(s) for s in sources)
            layer = Concat(*args)
        elif layer_type is Detect:
            channels = 0
            layer = Detect(num_classes, anchors, [channels_of(s) for s in sources])
        else:
            raise ValueError(f"layer {index}: unsupported layer type {layer_type.__name__}")

        layers.append(layer)
        out_channels.append(channels)
    return layers


class YOLOv5(nn.Module):
    """A YOLOv5 detector built from ``(source, repeats, layer, args)`` rows.

    The forward maps ``(N, in_channels, H, W)``, with H and W multiples of 32, to the output of
    :class:`Detect`: raw maps in training mode, ``(decoded, raw_maps)`` in eval mode.
    """

    def __init__(
        self,
        rows: Sequence[LayerRow] = YOLOV5_LAYERS,
        *,
        depth_multiple: float = 1.0,
        width_multiple: float = 1.0,
        num_classes: int = 80,
        in_channels: int = 3,
        anchors: Sequence[Sequence[float]] = COCO_ANCHORS,
    ) -> None:
        super().__init__()
        self.model = nn.ModuleList(
            _build_layers(rows, depth_multiple, width_multiple, num_classes, in_channels, anchors)
        )
        self.sources: tuple[LayerSource, ...] = tuple(row[0] for row in rows)
        # Indices of the outputs that some later row reads besides its predecessor.
        self.saved: frozenset[int] = frozenset(
            s for source in self.sources for s in _sources_of(source) if s != -1
        )

    def forward(self, x: torch.Tensor) -> Any:
        outputs: list[torch.Tensor | None] = []
        for index, layer in enumerate(self.model):
            source = self.sources[index]
            if isinstance(source, int):
                layer_input: Any = x if source == -1 else outputs[source]
            else:
                layer_input = [x if s == -1 else outputs[s] for s in source]
            x = layer(layer_input)
            outputs.append(x if index in self.saved else None)
        return x


def find_detect(model: nn.Module) -> Detect:
    """Return the one :class:`Detect` submodule of ``model``.

    Raises:
        ValueError: ``model`` has no Detect or more than one.
    """
    heads = [module for module in model.modules() if isinstance(module, Detect)]
    if len(heads) != 1:
        raise ValueError(f"expected one Detect module in the model, found {len(heads)}")
    return heads[0]


@torch.no_grad()
def compute_strides(model: nn.Module, in_channels: int = 3, size: int = 256) -> torch.Tensor:
    """Set ``Detect.stride`` from a dummy forward and return it.

    Runs a ``(1, in_channels, size, size)`` input of zeros in training mode and sets each level's
    stride to ``size / map height``, so that a rewritten model gets the strides it really has.
    The model's buffers (BatchNorm running statistics) and its training flag are restored after the
    forward. ``model`` may be a ``torch.fx.GraphModule`` in which Detect is a leaf module.
    """
    detect = find_detect(model)
    reference: torch.Tensor = next(model.parameters(), detect.stride)
    dummy = torch.zeros(1, in_channels, size, size, device=reference.device, dtype=reference.dtype)

    # Training-mode BatchNorm would fold the dummy batch into its running statistics.
    saved_buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        raw_maps = model(dummy)
    finally:
        model.train(was_training)
        for name, buffer in model.named_buffers():
            buffer.copy_(saved_buffers[name])

    # raw_maps[i]: (1, na, ny, nx, no)
    strides = [size / raw.shape[2] for raw in raw_maps]
    detect.stride.copy_(torch.tensor(strides, dtype=detect.stride.dtype))
    return detect.stride


def yolov5(variant: str, *, num_classes: int = 80, in_channels: int = 3) -> YOLOv5:
    """Build YOLOv5 v6.0 ``variant`` (``"n"``, ``"s"``, ``"m"`` or ``"l"``) with fresh weights.

    Strides are measured with :func:`compute_strides`, and the Detect biases start at YOLOv5's
    objectness and class priors.

    Raises:
        ValueError: ``variant`` is not one of the sizes in :data:`YOLOV5_VARIANTS`.
    """
    if variant not in YOLOV5_VARIANTS:
        supported = ", ".join(YOLOV5_VARIANTS)
        raise ValueError(f"invalid YOLOv5 variant {variant!r}; expected one of {supported}")
    depth_multiple, width_multiple = YOLOV5_VARIANTS[variant]
    model = YOLOv5(
        depth_multiple=depth_multiple,
        width_multiple=width_multiple,
        num_classes=num_classes,
        in_channels=in_channels,
    )
    compute_strides(model, in_channels)
    find_detect(model).initialize_biases()
    return model
