"""Box conversions and the complete IoU (CIoU) that the YOLOv5 box loss uses."""

from __future__ import annotations

import math

import torch

__all__ = ["complete_iou", "xywh_to_xyxy"]


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``(..., 4)`` centre x, centre y, width, height to corner x0, y0, x1, y1."""
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def complete_iou(boxes: torch.Tensor, references: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Return the CIoU of paired ``(n, 4)`` xywh boxes, a value in [-1.5, 1] per pair.

    CIoU = IoU - d^2 / c^2 - alpha * v, where d is the distance between the centres, c the diagonal
    of the smallest box enclosing both, v = 4 / pi^2 * (atan(w_ref / h_ref) - atan(w / h))^2
    measures the aspect mismatch, and alpha = v / (1 - IoU + v) is treated as a constant.
    """
    first, second = xywh_to_xyxy(boxes), xywh_to_xyxy(references)
    width_1, height_1 = boxes[:, 2], boxes[:, 3] + eps
    width_2, height_2 = references[:, 2], references[:, 3] + eps

    overlap = torch.min(first[:, 2:], second[:, 2:]) - torch.max(first[:, :2], second[:, :2])
    intersection = overlap.clamp(min=0).prod(dim=1)
    union = width_1 * height_1 + width_2 * height_2 - intersection + eps
    iou = intersection / union

    enclosing = torch.max(first[:, 2:], second[:, 2:]) - torch.min(first[:, :2], second[:, :2])
    diagonal_squared = enclosing.pow(2).sum(dim=1) + eps
    centre_distance_squared = (boxes[:, :2] - references[:, :2]).pow(2).sum(dim=1)
    aspect = (4 / math.pi**2) * (
        torch.atan(width_2 / height_2) - torch.atan(width_1 / height_1)
    ).pow(2)
    with torch.no_grad():
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (centre_distance_squared / diagonal_squared + aspect * alpha)
