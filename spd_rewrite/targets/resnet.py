"""ResNet-18/34/50/101/152 with an ImageNet stem or a low-resolution stem.

The layout is the v1.5 one that torchvision uses: a Bottleneck block puts its stride on the 3x3
conv, and a shortcut whose shape changes is a 1x1 conv (carrying the stride) followed by BN. Module
names match torchvision's (``conv1``, ``layer2.0.downsample.0``, ``fc``), so state dicts of the
``imagenet`` stem load into torchvision's ``resnet*`` and back.

Stems:

* ``"imagenet"``: 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool. Made for 224x224 inputs.
* ``"lowres"``: 3x3 stride-1 conv, BN, ReLU and no max pool, the usual CIFAR variant for 32x32 and
  64x64 inputs. ``maxpool`` is then an ``nn.Identity`` so that both stems share one forward.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetStem",
    "resnet",
]

ResNetStem = Literal["imagenet", "lowres"]

# Blocks per stage for each depth, and whether the depth uses Bottleneck blocks.
_STAGE_BLOCKS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Return the 1x1 conv + BN projection, or None where the identity fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection. The first conv carries the stride."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet classifier: stem, four stages of residual blocks, global average pool, linear.

    The forward maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``. Stages 2 to 4 halve
    the spatial size in their first block, so ``imagenet`` reduces the input by 32 and ``lowres``
    by 8 before the pool.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_blocks: tuple[int, int, int, int],
        *,
        stem: ResNetStem = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "lowres":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"invalid ResNet stem {stem!r}; expected 'imagenet' or 'lowres'")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        channels = 64
        stages = []
        for index, (width, blocks) in enumerate(
            zip((64, 128, 256, 512), stage_blocks, strict=True)
        ):
            stride = 1 if index == 0 else 2
            layers = []
            for block_index in range(blocks):
                layers.append(block(channels, width, stride if block_index == 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming normal (fan_out) convs and unit BN, as torchvision initialises its ResNets.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet(
    depth: int,
    *,
    stem: ResNetStem = "imagenet",
    num_classes: int = 1000,
    in_channels: int = 3,
) -> ResNet:
    """Build a ResNet of the given depth (18, 34, 50, 101 or 152) with fresh weights.

    Raises:
        ValueError: ``depth`` or ``stem`` is not one of the supported values.
    """
    if depth not in _STAGE_BLOCKS:
        supported = ", ".join(str(d) for d in _STAGE_BLOCKS)
        raise ValueError(f"invalid ResNet depth {depth}; expected one of {supported}")
    stage_blocks, bottleneck = _STAGE_BLOCKS[depth]
    block = Bottleneck if bottleneck else BasicBlock
    return ResNet(block, stage_blocks, stem=stem, num_classes=num_classes, in_channels=in_channels)
