"""scikit-learn's bundled 8x8 handwritten digits as a classification set (read from disk)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from spd_rewrite.train.data import DataBundle
from spd_rewrite.train.transforms import resize_images

__all__ = ["load_digits_data"]

# Pixel values of the bundled digits run from 0 to 16.
_MAX_PIXEL = 16.0


def load_digits_data(
    *, image_size: int | None = None, split_seed: int = 0, val_fraction: float = 0.2
) -> DataBundle:
    """Split the 1797 digits into stratified train and validation sets of 1-channel images.

    Pixels are scaled to [0, 1], resized to ``image_size`` if given (bilinear, antialiased when
    shrinking), then standardised with the mean and standard deviation of the training images.
    The same ``split_seed`` always gives the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # (1797, 8, 8) -> (1797, 1, 8, 8)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _MAX_PIXEL
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_index, val_index = train_test_split(
        range(len(labels)),
        test_size=val_fraction,
        random_state=split_seed,
        stratify=digits.target,
    )
    if image_size is not None:
        images = resize_images(images, image_size)

    train_images = images[train_index]
    mean, std = train_images.mean(), train_images.std()
    images = (images - mean) / std
    return DataBundle(
        name="digits",
        task="classification",
        train=TensorDataset(images[train_index], labels[train_index]),
        val=TensorDataset(images[val_index], labels[val_index]),
        num_classes=10,
        in_channels=1,
        input_size=images.shape[-1],
        class_names=tuple(str(d) for d in range(10)),
    )
