"""Validation passes shared by training and ``evaluate``: accuracy, or COCO detection metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from spd_rewrite.train.config import TrainConfig
from spd_rewrite.train.detect_eval import coco_metrics, postprocess, targets_to_pixel_boxes
from spd_rewrite.train.distributed import DistributedContext
from spd_rewrite.train.yolo_loss import YoloLoss

__all__ = ["validate_classification", "validate_detection"]


@torch.no_grad()
def validate_classification(
    model: nn.Module,
    loader: DataLoader[Any],
    context: DistributedContext,
    autocast: Callable[[], Any],
) -> dict[str, float]:
    """Return ``val_loss`` (mean cross-entropy) and ``val_accuracy`` (top-1, in [0, 1]).

    Each process passes its own shard of the set; the sums are added over all processes.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    for images, labels in loader:
        images, labels = images.to(context.device), labels.to(context.device)
        with autocast():
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
    loss_sum, correct, count = context.all_reduce_sum(totals).tolist()
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count}


@torch.no_grad()
def validate_detection(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    config: TrainConfig,
    loss_fn: YoloLoss,
    num_classes: int,
    image_size: int,
    autocast: Callable[[], Any],
) -> dict[str, float]:
    """Return the validation loss parts and COCO AP, AP50, AP75, AP_S, AP_M, AP_L of one process."""
    model.eval()
    truth: list[torch.Tensor] = []
    found: list[torch.Tensor] = []
    parts_sum = torch.zeros(3)
    batches = 0
    for images, targets in loader:
        images = images.to(device)
        with autocast():
            decoded, raw = model(images)
        _, parts = loss_fn(raw, targets)
        parts_sum += parts.cpu()
        batches += 1
        detections = postprocess(
            decoded,
            conf_threshold=config.conf_threshold,
            iou_threshold=config.nms_iou_threshold,
            max_detections=config.max_detections,
        )
        found.extend(d.cpu() for d in detections)
        truth.extend(targets_to_pixel_boxes(targets, len(images), image_size))

    metrics = coco_metrics(truth, found, num_classes, image_size)
    box, obj, cls = (parts_sum / max(batches, 1)).tolist()
    return {"val_box_loss": box, "val_obj_loss": obj, "val_cls_loss": cls, **metrics}
