"""The training loop: ``train`` runs SGD over a data set, validates, logs and checkpoints.

Phases of a run: join the process group, settle the config (the saved one when resuming), load
the data, build the model and optimizer, restore a checkpoint, then per epoch train, validate,
append a metrics line and checkpoint. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from spd_rewrite.errors import CheckpointError, OutputFolderError
from spd_rewrite.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
    save_model,
)
from spd_rewrite.train.config import TrainConfig, TrainConfigError
from spd_rewrite.train.data import DataBundle, load_data
from spd_rewrite.train.distributed import DistributedContext, init_distributed
from spd_rewrite.train.modeling import amp_dtype, build_model
from spd_rewrite.train.optim import Schedule, apply_schedule, build_optimizer
from spd_rewrite.train.progress import epoch_progress
from spd_rewrite.train.validation import validate_classification, validate_detection
from spd_rewrite.train.yolo_loss import YoloLoss, find_detect_head

__all__ = ["TrainResult", "seed_everything", "train"]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
WEIGHTS_NAME = "model.safetensors"
# Settings a resumed run takes from the new config; all others come from the checkpoint.
_RESUME_OVERRIDES = ("resume", "stop_after_epoch", "progress", "num_workers", "device", "out_dir")


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`."""

    model: nn.Module
    """The trained model (not wrapped for distributed training)."""
    target: str | None
    task: str
    completed: bool
    """False when the run stopped early at ``stop_after_epoch``."""
    epochs_completed: int
    history: tuple[dict[str, Any], ...]
    """One metrics record per finished epoch, including epochs of earlier, resumed runs."""
    weights: Path | None
    """``out_dir/model.safetensors`` of a completed run on rank 0, else None."""

    @property
    def final_metrics(self) -> dict[str, Any]:
        return dict(self.history[-1]) if self.history else {}


def seed_everything(seed: int) -> None:
    """Seed the Python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    target: str | nn.Module, data: str | Path | DataBundle, config: TrainConfig
) -> TrainResult:
    """Train ``target`` on ``data`` with ``config`` and return the trained model and its metrics.

    Args:
        target: a bundled target name (built for the data's classes and input channels) or a
            module. Detection modules need a YOLOv5 Detect head.
        data: a data spec (see :func:`spd_rewrite.train.data.load_data`) or a loaded bundle.
        config: the run's settings. With ``config.resume`` the settings saved in the checkpoint
            are used, except for progress, device, workers and ``stop_after_epoch``.

    Under ``torchrun`` each process calls ``train``; the global batch ``config.batch_size`` is
    split evenly across processes and gradients are averaged by DistributedDataParallel.

    Raises:
        TrainConfigError: a setting does not fit the data, target or process count.
        DataSpecError: the data spec cannot be read.
        CheckpointError: resuming, but no valid checkpoint exists or it belongs to another run.
        OutputFolderError: ``out_dir`` already contains a run and ``resume`` is off.
    """
    context = init_distributed(config.device)
    try:
        return _Run(target, data, config, context).run()
    finally:
        context.close()


class _Run:
    def __init__(
        self,
        target: str | nn.Module,
        data: str | Path | DataBundle,
        config: TrainConfig,
        context: DistributedContext,
    ) -> None:
        self.context = context
        self.data_spec = data.name if isinstance(data, DataBundle) else str(data)
        self.checkpoint: Checkpoint | None = None

        # Config: the saved one when resuming.
        self.config = self._settle_config(config, target)
        self.out_dir = self.config.out_dir
        if self.config.batch_size % context.world_size:
            raise TrainConfigError(
                f"batch size {self.config.batch_size} does not split evenly over "
                f"{context.world_size} processes; use a multiple of {context.world_size}"
            )

        # Data.
        self.bundle = data if isinstance(data, DataBundle) else self._load_data(data)

        # Model, loss and optimizer.
        seed_everything(self.config.seed)
        model, self.target_name = build_model(target, self.bundle)
        self.model = self._place_model(model)
        self.amp = amp_dtype(self.config, context.device)
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=self.amp == torch.float16)
        self.loss_fn = self._build_loss()
        self.optimizer = build_optimizer(self.model, self.config)
        self.train_loader, self.loader_generator = self._train_loader()
        self.val_loader = self._val_loader()
        self.schedule = Schedule(self.config, len(self.train_loader))

        # Checkpoint: weights, optimizer and generator states.
        self.start_epoch, self.step = 0, 0
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        self.ddp_model = self._wrap_distributed()

    # Setup ---------------------------------------------------------------------------------

    def _settle_config(self, config: TrainConfig, target: str | nn.Module) -> TrainConfig:
        if config.out_dir is None:
            return config
        last = config.out_dir / "checkpoints" / "last.json"
        if not config.resume:
            if last.exists():
                raise OutputFolderError(
                    f"{config.out_dir} already contains a training run; resume it with resume=True "
                    "(--resume) or choose another output folder"
                )
            return config
        if not last.is_file():
            raise CheckpointError(f"no checkpoint to resume at {last}; start without --resume")
        self.checkpoint = load_checkpoint(last)
        meta = self.checkpoint.meta
        target_name = target if isinstance(target, str) else None
        if meta.get("target") != target_name or meta.get("data") != self.data_spec:
            raise CheckpointError(
                f"checkpoint {last} belongs to target {meta.get('target')!r} on data "
                f"{meta.get('data')!r}, not {target_name!r} on {self.data_spec!r}"
            )
        saved = TrainConfig.from_json(meta["config"])
        overrides = {name: getattr(config, name) for name in _RESUME_OVERRIDES}
        ignored = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if f.name not in overrides and getattr(config, f.name) != getattr(saved, f.name)
        ]
        if ignored:
            logger.warning(
                "resuming with the checkpoint's settings; ignoring new values of %s", ignored
            )
        return dataclasses.replace(saved, **overrides)

    def _load_data(self, spec: str | Path) -> DataBundle:
        cache = self.config.data_cache
        if cache is None and self.out_dir is not None:
            cache = self.out_dir / "data"
        if cache is None and spec == "synthetic-detection":
            raise TrainConfigError(
                "synthetic-detection needs out_dir or data_cache to generate into"
            )
        arguments: dict[str, Any] = {
            "image_size": self.config.image_size,
            "augment": self.config.augment,
            "cache_dir": cache,
            "split_seed": self.config.split_seed,
            "val_fraction": self.config.val_fraction,
            "synthetic_images": self.config.synthetic_images,
        }
        # Rank 0 generates a missing synthetic set while the others wait, then all read it.
        if self.context.is_main:
            bundle = load_data(spec, **arguments)
        self.context.barrier()
        if not self.context.is_main:
            bundle = load_data(spec, **arguments)
        return bundle

    def _place_model(self, model: nn.Module) -> nn.Module:
        device = self.context.device
        if self.config.sync_batchnorm and self.context.is_distributed:
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                logger.warning("SyncBatchNorm needs CUDA; each process keeps its own batch norm")
        model = model.to(device)
        if device.type == "cuda" and self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _build_loss(self) -> YoloLoss | None:
        if self.bundle.task != "detection":
            return None
        detect = find_detect_head(self.model)
        max_stride = int(detect.get_buffer("stride").max())
        if self.bundle.input_size % max_stride:
            raise TrainConfigError(
                f"image size {self.bundle.input_size} is not a multiple of the detector's largest "
                f"stride {max_stride}; set image_size to a multiple of {max_stride}"
            )
        return YoloLoss(
            detect,
            self.bundle.input_size,
            box_gain=self.config.box_gain,
            obj_gain=self.config.obj_gain,
            cls_gain=self.config.cls_gain,
            anchor_threshold=self.config.anchor_threshold,
        )

    def _train_loader(self) -> tuple[DataLoader[Any], torch.Generator]:
        # Shuffling depends on (seed, epoch) alone, so a resumed run gets the same order.
        sampler: DistributedSampler[Any] = DistributedSampler(
            self.bundle.train,
            num_replicas=self.context.world_size,
            rank=self.context.rank,
            shuffle=True,
            seed=self.config.seed,
        )
        generator = torch.Generator()
        loader = DataLoader(
            self.bundle.train,
            batch_size=self.config.batch_size // self.context.world_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            collate_fn=self.bundle.collate_fn,
            pin_memory=self.context.device.type == "cuda",
            generator=generator,
        )
        return loader, generator

    def _val_loader(self) -> DataLoader[Any]:
        dataset = self.bundle.val
        if self.bundle.task == "classification" and self.context.is_distributed:
            # Each process takes every world_size-th image; sums are combined afterwards.
            indices = range(self.context.rank, len(dataset), self.context.world_size)  # type: ignore[arg-type]
            dataset = Subset(dataset, list(indices))
        return DataLoader(
            dataset,
            batch_size=max(self.config.batch_size // self.context.world_size, 1),
            shuffle=False,
            num_workers=self.config.num_workers,
            collate_fn=self.bundle.collate_fn,
        )

    def _restore(self, checkpoint: Checkpoint) -> None:
        try:
            self.model.load_state_dict(checkpoint.model_state())
        except RuntimeError as error:
            raise CheckpointError(f"checkpoint weights do not fit the model: {error}") from error
        restore_training_state(checkpoint, self.optimizer)
        if checkpoint.meta["scaler"]:
            self.scaler.load_state_dict(checkpoint.meta["scaler"])
        restore_rng_state(checkpoint.tensors, checkpoint.meta["rng"])
        self.start_epoch, self.step = checkpoint.next_epoch, checkpoint.step
        logger.info("resuming at epoch %d, step %d", self.start_epoch + 1, self.step)

    def _wrap_distributed(self) -> nn.Module:
        if not self.context.is_distributed:
            return self.model
        device_ids = [self.context.device] if self.context.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    # Training ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=self.amp)

    def _compute_loss(
        self, output: Any, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loss_fn is None:
            loss = F.cross_entropy(output.float(), targets.to(self.context.device))
            return loss, loss.detach().view(1)
        loss, parts = self.loss_fn(output, targets)
        # DDP averages gradients over processes; scaling by their count keeps YOLOv5's
        # sum-over-batch gradient size of a one-process run with the same global batch.
        return loss * self.context.world_size, parts

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.train_loader.sampler
        assert isinstance(sampler, DistributedSampler)
        sampler.set_epoch(epoch)
        self.loader_generator.manual_seed(self.config.seed * 100_003 + epoch)
        yield from self.train_loader

    def _train_epoch(self, epoch: int, advance: Callable[[float], None]) -> dict[str, float]:
        self.ddp_model.train()
        device = self.context.device
        sums = torch.zeros(4 if self.loss_fn else 2, dtype=torch.float64, device=device)
        for images, targets in self._batches(epoch):
            apply_schedule(self.optimizer, self.schedule, self.step)
            images = images.to(device, non_blocking=True)
            if device.type == "cuda" and self.config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                output = self.ddp_model(images)
            loss, parts = self._compute_loss(output, targets)

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1

            sums[0] += len(images)
            sums[1:] += parts.to(sums) * len(images)
            advance(float(parts.sum()))
        totals = self.context.all_reduce_sum(sums).tolist()
        count = totals[0]
        if self.loss_fn is None:
            return {"train_loss": totals[1] / count}
        box, obj, cls = (value / count for value in totals[1:])
        return {
            "train_loss": box + obj + cls,
            "train_box_loss": box,
            "train_obj_loss": obj,
            "train_cls_loss": cls,
        }

    def _validate(self) -> dict[str, float]:
        if self.loss_fn is None:
            return validate_classification(
                self.model, self.val_loader, self.context, self._autocast
            )
        metrics: dict[str, float] = {}
        # NOTE: detection is validated on rank 0 alone while the other processes wait.
        if self.context.is_main:
            metrics = validate_detection(
                self.model,
                self.val_loader,
                self.context.device,
                self.config,
                self.loss_fn,
                self.bundle.num_classes,
                self.bundle.input_size,
                self._autocast,
            )
        self.context.barrier()
        return metrics

    # Output --------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "target": self.target_name,
            "data": self.data_spec,
            "task": self.bundle.task,
            "num_classes": self.bundle.num_classes,
            "in_channels": self.bundle.in_channels,
            "image_size": self.bundle.input_size,
            "class_names": list(self.bundle.class_names),
            "world_size": self.context.world_size,
            "config": self.config.to_json(),
        }

    def _read_history(self) -> list[dict[str, Any]]:
        if self.out_dir is None or not (self.out_dir / METRICS_NAME).is_file():
            return []
        lines = (self.out_dir / METRICS_NAME).read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if r["epoch"] <= self.start_epoch]

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        if self.out_dir is None or not self.context.is_main:
            return
        text = "".join(json.dumps(record) + "\n" for record in history)
        (self.out_dir / METRICS_NAME).write_text(text)

    def _save_checkpoint(self, next_epoch: int) -> None:
        if self.out_dir is None or not self.context.is_main:
            return
        save_checkpoint(
            self.out_dir / "checkpoints",
            model=self.model,
            optimizer=self.optimizer,
            scaler_state=self.scaler.state_dict(),
            next_epoch=next_epoch,
            step=self.step,
            meta=self._meta(),
        )

    def run(self) -> TrainResult:
        config = self.config
        if self.out_dir is not None and self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        history = self._read_history()
        self._write_history(history)
        last_epoch = config.epochs
        if config.stop_after_epoch is not None:
            last_epoch = min(config.stop_after_epoch, config.epochs)

        show = config.progress and self.context.is_main
        with epoch_progress(show) as progress:
            for epoch in range(self.start_epoch, last_epoch):
                started = time.perf_counter()
                advance = progress.start_epoch(epoch, config.epochs, len(self.train_loader))
                record: dict[str, Any] = {"epoch": epoch + 1}
                record.update(self._train_epoch(epoch, advance))
                record["lr"] = self.optimizer.param_groups[0]["lr"]
                if (epoch + 1) % config.eval_interval == 0 or epoch + 1 == config.epochs:
                    record.update(self._validate())
                record["seconds"] = time.perf_counter() - started
                history.append(record)
                logger.info("epoch %d/%d: %s", epoch + 1, config.epochs, _format_record(record))

                # The metrics line goes first: a resumed run drops lines past its checkpoint.
                self._write_history(history)
                self._save_checkpoint(epoch + 1)

        completed = last_epoch == config.epochs
        weights = None
        if completed and self.out_dir is not None and self.context.is_main:
            weights = self.out_dir / WEIGHTS_NAME
            save_model(weights, self.model, self._meta())
        self.context.barrier()
        return TrainResult(
            model=self.model,
            target=self.target_name,
            task=self.bundle.task,
            completed=completed,
            epochs_completed=max(last_epoch, self.start_epoch),
            history=tuple(history),
            weights=weights,
        )


def _format_record(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in record.items()
        if key != "epoch"
    )
