"""Data set specs: the built-in names and the folder layouts that ``train`` and ``evaluate`` read.

A spec is one of

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (classification);
* ``synthetic-detection``: small digit glyphs on cluttered canvases, generated on first use
  into the cache folder (detection, YOLO format);
* a folder with ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``: CIFAR-10 python batches;
* a folder with ``train/<class>/`` and ``val/val_annotations.txt``: the Tiny ImageNet layout;
* a ``.yaml`` file, or a folder that contains ``data.yaml``: a YOLO-format detection set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from spd_rewrite.errors import SpdRewriteError

__all__ = ["DataBundle", "DataSpecError", "Task", "load_data"]

Task = Literal["classification", "detection"]


class DataSpecError(SpdRewriteError):
    """A data spec names no built-in set, or its files are missing or malformed."""


@dataclass(frozen=True)
class DataBundle:
    """A train and a validation set with what a model needs to know about them.

    Classification items are ``(image, label)``. Detection items are ``(image, boxes)``, where
    ``boxes`` has shape ``(k, 5)``: class, then centre x, centre y, width and height as fractions
    of the image size. Images are float tensors ``(C, H, W)``.
    """

    name: str
    task: Task
    train: Dataset[Any]
    val: Dataset[Any]
    num_classes: int
    in_channels: int
    input_size: int
    """Square side of the images in pixels."""
    class_names: tuple[str, ...]
    collate_fn: Callable[[list[Any]], Any] | None = None


def load_data(
    spec: str | Path,
    *,
    image_size: int | None = None,
    augment: bool = True,
    cache_dir: Path | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    synthetic_images: tuple[int, int] = (400, 100),
) -> DataBundle:
    """Load the data set that ``spec`` names (see the module docstring for the accepted specs).

    Args:
        spec: a built-in name or a path.
        image_size: square size to resize images to; None keeps the native size (for
            ``synthetic-detection`` it sets the canvas size, default 128).
        augment: random flips and padded crops for CIFAR-10 and image folders.
        cache_dir: folder that generated sets are written to; needed for ``synthetic-detection``.
        split_seed: seed of the digits train/validation split.
        val_fraction: share of the digits set held out for validation.
        synthetic_images: train and validation images of ``synthetic-detection``.

    Raises:
        DataSpecError: the spec matches no built-in name or known layout, or files are malformed.
    """
    from spd_rewrite.train import data_cifar, data_digits, data_folder, data_yolo, synth_detection

    text = str(spec)
    if text == "digits":
        return data_digits.load_digits_data(
            image_size=image_size, split_seed=split_seed, val_fraction=val_fraction
        )
    if text == "synthetic-detection":
        if cache_dir is None:
            raise DataSpecError(
                "synthetic-detection needs a cache folder to generate into; "
                "set out_dir or data_cache"
            )
        settings = synth_detection.SyntheticDetectionSettings(
            num_train=synthetic_images[0],
            num_val=synthetic_images[1],
            image_size=image_size or 128,
        )
        yaml_path = synth_detection.ensure_synthetic_detection(cache_dir, settings)
        return data_yolo.load_yolo_data(yaml_path, image_size=image_size)

    path = Path(spec)
    if not path.exists():
        raise DataSpecError(
            f"data {text!r} is neither a built-in set (digits, synthetic-detection) nor an "
            "existing path"
        )
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return data_yolo.load_yolo_data(path, image_size=image_size)
    if path.is_dir() and (path / "data.yaml").is_file():
        return data_yolo.load_yolo_data(path / "data.yaml", image_size=image_size)
    if path.is_dir() and (path / "data_batch_1").is_file():
        return data_cifar.load_cifar10_data(path, image_size=image_size, augment=augment)
    if path.is_dir() and (path / "val" / "val_annotations.txt").is_file():
        return data_folder.load_image_folder_data(path, image_size=image_size, augment=augment)
    raise DataSpecError(
        f"cannot tell the layout of {text!r}: expected a YOLO .yaml file or a folder with "
        "data.yaml, CIFAR-10 batches (data_batch_1, ...), or train/ and val/val_annotations.txt"
    )
