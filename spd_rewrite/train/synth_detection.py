"""A generated small-object detection set: digit glyphs on cluttered canvases, in YOLO format.

Each image is a square canvas with a noisy grey background, random lines and blobs, and a few
digit glyphs taken from scikit-learn's bundled 8x8 digits. Each glyph is scaled to a side between
``min_object_size`` and ``max_object_size`` pixels, drawn log-uniformly so small glyphs are
common, and inked in a grey that contrasts with the background. Glyphs do not overlap, and the
class is the digit. A glyph's box spans its full scaled height (every bundled digit has ink in
all 8 rows) and the columns of the 8x8 grid that contain ink. The same settings always produce
the same files, given the same numpy, Pillow and scikit-learn versions.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SyntheticDetectionSettings", "ensure_synthetic_detection", "write_synthetic_detection"]

_GLYPH_SIDE = 8
_MAX_PIXEL = 16.0
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class SyntheticDetectionSettings:
    """Size and content of a generated set."""

    num_train: int = 400
    num_val: int = 100
    image_size: int = 128
    min_object_size: int = 4
    max_object_size: int = 32
    max_objects: int = 6
    """Glyphs per image are drawn from 1 to this number."""
    clutter: int = 6
    """Lines plus blobs per image, drawn from 0 to this number of each."""
    seed: int = 0


def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / _MAX_PIXEL, digits.target


def _background(rng: np.random.Generator, settings: SyntheticDetectionSettings) -> Image.Image:
    side = settings.image_size
    level = rng.uniform(60, 190)
    noise = rng.normal(level, 18, size=(side, side, 1)) + rng.normal(0, 10, size=(1, 1, 3))
    canvas = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, settings.clutter + 1)):
        points = [tuple(rng.uniform(0, side, 2)) for _ in range(2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(points, fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(0, settings.clutter + 1)):
        x, y = rng.uniform(0, side, 2)
        radius = rng.uniform(2, side / 8)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    return canvas


def _overlaps(box: tuple[float, float, float, float], boxes: list[tuple[float, ...]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def _place_glyph(
    canvas: Image.Image,
    glyph: np.ndarray,
    size: int,
    rng: np.random.Generator,
    placed: list[tuple[float, ...]],
) -> tuple[float, float, float, float] | None:
    side = canvas.width
    ink_columns = np.flatnonzero(glyph.max(axis=0) > 0)
    scale = size / _GLYPH_SIDE
    for _ in range(_PLACEMENT_TRIES):
        left, top = (int(v) for v in rng.integers(0, side - size + 1, 2))
        box = (
            left + ink_columns[0] * scale,
            float(top),
            left + (ink_columns[-1] + 1) * scale,
            float(top + size),
        )
        if _overlaps(box, placed):
            continue
        mask = Image.fromarray((glyph * 255).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        background = np.asarray(canvas.crop((left, top, left + size, top + size))).mean()
        ink = rng.uniform(0, 50) if background > 128 else rng.uniform(205, 255)
        canvas.paste(Image.new("RGB", (size, size), (int(ink),) * 3), (left, top), mask)
        return box
    return None


def _write_split(
    folder: str,
    count: int,
    root: Path,
    rng: np.random.Generator,
    settings: SyntheticDetectionSettings,
) -> None:
    images, labels = _glyphs()
    image_dir = root / "images" / folder
    label_dir = root / "labels" / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    side = settings.image_size
    log_min, log_max = math.log(settings.min_object_size), math.log(settings.max_object_size)

    for index in range(count):
        canvas = _background(rng, settings)
        placed: list[tuple[float, ...]] = []
        lines = []
        for _ in range(rng.integers(1, settings.max_objects + 1)):
            size = int(round(math.exp(rng.uniform(log_min, log_max))))
            size = min(max(size, settings.min_object_size), settings.max_object_size)
            pick = int(rng.integers(len(labels)))
            box = _place_glyph(canvas, images[pick], size, rng, placed)
            if box is None:
                continue
            placed.append(box)
            x0, y0, x1, y1 = box
            cx, cy, w, h = (
                (x0 + x1) / 2 / side,
                (y0 + y1) / 2 / side,
                (x1 - x0) / side,
                (y1 - y0) / side,
            )
            lines.append(f"{labels[pick]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        canvas.save(image_dir / f"{index:05d}.png")
        (label_dir / f"{index:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def write_synthetic_detection(
    root: Path, settings: SyntheticDetectionSettings = SyntheticDetectionSettings()
) -> Path:
    """Write the set under ``root`` (``images/``, ``labels/``, ``data.yaml``); return the YAML path.

    Raises:
        ValueError: the object sizes do not fit the canvas or are out of order.
    """
    if not 1 <= settings.min_object_size <= settings.max_object_size <= settings.image_size:
        raise ValueError(
            f"invalid object sizes {settings.min_object_size}..{settings.max_object_size} for a "
            f"{settings.image_size}-pixel canvas; need 1 <= min <= max <= image_size"
        )
    rng = np.random.default_rng(settings.seed)
    _write_split("train", settings.num_train, root, rng, settings)
    _write_split("val", settings.num_val, root, rng, settings)
    names = ", ".join(f"'{d}'" for d in range(10))
    yaml_path = root / "data.yaml"
    yaml_path.write_text(
        "# Generated by spd_rewrite.train.synth_detection with these settings:\n"
        f"# {json.dumps(asdict(settings))}\n"
        f"path: .\ntrain: images/train\nval: images/val\nnames: [{names}]\n"
    )
    return yaml_path


def ensure_synthetic_detection(cache_dir: Path, settings: SyntheticDetectionSettings) -> Path:
    """Return the YAML path of the set for ``settings`` in ``cache_dir``, generating it if absent.

    Each settings combination gets its own folder. The set is written to a temporary folder and
    renamed into place, so an interrupted generation never leaves a half-written set behind.
    """
    key = "-".join(str(value) for value in asdict(settings).values())
    root = cache_dir / f"synthetic-detection-{key}"
    if (root / "data.yaml").is_file():
        return root / "data.yaml"
    staging = cache_dir / f".{root.name}.partial"
    for leftover in (staging, root):
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir(parents=True)
    write_synthetic_detection(staging, settings)
    staging.rename(root)
    return root / "data.yaml"
