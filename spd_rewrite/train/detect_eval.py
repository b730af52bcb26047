"""Detection post-processing (score threshold and NMS) and COCO-style metrics via pycocotools.

Boxes are in the pixels of the network input. COCO's size classes therefore apply to the
resized image: small below 32x32 pixels of area, medium up to 96x96, large above.
"""

from __future__ import annotations

import contextlib
import io
import math

import torch
from torchvision.ops import batched_nms

from spd_rewrite.train.boxes import xywh_to_xyxy

__all__ = ["METRIC_NAMES", "coco_metrics", "postprocess", "targets_to_pixel_boxes"]

# The first six entries of COCOeval.stats, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


def postprocess(
    decoded: torch.Tensor,
    *,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_detections: int = 300,
) -> list[torch.Tensor]:
    """Turn decoded YOLO outputs into per-image detections.

    Args:
        decoded: ``(N, boxes, 5 + nc)``: cx, cy, w, h in pixels, objectness and class
            probabilities (after the sigmoid).
        conf_threshold: minimum of objectness times class probability. A box may yield one
            detection per class above it.
        iou_threshold: class-wise NMS threshold (``torchvision.ops.batched_nms``).
        max_detections: detections kept per image, highest scores first.

    Returns:
        One ``(k, 6)`` tensor per image: x0, y0, x1, y1, score, class.
    """
    results = []
    for prediction in decoded.float():
        prediction = prediction[prediction[:, 4] > conf_threshold]
        scores = prediction[:, 5:] * prediction[:, 4:5]
        box_index, classes = (scores > conf_threshold).nonzero(as_tuple=True)
        boxes = xywh_to_xyxy(prediction[box_index, :4])
        box_scores = scores[box_index, classes]
        keep = batched_nms(boxes, box_scores, classes, iou_threshold)[:max_detections]
        results.append(
            torch.cat((boxes[keep], box_scores[keep, None], classes[keep, None].float()), dim=1)
        )
    return results


def targets_to_pixel_boxes(
    targets: torch.Tensor, batch_size: int, image_size: int
) -> list[torch.Tensor]:
    """Split collated ``(M, 6)`` targets per image into ``(k, 5)``: class, x0, y0, x1, y1 in px."""
    per_image = []
    for index in range(batch_size):
        rows = targets[targets[:, 0] == index]
        corners = xywh_to_xyxy(rows[:, 2:6] * image_size)
        per_image.append(torch.cat((rows[:, 1:2], corners), dim=1))
    return per_image


def _coco_images(count: int, image_size: int) -> list[dict[str, int]]:
    return [{"id": i + 1, "width": image_size, "height": image_size} for i in range(count)]


def _box_entry(index: int, image: int, box: list[float], category: int) -> dict[str, object]:
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    return {
        "id": index,
        "image_id": image,
        "category_id": category,
        "bbox": [x0, y0, width, height],
        "area": width * height,
        "iscrowd": 0,
    }


def coco_metrics(
    ground_truth: list[torch.Tensor],
    detections: list[torch.Tensor],
    num_classes: int,
    image_size: int,
) -> dict[str, float]:
    """Return AP (IoU 0.5:0.95), AP50, AP75, AP_S, AP_M and AP_L from pycocotools' COCOeval.

    Args:
        ground_truth: per image, ``(k, 5)``: class, x0, y0, x1, y1 in pixels.
        detections: per image, ``(k, 6)``: x0, y0, x1, y1, score, class (as from
            :func:`postprocess`).
        num_classes: number of classes.
        image_size: side of the square images in pixels.

    A size class without ground truth boxes gets NaN (COCOeval reports -1 there).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = _coco_images(len(ground_truth), image_size)
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    truth_entries: list[dict[str, object]] = []
    detection_entries: list[dict[str, object]] = []
    for image, (truth, found) in enumerate(zip(ground_truth, detections, strict=True), start=1):
        for row in truth.tolist():
            truth_entries.append(
                _box_entry(len(truth_entries) + 1, image, row[1:5], int(row[0]) + 1)
            )
        for row in found.tolist():
            entry = _box_entry(len(detection_entries) + 1, image, row[:4], int(row[5]) + 1)
            entry["score"] = row[4]
            detection_entries.append(entry)

    # Both sides are built in memory; COCO() with no file and createIndex() is the documented way.
    coco_truth, coco_detections = COCO(), COCO()
    for coco, entries in ((coco_truth, truth_entries), (coco_detections, detection_entries)):
        coco.dataset = {
            "info": {},
            "images": images,
            "categories": categories,
            "annotations": entries,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()

    evaluator = COCOeval(coco_truth, coco_detections, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: (math.nan if value < 0 else float(value))
        for name, value in zip(METRIC_NAMES, evaluator.stats[:6], strict=True)
    }
