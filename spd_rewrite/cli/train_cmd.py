"""``spd-rewrite train`` and ``spd-rewrite evaluate`` for the bundled targets.

Run ``train`` under ``torchrun`` to train on several GPUs or nodes with DistributedDataParallel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from spd_rewrite.cli.app import app, fail, stdout

__all__ = ["evaluate", "train"]

Target = Annotated[
    str,
    typer.Argument(
        help="A bundled target name (spd-rewrite targets), e.g. resnet18-lowres-spd.",
        show_default=False,
    ),
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        help="digits, synthetic-detection, a CIFAR-10 batch folder, an image folder as Tiny "
        "ImageNet ships, or a YOLO data .yaml.",
    ),
]
ImageSize = Annotated[
    int | None, typer.Option("--image-size", help="Resize images to this square size (pixels).")
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", help="Global batch size across all processes.")
]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]
Amp = Annotated[
    str | None, typer.Option("--amp", help="Mixed precision on CUDA: auto, off, bf16 or fp16.")
]


@app.command()
def train(
    target: Target,
    data: Data,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for metrics, checkpoints and weights.")
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="Preset: yolov5, tiny-imagenet-resnet18 or cifar10-resnet50; flags override it.",
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs.")] = None,
    batch_size: BatchSize = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    final_lr_factor: Annotated[
        float | None,
        typer.Option("--final-lr-factor", help="Final learning rate as a fraction of --lr."),
    ] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum.")] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="SGD weight decay.")
    ] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option("--warmup-epochs", help="Linear warmup length in epochs.")
    ] = None,
    image_size: ImageSize = None,
    augment: Annotated[
        bool | None, typer.Option("--augment/--no-augment", help="Random flips and crops.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of weights and data order.")
    ] = None,
    device: Device = None,
    amp: Amp = None,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last/--no-channels-last", help="Channels-last memory on CUDA."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Data loader worker processes.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")
    ] = False,
    stop_after_epoch: Annotated[
        int | None, typer.Option("--stop-after-epoch", help="Stop early after this epoch.")
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
    ] = True,
) -> None:
    """Train TARGET on --data; the target is built for the data's classes and channels."""
    from spd_rewrite.train import TrainConfig
    from spd_rewrite.train import train as run_training

    try:
        config = TrainConfig.from_recipe(
            recipe,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            final_lr_factor=final_lr_factor,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            image_size=image_size,
            augment=augment,
            seed=seed,
            device=device,
            amp=amp,
            channels_last=channels_last,
            num_workers=workers,
            out_dir=out,
            resume=resume,
            stop_after_epoch=stop_after_epoch,
            progress=progress,
        )
        result = run_training(target, data, config)
    except Exception as error:  # fail() maps it to one line and an exit code (3 for bugs)
        fail(error)
        return

    stdout.print(
        f"trained {target} for {result.epochs_completed} epochs; final metrics: "
        f"{json.dumps(result.final_metrics)}",
        highlight=False,
    )
    if result.weights is not None:
        stdout.print(f"weights written to {result.weights}", highlight=False)


@app.command()
def evaluate(
    target: Target,
    weights: Annotated[
        Path,
        typer.Option("--weights", help="model.safetensors or a checkpoint folder from train."),
    ],
    data: Data,
    image_size: ImageSize = None,
    batch_size: BatchSize = None,
    device: Device = None,
    amp: Amp = None,
) -> None:
    """Evaluate TARGET with --weights on the validation split of --data; print the metrics."""
    from spd_rewrite.train import TrainConfig
    from spd_rewrite.train import evaluate as run_evaluation

    try:
        config = TrainConfig.from_recipe(
            None,
            image_size=image_size,
            batch_size=batch_size,
            device=device,
            amp=amp,
            progress=False,
        )
        result = run_evaluation(target, weights, data, config)
    except Exception as error:  # fail() maps it to one line and an exit code (3 for bugs)
        fail(error)
        return
    stdout.print(json.dumps(result.metrics, indent=2), highlight=False)
