"""Tensor-level image helpers shared by the classification data sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_flip_crop", "resize_images"]


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``(N, C, size, size)``, with antialiasing to shrink."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < images.shape[-1] or size < images.shape[-2]
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking
    )


def random_flip_crop(image: torch.Tensor, padding: int) -> torch.Tensor:
    """Flip ``(C, H, W)`` horizontally with probability 0.5, then crop it from a zero-padded copy.

    Draws from torch's global generator, which the training loop seeds and checkpoints.
    """
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    if padding == 0:
        return image
    _, height, width = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    return padded[:, top : top + height, left : left + width]
