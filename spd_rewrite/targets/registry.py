"""Names of the bundled target models, their metadata, and the function that builds them.

Baselines:

* ``resnet18`` ... ``resnet152``: ImageNet stem, 1000 classes, 224x224 inputs.
* ``resnet18-lowres`` ... ``resnet152-lowres``: CIFAR stem, 10 classes, 32x32 (or 64x64) inputs.
* ``yolov5n``, ``yolov5s``, ``yolov5m``, ``yolov5l``: YOLOv5 v6.0, 80 classes, 640x640 inputs.

Every baseline also has two SPD-Conv versions, ``<baseline>-spd`` and ``<baseline>-spd-reference``,
which :func:`build_target` makes by running :func:`spd_rewrite.rewrite` with the rule set
``paper`` or ``reference`` on the freshly built baseline, the way a user would.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from spd_rewrite.errors import ModelSpecError
from spd_rewrite.targets.resnet import resnet
from spd_rewrite.targets.yolov5 import YOLOV5_VARIANTS, compute_strides, yolov5

__all__ = ["TargetInfo", "TargetTask", "build_target", "get_target", "list_targets"]

TargetTask = Literal["classification", "detection"]

# Suffix of an SPD target name -> the rule set that the pass applies to its baseline.
_SPD_SUFFIXES: dict[str, str] = {"-spd": "paper", "-spd-reference": "reference"}


@dataclass(frozen=True)
class TargetInfo:
    """Metadata of one bundled target model."""

    name: str
    task: TargetTask
    input_size: int
    """Natural square input size in pixels."""
    description: str
    num_classes: int
    """Classes when ``build_target`` gets ``num_classes=None``."""
    input_sizes: tuple[int, ...]
    """Square input sizes the target is meant for, ``input_size`` first."""
    baseline: str
    """Name of the baseline target. Equal to ``name`` for a baseline."""
    rules: str | None
    """Rule set that turns the baseline into this target, or None for a baseline."""
    rewrite_input_size: int
    """Square size of the example input given to the pass when building an SPD version."""


# Builds a baseline from (num_classes, in_channels).
_Builder = Callable[[int, int], nn.Module]


def _resnet_builder(depth: int, stem: Literal["imagenet", "lowres"]) -> _Builder:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        return resnet(depth, stem=stem, num_classes=num_classes, in_channels=in_channels)

    return build


def _yolov5_builder(variant: str) -> _Builder:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        return yolov5(variant, num_classes=num_classes, in_channels=in_channels)

    return build


def _baselines() -> list[tuple[TargetInfo, _Builder]]:
    baselines = []
    for depth in (18, 34, 50, 101, 152):
        info = TargetInfo(
            name=f"resnet{depth}",
            task="classification",
            input_size=224,
            description=f"ResNet-{depth} (v1.5), ImageNet stem: 7x7/2 conv and 3x3/2 max pool",
            num_classes=1000,
            input_sizes=(224,),
            baseline=f"resnet{depth}",
            rules=None,
            # Every stride-2 layer receives an even size (64, 32, 16, 8, 4), and 64 builds fast.
            rewrite_input_size=64,
        )
        baselines.append((info, _resnet_builder(depth, "imagenet")))

    for depth in (18, 34, 50, 101, 152):
        info = TargetInfo(
            name=f"resnet{depth}-lowres",
            task="classification",
            input_size=32,
            description=f"ResNet-{depth} (v1.5), low-resolution stem: 3x3/1 conv, no max pool",
            num_classes=10,
            input_sizes=(32, 64),
            baseline=f"resnet{depth}-lowres",
            rules=None,
            rewrite_input_size=32,
        )
        baselines.append((info, _resnet_builder(depth, "lowres")))

    for variant in YOLOV5_VARIANTS:
        info = TargetInfo(
            name=f"yolov5{variant}",
            task="detection",
            input_size=640,
            description=f"YOLOv5{variant} v6.0, anchor-based detector on P3/P4/P5",
            num_classes=80,
            input_sizes=(640,),
            baseline=f"yolov5{variant}",
            rules=None,
            # Every stride-2 layer receives an even size and P5 is 2x2, and 64 builds fast.
            rewrite_input_size=64,
        )
        baselines.append((info, _yolov5_builder(variant)))
    return baselines


def _with_spd_versions(baselines: list[TargetInfo]) -> dict[str, TargetInfo]:
    targets: dict[str, TargetInfo] = {}
    for base in baselines:
        targets[base.name] = base
        for suffix, rules in _SPD_SUFFIXES.items():
            spd = dataclasses.replace(
                base,
                name=base.name + suffix,
                description=f"{base.description}, rewritten to SPD-Conv with rule set {rules!r}",
                rules=rules,
            )
            targets[spd.name] = spd
    return targets


_BASELINES = _baselines()
_BUILDERS: dict[str, _Builder] = {info.name: builder for info, builder in _BASELINES}
_TARGETS: dict[str, TargetInfo] = _with_spd_versions([info for info, _ in _BASELINES])


def list_targets() -> list[TargetInfo]:
    """Return every bundled target, each baseline followed by its SPD versions."""
    return list(_TARGETS.values())


def get_target(name: str) -> TargetInfo:
    """Return the metadata of target ``name``.

    Raises:
        ModelSpecError: no target has that name. The message lists the closest names.
    """
    if name in _TARGETS:
        return _TARGETS[name]
    close = difflib.get_close_matches(name, _TARGETS, n=3)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelSpecError(
        f"unknown target {name!r}; {suggestion}`spd-rewrite targets` lists all target names"
    )


def build_target(name: str, *, num_classes: int | None = None, in_channels: int = 3) -> nn.Module:
    """Build target ``name`` with fresh weights.

    An SPD version is built by running :func:`spd_rewrite.rewrite` on its baseline with the
    target's rule set and an example input of ``rewrite_input_size`` pixels. For detection
    targets the Detect strides are then measured again on the rewritten model.

    Args:
        name: a name from :func:`list_targets`.
        num_classes: output classes; None keeps the target's default.
        in_channels: channels of the input image.

    Raises:
        ModelSpecError: ``name`` is unknown, or ``num_classes`` or ``in_channels`` is below 1.
    """
    info = get_target(name)
    if num_classes is None:
        num_classes = info.num_classes
    if num_classes < 1:
        raise ModelSpecError(
            f"invalid num_classes {num_classes} for target {name!r}; use 1 or more"
        )
    if in_channels < 1:
        raise ModelSpecError(
            f"invalid in_channels {in_channels} for target {name!r}; use 1 or more"
        )

    model = _BUILDERS[info.baseline](num_classes, in_channels)
    if info.rules is None:
        return model
    return _rewrite_to_spd(model, info, in_channels)


def _rewrite_to_spd(model: nn.Module, info: TargetInfo, in_channels: int) -> nn.Module:
    # Imported on use, so that spd_rewrite/__init__.py can re-export this module without a cycle.
    from spd_rewrite import rewrite

    size = info.rewrite_input_size
    example = torch.randn(1, in_channels, size, size)
    rewritten = rewrite(model, example_inputs=example, rules=info.rules).model
    if info.task == "detection":
        compute_strides(rewritten, in_channels)
    return rewritten
