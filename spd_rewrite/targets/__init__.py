"""Bundled target models (ResNet, YOLOv5 v6.0) and the registry that names and builds them."""

from spd_rewrite.targets.registry import (
    TargetInfo,
    TargetTask,
    build_target,
    get_target,
    list_targets,
)
from spd_rewrite.targets.resnet import ResNet, ResNetStem, resnet
from spd_rewrite.targets.yolov5 import (
    COCO_ANCHORS,
    YOLOV5_LAYERS,
    YOLOV5_VARIANTS,
    YOLOv5,
    compute_strides,
    find_detect,
    yolov5,
)
from spd_rewrite.targets.yolov5_layers import Detect

__all__ = [
    "COCO_ANCHORS",
    "YOLOV5_LAYERS",
    "YOLOV5_VARIANTS",
    "Detect",
    "ResNet",
    "ResNetStem",
    "TargetInfo",
    "TargetTask",
    "YOLOv5",
    "build_target",
    "compute_strides",
    "find_detect",
    "get_target",
    "list_targets",
    "resnet",
    "yolov5",
]
