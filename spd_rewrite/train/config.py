"""The training configuration: every setting that ``train`` and ``evaluate`` read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spd_rewrite.errors import SpdRewriteError

__all__ = ["AmpMode", "DeviceChoice", "TrainConfig", "TrainConfigError"]

DeviceChoice = Literal["auto", "cpu", "cuda"]
AmpMode = Literal["auto", "off", "bf16", "fp16"]


class TrainConfigError(SpdRewriteError):
    """A training setting is invalid or does not fit the data or the target."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training or evaluation run.

    The defaults are generic; use :meth:`from_recipe` to start from a recipe in
    :mod:`spd_rewrite.train.recipes`.
    """

    epochs: int = 10
    batch_size: int = 64
    """Global batch size, summed over all processes of a distributed run."""
    lr: float = 0.01
    """Peak learning rate, reached at the end of warmup."""
    final_lr_factor: float = 0.01
    """The cosine decay ends at ``lr * final_lr_factor`` after the last step."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    """L2 penalty on conv and linear weights; biases and normalisation weights get none."""
    nesterov: bool = False
    warmup_epochs: float = 0.0
    """Epochs over which the learning rate rises linearly from 0 to the cosine schedule."""
    warmup_momentum: float | None = None
    """Momentum at step 0, raised linearly to ``momentum`` during warmup; None keeps it fixed."""
    warmup_bias_lr: float | None = None
    """Learning rate of biases at step 0, lowered linearly to the schedule during warmup."""
    image_size: int | None = None
    """Square input size in pixels; None keeps the data set's native size."""
    augment: bool = True
    """Random flips and padded crops for CIFAR-10 and image folders; not for digits or detection."""
    seed: int = 0
    """Seed of model initialisation, data order and augmentation."""
    split_seed: int = 0
    """Seed of the digits train/validation split, apart from ``seed`` so all seeds share a split."""
    val_fraction: float = 0.2
    """Share of the digits set held out for validation."""
    device: DeviceChoice = "auto"
    amp: AmpMode = "auto"
    """Mixed precision on CUDA: ``auto`` picks bf16 where supported, else fp16. Ignored on CPU."""
    channels_last: bool = True
    """Use the channels-last memory format on CUDA. Ignored on CPU."""
    sync_batchnorm: bool = False
    """Convert batch norm to ``SyncBatchNorm`` in a distributed run."""
    num_workers: int = 0
    """Data loader worker processes per training process."""
    out_dir: Path | None = None
    """Folder for metrics, checkpoints, final weights and generated data; None writes nothing."""
    data_cache: Path | None = None
    """Folder for generated data sets; None uses ``out_dir/data`` (in ``evaluate``, the
    ``data`` folder of the training run that wrote the weights)."""
    resume: bool = False
    """Continue from ``out_dir/checkpoints/last.json``.

    NOTE: a resumed run reproduces an uninterrupted one bit for bit on CPU (tested); on CUDA,
    nondeterministic kernels can make the weights differ slightly.
    """
    stop_after_epoch: int | None = None
    """Stop after this many epochs, as if killed, leaving a checkpoint to resume from."""
    eval_interval: int = 1
    """Validate every this many epochs, and always after the last one."""
    progress: bool = True
    """Show rich progress bars; they are also hidden when stderr is not a terminal."""
    # Detection.
    anchor_threshold: float = 4.0
    """A target matches an anchor when both side ratios are below this factor."""
    box_gain: float = 0.05
    obj_gain: float = 1.0
    cls_gain: float = 0.5
    conf_threshold: float = 0.001
    """Minimum objectness times class score of a kept detection."""
    nms_iou_threshold: float = 0.6
    max_detections: int = 300
    synthetic_images: tuple[int, int] = (400, 100)
    """Train and validation images of the built-in ``synthetic-detection`` set."""
    recipe: str | None = None
    """Name of the recipe the values came from, recorded in checkpoints."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values recorded with the run (for example the command line)."""

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_recipe(cls, recipe: str | None, **overrides: Any) -> TrainConfig:
        """Build a config from a recipe in :data:`spd_rewrite.train.recipes.RECIPES`.

        Keyword arguments override recipe values; a value of None is ignored, so CLI options
        that were not given can be passed through unchanged.

        Raises:
            TrainConfigError: the recipe or an override name is unknown.
        """
        from spd_rewrite.train.recipes import recipe_values

        values = recipe_values(recipe) if recipe is not None else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TrainConfigError(f"unknown training settings {unknown}; valid: {sorted(names)}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(recipe=recipe, **values)

    def to_json(self) -> dict[str, Any]:
        """Return the settings as JSON-compatible values (paths as strings)."""
        values = dataclasses.asdict(self)
        for key in ("out_dir", "data_cache"):
            if values[key] is not None:
                values[key] = str(values[key])
        values["synthetic_images"] = list(self.synthetic_images)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild a config written by :meth:`to_json`, ignoring settings this version lacks."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in names}
        for key in ("out_dir", "data_cache"):
            if kept.get(key) is not None:
                kept[key] = Path(kept[key])
        if "synthetic_images" in kept:
            kept["synthetic_images"] = tuple(kept["synthetic_images"])
        return cls(**kept)


def _validate(config: TrainConfig) -> None:
    positive = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "eval_interval": config.eval_interval,
        "max_detections": config.max_detections,
    }
    for name, value in positive.items():
        if value < 1:
            raise TrainConfigError(f"invalid {name} {value}; use 1 or more")
    if config.lr <= 0:
        raise TrainConfigError(f"invalid lr {config.lr}; use a positive learning rate")
    if not 0 <= config.final_lr_factor <= 1:
        raise TrainConfigError(
            f"invalid final_lr_factor {config.final_lr_factor}; use a value in [0, 1]"
        )
    if config.warmup_epochs < 0:
        raise TrainConfigError(f"invalid warmup_epochs {config.warmup_epochs}; use 0 or more")
    if config.image_size is not None and config.image_size < 1:
        raise TrainConfigError(f"invalid image_size {config.image_size}; use 1 or more pixels")
    if not 0 < config.val_fraction < 1:
        raise TrainConfigError(f"invalid val_fraction {config.val_fraction}; use a value in (0, 1)")
    if config.device not in ("auto", "cpu", "cuda"):
        raise TrainConfigError(f"invalid device {config.device!r}; use auto, cpu or cuda")
    if config.amp not in ("auto", "off", "bf16", "fp16"):
        raise TrainConfigError(f"invalid amp {config.amp!r}; use auto, off, bf16 or fp16")
    if config.stop_after_epoch is not None and config.stop_after_epoch < 1:
        raise TrainConfigError(f"invalid stop_after_epoch {config.stop_after_epoch}; use 1 or more")
    if config.resume and config.out_dir is None:
        raise TrainConfigError("resume needs out_dir, the folder of the run to continue")
    if config.num_workers < 0:
        raise TrainConfigError(f"invalid num_workers {config.num_workers}; use 0 or more")
