"""Image folders in the Tiny ImageNet layout.

::

    root/wnids.txt                      optional: class ids, one a line, in label order
    root/train/<class>/images/*.JPEG    (or root/train/<class>/*.JPEG)
    root/val/images/*.JPEG
    root/val/val_annotations.txt        "<file name>\\t<class>[\\t<box>...]" per line

Without ``wnids.txt`` the classes are the sorted folder names under ``train/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from spd_rewrite.train.data import DataBundle, DataSpecError
from spd_rewrite.train.transforms import random_flip_crop

__all__ = ["ImageFolderDataset", "load_image_folder_data"]

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp"}
# ImageNet's per-channel statistics, the usual standardisation for Tiny ImageNet.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """RGB images read from disk on access, resized and standardised."""

    def __init__(
        self, samples: list[tuple[Path, int]], image_size: int | None, augment: bool
    ) -> None:
        self.samples = samples
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if self.image_size is not None:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        # (H, W, 3) uint8 -> (3, H, W) float in [0, 1]
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        tensor = (tensor - _MEAN) / _STD
        if self.augment:
            tensor = random_flip_crop(tensor, padding=tensor.shape[-1] // 8)
        return tensor, label


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _class_ids(root: Path) -> list[str]:
    wnids = root / "wnids.txt"
    if wnids.is_file():
        return [line.strip() for line in wnids.read_text().splitlines() if line.strip()]
    return sorted(p.name for p in (root / "train").iterdir() if p.is_dir())


def _train_samples(root: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    samples: list[tuple[Path, int]] = []
    for class_id, label in class_index.items():
        folder = root / "train" / class_id
        image_folder = folder / "images" if (folder / "images").is_dir() else folder
        if not image_folder.is_dir():
            raise DataSpecError(f"class {class_id!r} has no folder {folder}")
        samples.extend((path, label) for path in _list_images(image_folder))
    return samples


def _val_samples(root: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = root / "val" / "val_annotations.txt"
    samples: list[tuple[Path, int]] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_index:
            raise DataSpecError(
                f"{annotations}:{number}: expected '<file>\\t<class>' with a known class, "
                f"found {line!r}"
            )
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise DataSpecError(f"{annotations}:{number}: image {path} not found")
        samples.append((path, class_index[fields[1]]))
    return samples


def load_image_folder_data(
    root: Path, *, image_size: int | None = None, augment: bool = True
) -> DataBundle:
    """Index the training and validation images under ``root``; images load lazily.

    Raises:
        DataSpecError: a class folder or a listed validation image is missing, or a set is empty.
    """
    class_ids = _class_ids(root)
    class_index = {class_id: label for label, class_id in enumerate(class_ids)}
    train_samples = _train_samples(root, class_index)
    val_samples = _val_samples(root, class_index)
    if not train_samples or not val_samples:
        raise DataSpecError(
            f"image folder {root} has {len(train_samples)} training and {len(val_samples)} "
            "validation images; both must be non-empty"
        )
    if image_size is None:
        with Image.open(train_samples[0][0]) as first:
            image_size = first.width
    return DataBundle(
        name=f"image-folder:{root}",
        task="classification",
        train=ImageFolderDataset(train_samples, image_size, augment=augment),
        val=ImageFolderDataset(val_samples, image_size, augment=False),
        num_classes=len(class_ids),
        in_channels=3,
        input_size=image_size,
        class_names=tuple(class_ids),
    )
