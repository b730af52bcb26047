"""SGD with parameter groups and the warmup-then-cosine schedule, as a pure function of the step.

The schedule keeps no state beyond the global step, so resuming only needs the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spd_rewrite.train.config import TrainConfig

__all__ = ["Schedule", "apply_schedule", "build_optimizer"]

# Parameter group order: decayed weights, undecayed normalisation weights, biases.
_DECAYED, _NORM, _BIAS = 0, 1, 2


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Return SGD over ``model`` with weight decay only on weights of two or more dimensions.

    Group 0 contains conv and linear weights (decayed), group 1 other weights such as batch norm
    scales, group 2 all biases; a fixed order keeps optimizer state files comparable across runs.
    """
    groups: list[list[nn.Parameter]] = [[], [], []]
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith("bias"):
            groups[_BIAS].append(parameter)
        elif parameter.ndim >= 2:
            groups[_DECAYED].append(parameter)
        else:
            groups[_NORM].append(parameter)
    return torch.optim.SGD(
        [
            {"params": groups[_DECAYED], "weight_decay": config.weight_decay},
            {"params": groups[_NORM], "weight_decay": 0.0},
            {"params": groups[_BIAS], "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
    )


@dataclass(frozen=True)
class Schedule:
    """Learning rate and momentum for every step of a run."""

    config: TrainConfig
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.config.warmup_epochs * self.steps_per_epoch)

    def cosine_lr(self, step: int) -> float:
        """Return the cosine-decayed rate: ``lr`` at step 0, ``lr * final_lr_factor`` at the end."""
        progress = min(step / max(self.total_steps, 1), 1.0)
        final = self.config.final_lr_factor
        return self.config.lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))

    def values(self, step: int, group: int) -> tuple[float, float]:
        """Return ``(lr, momentum)`` of parameter group ``group`` at global step ``step``."""
        lr = self.cosine_lr(step)
        momentum = self.config.momentum
        if step >= self.warmup_steps:
            return lr, momentum
        # Linear warmup: weights rise from 0, biases fall from warmup_bias_lr when it is set.
        fraction = step / self.warmup_steps
        start_lr = (
            self.config.warmup_bias_lr if group == _BIAS and self.config.warmup_bias_lr else 0.0
        )
        lr = start_lr + (lr - start_lr) * fraction
        if self.config.warmup_momentum is not None:
            momentum = (
                self.config.warmup_momentum + (momentum - self.config.warmup_momentum) * fraction
            )
        return lr, momentum


def apply_schedule(optimizer: torch.optim.SGD, schedule: Schedule, step: int) -> None:
    """Set the learning rate and momentum of each parameter group for ``step``."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"], group["momentum"] = schedule.values(step, index)
