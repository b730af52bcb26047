"""Training and evaluation of the bundled targets: data sets, loops, YOLOv5 loss, metrics, plots."""

from spd_rewrite.train.checkpoint import load_checkpoint, load_model_weights
from spd_rewrite.train.config import TrainConfig, TrainConfigError
from spd_rewrite.train.data import DataBundle, DataSpecError, load_data
from spd_rewrite.train.detect_eval import coco_metrics, postprocess
from spd_rewrite.train.evaluation import EvalResult, evaluate
from spd_rewrite.train.loop import TrainResult, train
from spd_rewrite.train.plots import plot_accuracy_vs_resolution, plot_training_curves
from spd_rewrite.train.recipes import RECIPES
from spd_rewrite.train.synth_detection import (
    SyntheticDetectionSettings,
    write_synthetic_detection,
)
from spd_rewrite.train.yolo_loss import YoloLoss

__all__ = [
    "RECIPES",
    "DataBundle",
    "DataSpecError",
    "EvalResult",
    "SyntheticDetectionSettings",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "YoloLoss",
    "coco_metrics",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "load_model_weights",
    "plot_accuracy_vs_resolution",
    "plot_training_curves",
    "postprocess",
    "train",
    "write_synthetic_detection",
]
