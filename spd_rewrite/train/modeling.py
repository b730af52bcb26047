"""Building the model that a run trains: a bundled target sized for the data, or a given module."""

from __future__ import annotations

import logging

import torch
from torch import nn

from spd_rewrite.train.config import TrainConfig, TrainConfigError
from spd_rewrite.train.data import DataBundle

__all__ = ["amp_dtype", "build_model"]

logger = logging.getLogger(__name__)


def build_model(target: str | nn.Module, bundle: DataBundle) -> tuple[nn.Module, str | None]:
    """Return the model and the target name (None for a given module).

    A target name is built with the data's number of classes and input channels.

    Raises:
        TrainConfigError: the target's task (classification or detection) differs from the data's.
        ModelSpecError: the target name is unknown.
    """
    if isinstance(target, nn.Module):
        return target, None

    from spd_rewrite.targets import build_target, get_target

    info = get_target(target)
    if info.task != bundle.task:
        raise TrainConfigError(
            f"target {target!r} is a {info.task} model but data {bundle.name!r} is a "
            f"{bundle.task} set; pick a {bundle.task} target"
        )
    model = build_target(target, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    return model, target


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for the run, or None for full precision (always on CPU)."""
    if device.type != "cuda" or config.amp == "off":
        if device.type != "cuda" and config.amp in ("bf16", "fp16"):
            logger.warning(
                "mixed precision %s is only used on CUDA; training in float32", config.amp
            )
        return None
    if config.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if config.amp == "bf16" else torch.float16
