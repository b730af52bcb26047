"""CIFAR-10 in its python batch format (``data_batch_1`` ... ``data_batch_5``, ``test_batch``).

Each batch is a pickled dict with ``data``, a uint8 array ``(N, 3072)`` holding the red, green
and blue 32x32 planes of each image in turn, and ``labels``, a list of ints. ``batches.meta``,
when present, names the classes under ``label_names``. The batches are unpickled with a
restricted unpickler that only builds numpy arrays and plain containers, so a crafted file cannot
run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spd_rewrite.train.data import DataBundle, DataSpecError
from spd_rewrite.train.transforms import random_flip_crop, resize_images

__all__ = ["CifarDataset", "load_cifar10_data", "read_cifar_batch"]

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_SIDE = 32
_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# The globals a numpy array pickle refers to; numpy 2 renamed numpy.core to numpy._core.
# Python 3 writes bytes into protocol-2 pickles through _codecs.encode.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """Unpickle one batch file and return its dict with ``str`` keys.

    Raises:
        DataSpecError: the file is missing, not a pickle, or refers to anything but numpy arrays.
    """
    try:
        with path.open("rb") as file:
            # The batches were pickled by Python 2; "bytes" keeps their byte strings as bytes.
            content = _ArrayUnpickler(file, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise DataSpecError(f"cannot read CIFAR batch {path}: {error}") from error
    if not isinstance(content, dict):
        raise DataSpecError(f"invalid CIFAR batch {path}: expected a dict, found {type(content)}")
    return {
        key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()
    }


def _read_images(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_cifar_batch(path)
    if "data" not in batch or "labels" not in batch:
        raise DataSpecError(f"invalid CIFAR batch {path}: missing 'data' or 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        raise DataSpecError(
            f"invalid CIFAR batch {path}: data has shape {data.shape}, expected (N, 3072)"
        )
    labels = torch.tensor(list(batch["labels"]), dtype=torch.long)
    if len(labels) != len(data):
        raise DataSpecError(f"invalid CIFAR batch {path}: {len(data)} images, {len(labels)} labels")
    # (N, 3072) -> (N, 3, 32, 32): three planes of 32 rows each.
    images = torch.from_numpy(data.copy()).view(-1, 3, _SIDE, _SIDE)
    return images, labels


class CifarDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Standardised float images held in memory, optionally with random flips and crops."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            image = random_flip_crop(image, padding=image.shape[-1] // 8)
        return image, self.labels[index]


def load_cifar10_data(
    root: Path, *, image_size: int | None = None, augment: bool = True
) -> DataBundle:
    """Load the five training batches and ``test_batch`` (the validation set) from ``root``.

    Images are scaled to [0, 1], resized if ``image_size`` is given, and standardised per channel
    with the training set's mean and standard deviation.

    Raises:
        DataSpecError: a batch is missing or malformed.
    """
    missing = [name for name in (*_TRAIN_BATCHES, "test_batch") if not (root / name).is_file()]
    if missing:
        raise DataSpecError(f"CIFAR-10 folder {root} lacks {', '.join(missing)}")
    parts = [_read_images(root / name) for name in _TRAIN_BATCHES]
    train_images = torch.cat([images for images, _ in parts]).float() / 255
    train_labels = torch.cat([labels for _, labels in parts])
    val_images, val_labels = _read_images(root / "test_batch")
    val_images = val_images.float() / 255
    if image_size is not None:
        train_images = resize_images(train_images, image_size)
        val_images = resize_images(val_images, image_size)

    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True)
    train_images = (train_images - mean) / std
    val_images = (val_images - mean) / std
    return DataBundle(
        name=f"cifar10:{root}",
        task="classification",
        train=CifarDataset(train_images, train_labels, augment=augment),
        val=CifarDataset(val_images, val_labels, augment=False),
        num_classes=10,
        in_channels=3,
        input_size=train_images.shape[-1],
        class_names=_read_class_names(root),
    )


def _read_class_names(root: Path) -> tuple[str, ...]:
    meta_path = root / "batches.meta"
    if not meta_path.is_file():
        return _CLASS_NAMES
    names = read_cifar_batch(meta_path).get("label_names", _CLASS_NAMES)
    return tuple(name.decode() if isinstance(name, bytes) else str(name) for name in names)
