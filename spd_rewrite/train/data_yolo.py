"""Detection sets in YOLO format.

A small YAML file names the image folders and the classes::

    path: .              # optional root of the folders below, relative to this file
    train: images/train
    val: images/val
    names: [cat, dog]    # or a mapping {0: cat, 1: dog}

The labels of ``images/train/a.png`` are in ``labels/train/a.txt`` (the last ``images`` folder
of the path swapped for ``labels``), one ``class cx cy w h`` line per box with coordinates as
fractions of the image width and height. A missing label file means an image without objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from spd_rewrite.train.data import DataBundle, DataSpecError

__all__ = ["YoloDataset", "collate_detection", "label_path_for", "load_yolo_data", "read_labels"]

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp"}


def label_path_for(image_path: Path) -> Path:
    """Return the label file of an image: the last ``images`` folder becomes ``labels``."""
    parts = list(image_path.parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image_path.with_suffix(".txt")


def read_labels(path: Path, num_classes: int) -> torch.Tensor:
    """Read a label file into a float tensor ``(k, 5)``: class, cx, cy, w, h.

    Raises:
        DataSpecError: a line does not have five numbers, a class is out of range, or a box
            leaves the [0, 1] range.
    """
    if not path.is_file():
        return torch.zeros((0, 5))
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(field) for field in line.split()]
        except ValueError:
            values = []
        if len(values) != 5:
            raise DataSpecError(f"{path}:{number}: expected 'class cx cy w h', found {line!r}")
        cls, cx, cy, w, h = values
        if not (cls.is_integer() and 0 <= cls < num_classes):
            raise DataSpecError(f"{path}:{number}: class {cls} is not in 0..{num_classes - 1}")
        if not all(0 <= v <= 1 for v in (cx, cy, w, h)):
            raise DataSpecError(f"{path}:{number}: box {cx, cy, w, h} is outside [0, 1]")
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float32).view(-1, 5)


class YoloDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images read on access as RGB floats in [0, 1], resized to a square, with their boxes.

    The resize ignores the aspect ratio; labels are fractions of the image, so they stay valid.
    """

    def __init__(self, image_paths: list[Path], num_classes: int, image_size: int) -> None:
        self.image_paths = image_paths
        self.image_size = image_size
        self.labels = [read_labels(label_path_for(p), num_classes) for p in image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.image_paths[index]) as file:
            image = file.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        # (H, W, 3) uint8 -> (3, H, W) float in [0, 1]
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        return tensor, self.labels[index]


def collate_detection(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images and join boxes into ``(M, 6)``: image index in batch, class, cx, cy, w, h."""
    images = torch.stack([image for image, _ in batch])
    targets = [
        torch.cat([torch.full((len(boxes), 1), float(i)), boxes], dim=1)
        for i, (_, boxes) in enumerate(batch)
    ]
    return images, torch.cat(targets) if targets else torch.zeros((0, 6))


def _class_names(config: dict[str, Any], yaml_path: Path) -> tuple[str, ...]:
    names = config.get("names")
    if isinstance(names, dict):
        return tuple(str(names[key]) for key in sorted(names))
    if isinstance(names, list) and names:
        return tuple(str(name) for name in names)
    if isinstance(config.get("nc"), int):
        return tuple(str(i) for i in range(config["nc"]))
    raise DataSpecError(f"{yaml_path} needs 'names' (a list or mapping of class names) or 'nc'")


def _list_images(folder: Path, yaml_path: Path, key: str) -> list[Path]:
    if not folder.is_dir():
        raise DataSpecError(f"{yaml_path}: {key} folder {folder} not found")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise DataSpecError(f"{yaml_path}: {key} folder {folder} contains no images")
    return images


def load_yolo_data(yaml_path: Path, *, image_size: int | None = None) -> DataBundle:
    """Read the YAML file and index both sets; ``image_size`` defaults to the first image's width.

    Raises:
        DataSpecError: the YAML file is malformed, a folder is missing or empty, or a label
            line is invalid.
    """
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DataSpecError(f"cannot read data file {yaml_path}: {error}") from error
    if not isinstance(config, dict) or "train" not in config or "val" not in config:
        raise DataSpecError(f"{yaml_path} must be a mapping with 'train' and 'val' folders")

    root = yaml_path.parent / str(config.get("path", "."))
    names = _class_names(config, yaml_path)
    train_images = _list_images(root / str(config["train"]), yaml_path, "train")
    val_images = _list_images(root / str(config["val"]), yaml_path, "val")
    if image_size is None:
        with Image.open(train_images[0]) as first:
            image_size = first.width
    return DataBundle(
        name=f"yolo:{yaml_path}",
        task="detection",
        train=YoloDataset(train_images, len(names), image_size),
        val=YoloDataset(val_images, len(names), image_size),
        num_classes=len(names),
        in_channels=3,
        input_size=image_size,
        class_names=names,
        collate_fn=collate_detection,
    )
