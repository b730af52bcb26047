"""Shared fixtures: small model files, and the CLI run in-process or as a subprocess."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import spd_rewrite

REPO_ROOT = Path(spd_rewrite.__file__).resolve().parent.parent

# Written to tmp_path and named as 'nets.py:callable' model specs.
NETS_SOURCE = '''
"""Small CNNs for the command-line tests."""

import torch
from torch import nn


class Block(nn.Module):
    """A residual block with a stride-2 3x3 conv and a stride-2 1x1 shortcut."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.shortcut(x))


class SmallNet(nn.Module):
    """Four downsampling steps (stem conv, max pool, block conv, shortcut) and a global pool."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.block = Block(8, 16)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.block(torch.relu(self.mix(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvOnly(nn.Module):
    """One stride-2 conv, which exact transfer reproduces."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.down(x)))


class RaisesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        raise ValueError("forward is not implemented yet")


class WithObjectAttribute(nn.Module):
    """Runs fine, but its attribute 'hook' cannot be written to a saved folder."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.hook = object()

    def forward(self, x):
        return self.conv(x)


def small_net():
    return SmallNet()


def conv_only():
    return ConvOnly()


def raises_in_forward():
    return RaisesInForward()


def with_object_attribute():
    return WithObjectAttribute()


def returns_int():
    return 42


def raises_on_build():
    raise RuntimeError("cannot build without a config file")
'''


@pytest.fixture
def nets_file(tmp_path: Path) -> Path:
    """A Python file of small models, for specs such as ``f"{nets_file}:small_net"``."""
    path = tmp_path / "nets.py"
    path.write_text(NETS_SOURCE, encoding="utf-8")
    return path


@pytest.fixture
def cli() -> Iterator[Callable[..., Result]]:
    """Run ``spd-rewrite ARGS...`` in-process and return the result (stdout and stderr apart).

    The CLI installs a logging handler on the root logger, so the root logger is restored
    afterwards to keep the other tests' logging as it was.
    """
    from spd_rewrite.cli.app import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    runner = CliRunner()

    def invoke(*args: str | os.PathLike[str]) -> Result:
        return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)

    yield invoke

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def python_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the test interpreter with ARGS... in a fresh process, with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def cli_process(python_process) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m spd_rewrite ARGS...`` in a fresh process."""

    def run(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 300):
        return python_process("-m", "spd_rewrite", *args, cwd=cwd, timeout=timeout)

    return run
