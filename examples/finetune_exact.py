"""Rewrite a trained model with exact transfer, check it computes the same, then fine-tune it."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import spd_rewrite
from spd_rewrite.targets import build_target


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's 8x8 digits as (N, 3, size, size) images in [0, 1] and labels."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target)


def train(model: torch.nn.Module, images, labels, steps: int, lr: float) -> float:
    """Run ``steps`` SGD steps on batches of 64; return the last loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def accuracy(model: torch.nn.Module, images, labels) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="SGD steps before and after")
    parser.add_argument("--size", type=int, default=16, help="image size in pixels")
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = digits(args.size)
    model = build_target("resnet18-lowres", num_classes=10)
    loss = train(model, images, labels, args.steps, lr=0.05)
    print(f"baseline: loss {loss:.3f}, accuracy {accuracy(model, images, labels):.3f}")

    # Rewrite with exact transfer: strided convs keep their taps, max pools become exact.
    model.eval()
    result = spd_rewrite.rewrite(model, images[:4], rules="exact", transfer="exact")
    with torch.no_grad():
        before, after = model(images[:256]), result.model(images[:256])
    error = (after - before).abs().max().item()
    bound = 1e-4 * before.abs().max().item()
    print(f"rewritten: {result.report.totals.replaced} layers, max |y_new - y_old| = {error:.2e}")
    if error > bound:
        raise SystemExit(f"outputs differ by {error:.2e}, more than {bound:.2e}")

    spd_accuracy = accuracy(result.model, images, labels)
    loss = train(result.model, images, labels, args.steps, lr=0.01)
    print(f"SPD before fine-tuning: accuracy {spd_accuracy:.3f}")
    final = accuracy(result.model, images, labels)
    print(f"SPD after fine-tuning: loss {loss:.3f}, accuracy {final:.3f}")


if __name__ == "__main__":
    main()
