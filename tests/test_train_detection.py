"""Detection: YOLO-format reader, the synthetic set, the YOLOv5 loss, NMS and COCO metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from spd_rewrite.targets import build_target
from spd_rewrite.train import (
    DataSpecError,
    SyntheticDetectionSettings,
    TrainConfig,
    YoloLoss,
    coco_metrics,
    evaluate,
    load_data,
    postprocess,
    train,
    write_synthetic_detection,
)
from spd_rewrite.train.boxes import complete_iou
from spd_rewrite.train.data_yolo import collate_detection
from spd_rewrite.train.yolo_loss import find_detect_head

# YOLO-format reader -------------------------------------------------------------------------


def write_yolo_set(root: Path, label_line: str = "1 0.5 0.25 0.2 0.1") -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (40, 20), (10, 20, 30)).save(root / "images" / split / "a.png")
        Image.new("L", (40, 20), 0).save(root / "images" / split / "b.jpg")
        (root / "labels" / split / "a.txt").write_text(f"0 0.1 0.1 0.1 0.1\n{label_line}\n")
    yaml_path = root / "set.yaml"
    yaml_path.write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    return yaml_path


def test_yolo_reader(tmp_path: Path) -> None:
    bundle = load_data(write_yolo_set(tmp_path), image_size=32)
    assert bundle.task == "detection"
    assert bundle.class_names == ("cat", "dog")
    image, boxes = bundle.train[0]
    assert image.shape == (3, 32, 32)
    expected = torch.tensor([[0, 0.1, 0.1, 0.1, 0.1], [1, 0.5, 0.25, 0.2, 0.1]])
    torch.testing.assert_close(boxes, expected)
    # b.jpg has no label file: an image without objects, read as RGB.
    grey, no_boxes = bundle.train[1]
    assert grey.shape == (3, 32, 32)
    assert no_boxes.shape == (0, 5)

    images, targets = collate_detection([bundle.train[0], bundle.train[1], bundle.train[0]])
    assert images.shape == (3, 3, 32, 32)
    assert targets.shape == (4, 6)
    assert targets[:, 0].tolist() == [0, 0, 2, 2]


def test_yolo_reader_rejects_bad_label(tmp_path: Path) -> None:
    yaml_path = write_yolo_set(tmp_path, label_line="5 0.5 0.5 0.1 0.1")
    with pytest.raises(DataSpecError, match=r"a\.txt:2: class 5.0 is not in 0..1"):
        load_data(yaml_path)


# Synthetic set ------------------------------------------------------------------------------


def test_synthetic_set_boxes(tmp_path: Path) -> None:
    settings = SyntheticDetectionSettings(
        num_train=12, num_val=4, image_size=64, min_object_size=5, max_object_size=20, seed=3
    )
    yaml_path = write_synthetic_detection(tmp_path / "set", settings)
    bundle = load_data(yaml_path)
    assert bundle.num_classes == 10
    assert bundle.input_size == 64
    assert len(bundle.train) == 12
    assert len(bundle.val) == 4

    boxes = torch.cat([bundle.train[i][1] for i in range(12)])
    assert len(boxes) >= 12
    corners_low = boxes[:, 1:3] - boxes[:, 3:5] / 2
    corners_high = boxes[:, 1:3] + boxes[:, 3:5] / 2
    assert corners_low.min() >= 0
    assert corners_high.max() <= 1
    # A glyph's box spans its full scaled height, so heights are the glyph sizes.
    heights = boxes[:, 4] * 64
    assert heights.min() >= 5 - 1e-3
    assert heights.max() <= 20 + 1e-3
    assert (boxes[:, 3] <= boxes[:, 4] + 1e-6).all()
    assert set(boxes[:, 0].long().tolist()) <= set(range(10))


def test_synthetic_set_is_reproducible(tmp_path: Path) -> None:
    settings = SyntheticDetectionSettings(num_train=2, num_val=1, image_size=32, max_object_size=12)
    first = write_synthetic_detection(tmp_path / "a", settings).parent
    second = write_synthetic_detection(tmp_path / "b", settings).parent
    for relative in ("images/train/00001.png", "labels/train/00001.txt", "labels/val/00000.txt"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


# Loss ---------------------------------------------------------------------------------------


def test_complete_iou_values() -> None:
    box = torch.tensor([[5.0, 5.0, 2.0, 4.0]])
    assert complete_iou(box, box).item() == pytest.approx(1.0, abs=1e-6)
    # Same size, centres 2 apart along x: IoU 0 (touching), enclosing box 4 x 4.
    moved = torch.tensor([[7.0, 5.0, 2.0, 4.0]])
    assert complete_iou(box, moved).item() == pytest.approx(0 - 4 / 32, abs=1e-6)


def test_detection_loss_falls_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_target("yolov5n", num_classes=3)
    model.train()
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor(
        [[0, 0, 0.3, 0.3, 0.2, 0.25], [0, 2, 0.7, 0.6, 0.1, 0.1], [1, 1, 0.5, 0.5, 0.5, 0.4]]
    )
    loss_fn = YoloLoss(find_detect_head(model), image_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses, box_losses = [], []
    for _ in range(15):
        loss, parts = loss_fn(model(images), targets)
        assert parts.shape == (3,)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        box_losses.append(parts[0].item())
    assert losses[-1] < losses[0] * 0.7
    assert box_losses[-1] < box_losses[0] * 0.7


def test_detection_loss_without_targets() -> None:
    model = build_target("yolov5n", num_classes=2)
    model.train()
    loss, parts = YoloLoss(find_detect_head(model), image_size=64)(
        model(torch.rand(1, 3, 64, 64)), torch.zeros((0, 6))
    )
    assert parts[0] == 0
    assert parts[2] == 0
    assert loss > 0


# Post-processing and metrics ----------------------------------------------------------------


def test_postprocess_suppresses_duplicates() -> None:
    # Two boxes of class 1 overlapping at IoU 0.9, one box of class 0 elsewhere.
    decoded = torch.tensor(
        [
            [
                [20.0, 20.0, 10.0, 10.0, 0.9, 0.1, 0.9],
                [20.5, 20.0, 10.0, 10.0, 0.8, 0.1, 0.9],
                [50.0, 50.0, 8.0, 8.0, 0.7, 0.9, 0.1],
            ]
        ]
    )
    (detections,) = postprocess(decoded, conf_threshold=0.2, iou_threshold=0.6)
    assert detections[:, 5].tolist() == [1.0, 0.0]
    assert detections[0, :4].tolist() == pytest.approx([15.0, 15.0, 25.0, 25.0])
    assert detections[0, 4].item() == pytest.approx(0.81)


def truth_and_detections(shift: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two images, one 20x20 box each; detections are the boxes moved ``shift`` pixels right."""
    truth = [
        torch.tensor([[0, 10.0, 10.0, 30.0, 30.0]]),
        torch.tensor([[1, 40.0, 40.0, 60.0, 60.0]]),
    ]
    found = [
        torch.tensor([[10.0 + shift, 10.0, 30.0 + shift, 30.0, 0.9, 0]]),
        torch.tensor([[40.0 + shift, 40.0, 60.0 + shift, 60.0, 0.8, 1]]),
    ]
    return truth, found


def test_coco_metrics_perfect() -> None:
    metrics = coco_metrics(*truth_and_detections(0.0), num_classes=2, image_size=64)
    for name in ("AP", "AP50", "AP75", "AP_S"):
        assert metrics[name] == pytest.approx(1.0), name
    # No box is medium or large, so COCOeval has nothing to average there.
    assert math.isnan(metrics["AP_M"])
    assert math.isnan(metrics["AP_L"])


def test_coco_metrics_shifted() -> None:
    # A 2-pixel shift gives IoU 360 / 440 = 0.818: matched at thresholds 0.50 ... 0.80,
    # 7 of the 10, so AP = 0.7 while AP50 and AP75 stay 1.
    metrics = coco_metrics(*truth_and_detections(2.0), num_classes=2, image_size=64)
    assert metrics["AP"] == pytest.approx(0.7)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    # A 10-pixel shift gives IoU 200 / 600 = 0.33, below every threshold.
    metrics = coco_metrics(*truth_and_detections(10.0), num_classes=2, image_size=64)
    assert metrics["AP"] == 0.0
    assert metrics["AP50"] == 0.0


def test_coco_metrics_without_detections() -> None:
    truth, _ = truth_and_detections(0.0)
    metrics = coco_metrics(truth, [torch.zeros((0, 6))] * 2, num_classes=2, image_size=64)
    assert metrics["AP"] == 0.0


# End to end ---------------------------------------------------------------------------------


def test_train_and_evaluate_detection(tmp_path: Path) -> None:
    config = TrainConfig.from_recipe(
        "yolov5",
        epochs=1,
        batch_size=8,
        image_size=64,
        synthetic_images=(8, 4),
        out_dir=tmp_path / "run",
        progress=False,
    )
    result = train("yolov5n", "synthetic-detection", config)
    assert result.completed
    metrics = result.final_metrics
    for name in ("train_box_loss", "train_obj_loss", "train_cls_loss", "AP", "AP50", "AP_S"):
        assert name in metrics, name
    assert 0.0 <= metrics["AP50"] <= 1.0

    evaluated = evaluate("yolov5n", result.weights, "synthetic-detection", config)
    assert evaluated.num_images == 4
    assert evaluated.metrics["AP50"] == pytest.approx(metrics["AP50"])
    assert evaluated.metrics["val_box_loss"] == pytest.approx(metrics["val_box_loss"], rel=1e-4)
