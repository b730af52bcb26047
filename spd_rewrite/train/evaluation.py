"""``evaluate``: load trained weights and report validation metrics on a data set."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from spd_rewrite.io.checkpoint import apply_state_dict
from spd_rewrite.train.checkpoint import load_model_weights
from spd_rewrite.train.config import TrainConfig
from spd_rewrite.train.data import DataBundle, load_data
from spd_rewrite.train.distributed import DistributedContext, resolve_device
from spd_rewrite.train.modeling import amp_dtype, build_model
from spd_rewrite.train.validation import validate_classification, validate_detection
from spd_rewrite.train.yolo_loss import YoloLoss, find_detect_head

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics of one model on one data set."""

    target: str | None
    data: str
    task: str
    metrics: dict[str, float]
    """Classification: ``val_loss``, ``val_accuracy``. Detection: loss parts, AP ... AP_L."""
    num_images: int


def evaluate(
    target: str | nn.Module,
    weights: Path | None,
    data: str | Path | DataBundle,
    config: TrainConfig | None = None,
) -> EvalResult:
    """Evaluate ``target`` with ``weights`` on the validation set of ``data``.

    Args:
        target: a bundled target name or a module.
        weights: a ``model.safetensors`` written by :func:`train`, a checkpoint's ``last.json``
            or checkpoint folder, or None to use the module's current weights.
        data: a data spec or a loaded bundle.
        config: batch size, device, image size and detection thresholds; None uses defaults.
            When ``image_size`` is None, the size recorded with the weights is used.

    Raises:
        CheckpointError: the weights are missing, unreadable or do not fit the model.
        DataSpecError: the data spec cannot be read.
        TrainConfigError: the target's task differs from the data's.
    """
    config = config or TrainConfig()
    state, meta = load_model_weights(weights) if weights is not None else ({}, {})
    if config.image_size is None and meta.get("image_size") is not None:
        config = dataclasses.replace(config, image_size=int(meta["image_size"]))
    bundle = data if isinstance(data, DataBundle) else _load_bundle(data, config, weights)

    device = resolve_device(config.device)
    model, target_name = build_model(target, bundle)
    if weights is not None:
        # One line naming the first mismatching key, as for --weights of the rewrite command.
        apply_state_dict(model, state, source=str(weights))
    model = model.to(device)

    dtype = amp_dtype(config, device)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    loader = DataLoader(
        bundle.val,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=bundle.collate_fn,
    )
    if bundle.task == "classification":
        context = DistributedContext(0, 1, 0, device, owns_process_group=False)
        metrics = validate_classification(model, loader, context, autocast)
    else:
        loss_fn = YoloLoss(
            find_detect_head(model),
            bundle.input_size,
            box_gain=config.box_gain,
            obj_gain=config.obj_gain,
            cls_gain=config.cls_gain,
            anchor_threshold=config.anchor_threshold,
        )
        metrics = validate_detection(
            model, loader, device, config, loss_fn, bundle.num_classes, bundle.input_size, autocast
        )
    return EvalResult(
        target=target_name,
        data=bundle.name,
        task=bundle.task,
        metrics=metrics,
        num_images=len(bundle.val),  # type: ignore[arg-type]
    )


def _load_bundle(data: str | Path, config: TrainConfig, weights: Path | None) -> DataBundle:
    cache = config.data_cache
    if cache is None and config.out_dir is not None:
        cache = config.out_dir / "data"
    if cache is None and weights is not None:
        # Next to the weights of a training run, where train() generated its data.
        folder = weights if weights.is_dir() else weights.parent
        cache = (folder.parent if folder.name == "checkpoints" else folder) / "data"
    return load_data(
        data,
        image_size=config.image_size,
        augment=False,
        cache_dir=cache,
        split_seed=config.split_seed,
        val_fraction=config.val_fraction,
        synthetic_images=config.synthetic_images,
    )
