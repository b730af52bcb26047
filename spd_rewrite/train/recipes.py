"""Optimiser recipes of the SPD-Conv experiments (Sunkara & Luo 2022), as ``TrainConfig`` values.

* ``yolov5``: SGD with lr 0.01 decaying to 0.001, momentum 0.937, weight decay 5e-4 and 3 warmup
  epochs, as YOLOv5 trains by default. The warmup also raises momentum from 0.8 and lowers the
  bias learning rate from 0.1, and SGD uses Nesterov momentum, also following YOLOv5.
* ``tiny-imagenet-resnet18``: tuned ResNet-18 values for Tiny ImageNet.
* ``cifar10-resnet50``: ResNet-50 values for CIFAR-10.

Any value can be overridden through :meth:`TrainConfig.from_recipe`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "recipe_values"]

RECIPES: dict[str, dict[str, Any]] = {
    "yolov5": {
        "lr": 0.01,
        "final_lr_factor": 0.1,
        "momentum": 0.937,
        "weight_decay": 5e-4,
        "warmup_epochs": 3.0,
        "warmup_momentum": 0.8,
        "warmup_bias_lr": 0.1,
        "nesterov": True,
        "batch_size": 64,
        "augment": False,
    },
    "tiny-imagenet-resnet18": {
        "lr": 0.01793,
        "momentum": 0.9447,
        "weight_decay": 0.002113,
        "batch_size": 256,
        "final_lr_factor": 0.0,
    },
    "cifar10-resnet50": {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "final_lr_factor": 0.0,
    },
}


def recipe_values(name: str) -> dict[str, Any]:
    """Return a copy of the settings of recipe ``name``.

    Raises:
        TrainConfigError: no recipe has that name.
    """
    from spd_rewrite.train.config import TrainConfigError

    if name not in RECIPES:
        raise TrainConfigError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return dict(RECIPES[name])
