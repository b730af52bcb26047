"""Classification training: data readers, schedule, loss, checkpoints, resume and plots."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from spd_rewrite.errors import OutputFolderError
from spd_rewrite.targets import build_target
from spd_rewrite.train import (
    DataBundle,
    DataSpecError,
    TrainConfig,
    TrainConfigError,
    evaluate,
    load_data,
    load_model_weights,
    plot_accuracy_vs_resolution,
    plot_training_curves,
    train,
)
from spd_rewrite.train.optim import Schedule

TARGET = "resnet18-lowres"


def small_digits(size: int = 4, train_images: int = 64, val_images: int = 32) -> DataBundle:
    """Digits resized to ``size`` pixels and cut down, so a ResNet-18 epoch takes about a second."""
    bundle = load_data("digits", image_size=size)
    return DataBundle(
        name=f"digits-{size}px-{train_images}",
        task=bundle.task,
        train=Subset(bundle.train, range(train_images)),
        val=Subset(bundle.val, range(val_images)),
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        input_size=bundle.input_size,
        class_names=bundle.class_names,
    )


def quiet_config(**values: object) -> TrainConfig:
    settings: dict[str, object] = {"progress": False, "batch_size": 16, "lr": 0.05, **values}
    return TrainConfig(**settings)  # type: ignore[arg-type]


# Data ---------------------------------------------------------------------------------------


def test_digits_native_shapes() -> None:
    bundle = load_data("digits")
    image, label = bundle.train[0]
    assert image.shape == (1, 8, 8)
    assert len(bundle.train) + len(bundle.val) == 1797
    assert len(bundle.val) == 360
    assert bundle.num_classes == 10
    assert bundle.in_channels == 1
    assert 0 <= int(label) <= 9


def test_digits_split_is_fixed_and_resizable() -> None:
    first = load_data("digits", image_size=4)
    second = load_data("digits", image_size=4)
    assert first.train[0][0].shape == (1, 4, 4)
    assert first.input_size == 4
    assert torch.equal(first.val[5][0], second.val[5][0])
    labels = torch.stack([first.val[i][1] for i in range(len(first.val))])
    # Stratified: every digit appears in the validation set about equally often.
    assert torch.bincount(labels, minlength=10).min() >= 30


def write_fake_cifar(root: Path, images_per_batch: int = 4) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for index, name in enumerate(names):
        batch = {
            b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
            b"labels": [(index + i) % 10 for i in range(images_per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar_batches_read(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_fake_cifar(root)
    bundle = load_data(root, augment=False)
    assert len(bundle.train) == 20
    assert len(bundle.val) == 4
    assert bundle.train[0][0].shape == (3, 32, 32)
    assert bundle.class_names[3] == "class3"
    assert [int(bundle.val[i][1]) for i in range(4)] == [5, 6, 7, 8]


def test_cifar_plane_order(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_fake_cifar(root)
    raw = pickle.loads((root / "data_batch_1").read_bytes())[b"data"][0]
    bundle = load_data(root, augment=False)
    image = bundle.train[0][0]
    # Standardisation is monotonic per channel, so the brightest red pixel stays in place.
    red_plane = raw[:1024].reshape(32, 32)
    assert image[0].argmax() == torch.from_numpy(red_plane.astype(np.int64)).argmax()


def test_cifar_rejects_code_in_pickle(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_fake_cifar(root)

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DataSpecError, match="refusing to load builtins.print"):
        load_data(root)


def write_tiny_imagenet(root: Path, size: int = 16) -> None:
    classes = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    annotations = []
    for label, class_id in enumerate(classes):
        folder = root / "train" / class_id / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            colour = (200 * label, 50, 100)
            Image.new("RGB", (size, size), colour).save(folder / f"{class_id}_{i}.JPEG")
        Image.new("RGB", (size, size), (200 * label, 50, 100)).save(
            root / "val" / "images" / f"val_{label}.JPEG"
        )
        annotations.append(f"val_{label}.JPEG\t{class_id}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


def test_image_folder_layout(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "tiny")
    bundle = load_data(tmp_path / "tiny", image_size=8, augment=False)
    assert bundle.class_names == ("n01", "n02")
    assert len(bundle.train) == 6
    assert len(bundle.val) == 2
    image, label = bundle.val[1]
    assert image.shape == (3, 8, 8)
    assert label == 1
    # Class n02 is red (200) and n01 has no red, so their standardised red channels differ.
    assert bundle.val[1][0][0].mean() > bundle.val[0][0][0].mean()


def test_unknown_data_spec(tmp_path: Path) -> None:
    with pytest.raises(DataSpecError, match="neither a built-in set"):
        load_data("mnist")
    with pytest.raises(DataSpecError, match="cannot tell the layout"):
        load_data(tmp_path)


# Settings -----------------------------------------------------------------------------------


def test_recipe_with_override() -> None:
    config = TrainConfig.from_recipe("tiny-imagenet-resnet18", epochs=3, lr=None)
    assert config.lr == 0.01793
    assert config.momentum == 0.9447
    assert config.weight_decay == 0.002113
    assert config.batch_size == 256
    assert config.epochs == 3
    assert TrainConfig.from_recipe("cifar10-resnet50", lr=0.2).lr == 0.2
    with pytest.raises(TrainConfigError, match="unknown recipe 'adam'"):
        TrainConfig.from_recipe("adam")


def test_schedule_warmup_then_cosine() -> None:
    config = TrainConfig.from_recipe("yolov5", epochs=10)
    schedule = Schedule(config, steps_per_epoch=10)
    assert schedule.values(0, 0) == (0.0, 0.8)
    assert schedule.values(0, 2)[0] == pytest.approx(0.1)
    lr, momentum = schedule.values(30, 0)
    assert momentum == 0.937
    assert lr == pytest.approx(schedule.cosine_lr(30))
    assert schedule.cosine_lr(100) == pytest.approx(0.001)
    assert schedule.cosine_lr(50) == pytest.approx(0.0055)


# Training -----------------------------------------------------------------------------------


def test_loss_falls_on_fixed_batch() -> None:
    bundle = small_digits(size=4, train_images=16, val_images=16)
    result = train(TARGET, bundle, quiet_config(epochs=15, eval_interval=15, weight_decay=0.0))
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    # Ten classes start near ln(10) = 2.3.
    assert first > 1.5
    assert last < first / 4


def test_checkpoint_reloads_same_outputs(tmp_path: Path) -> None:
    bundle = small_digits()
    result = train(TARGET, bundle, quiet_config(epochs=1, out_dir=tmp_path / "run"))
    assert result.weights == tmp_path / "run" / "model.safetensors"

    state, meta = load_model_weights(result.weights)
    assert meta["target"] == TARGET
    assert meta["image_size"] == 4
    reloaded = build_target(TARGET, num_classes=10, in_channels=1)
    reloaded.load_state_dict(state)
    images = torch.stack([bundle.val[i][0] for i in range(8)])
    result.model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images), result.model(images))

    evaluated = evaluate(TARGET, result.weights, bundle, quiet_config())
    assert evaluated.metrics["val_accuracy"] == pytest.approx(result.final_metrics["val_accuracy"])


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    bundle = small_digits()
    config = quiet_config(epochs=2, warmup_epochs=0.5, augment=True)
    whole = train(TARGET, bundle, replace(config, out_dir=tmp_path / "a"))

    split = replace(config, out_dir=tmp_path / "b", stop_after_epoch=1)
    stopped = train(TARGET, bundle, split)
    assert not stopped.completed
    assert stopped.weights is None
    resumed = train(TARGET, bundle, replace(split, stop_after_epoch=None, resume=True))

    assert resumed.completed
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    assert whole_state.keys() == resumed_state.keys()
    for name, tensor in whole_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    records = [
        json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] == whole.history[1]["train_loss"]


def test_rerun_into_used_folder_rejected(tmp_path: Path) -> None:
    bundle = small_digits(train_images=16, val_images=16)
    config = quiet_config(epochs=1, out_dir=tmp_path / "run")
    train(TARGET, bundle, config)
    with pytest.raises(OutputFolderError, match="already contains a training run"):
        train(TARGET, bundle, config)


def test_detection_target_on_digits_rejected() -> None:
    with pytest.raises(TrainConfigError, match="'yolov5n' is a detection model"):
        train("yolov5n", small_digits(), quiet_config(epochs=1))


# Plots --------------------------------------------------------------------------------------


def test_plots_written(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"epoch": e, "train_loss": 1 / e, "val_accuracy": 0.5 + e / 10} for e in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = plot_training_curves(metrics, tmp_path / "curves.png")
    resolution = plot_accuracy_vs_resolution(
        {"base": {4: [0.5, 0.6], 8: [0.9]}, "spd": {4: [0.7], 8: [0.95]}}, tmp_path / "res.png"
    )
    for path in (curves, resolution):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 100
