"""Checkpoints as safetensors plus JSON, written atomically, with everything needed to resume.

A training checkpoint in ``out_dir/checkpoints/`` is two files:

* ``epoch-NNNN.safetensors``: tensors only, under the prefixes ``model.`` (the state dict),
  ``optimizer.state.<param index>.<key>`` (e.g. SGD momentum buffers) and ``rng.`` (torch, CUDA
  and numpy generator states);
* ``last.json``: the name of that tensor file, the config, the next epoch, the global step, the
  optimizer's parameter groups and non-tensor state, the gradient scaler state and the Python
  generator state.

Each file is written to a temporary name in the same folder and moved into place with
``os.replace``. ``last.json`` is replaced last and older tensor files are deleted after it, so a
run killed at any moment leaves a complete earlier checkpoint. No file is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from spd_rewrite.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "restore_rng_state",
    "restore_training_state",
    "save_checkpoint",
    "save_model",
    "write_json_atomic",
]

FORMAT_VERSION = 1
LAST_NAME = "last.json"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded training checkpoint."""

    meta: dict[str, Any]
    """Contents of ``last.json``."""
    tensors: dict[str, torch.Tensor]

    @property
    def next_epoch(self) -> int:
        return int(self.meta["next_epoch"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.tensors, "model.")


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON to ``path`` via a temporary file and ``os.replace``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(content, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": f"spd-rewrite-{FORMAT_VERSION}"})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors rejects tensors that share storage, so every entry gets its own copy.
    return tensor.detach().to("cpu", copy=True).contiguous()


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(keys).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    plain_state = {
        "numpy": [int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, plain_state


def restore_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Set the torch, CUDA, numpy and Python generators to a state saved by ``save_checkpoint``."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    position, has_gauss, cached_gaussian = state["numpy"]
    keys = tensors["rng.numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler_state: dict[str, Any],
    next_epoch: int,
    step: int,
    meta: dict[str, Any],
) -> Path:
    """Write a resumable checkpoint into ``directory`` and return the path of ``last.json``.

    ``meta`` (config, target, data spec) is stored as given and must be JSON-compatible.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{key}": _cpu_copy(value) for key, value in model.state_dict().items()}

    optimizer_state = optimizer.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = _cpu_copy(value)
            else:
                plain_state.setdefault(str(index), {})[key] = value

    rng_tensors, rng_state = _rng_state()
    tensors.update(rng_tensors)

    weights_name = f"epoch-{next_epoch:04d}.safetensors"
    _save_tensors_atomic(directory / weights_name, tensors)
    content = {
        "format_version": FORMAT_VERSION,
        "weights": weights_name,
        "next_epoch": next_epoch,
        "step": step,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_plain_state": plain_state,
        "scaler": scaler_state,
        "rng": rng_state,
        **meta,
    }
    last = directory / LAST_NAME
    write_json_atomic(last, content)
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != weights_name:
            old.unlink()
    return last


def load_checkpoint(path: Path) -> Checkpoint:
    """Load ``last.json`` (or a checkpoint folder that contains it) and its tensor file.

    Raises:
        CheckpointError: a file is missing, unreadable or from another format version.
    """
    if path.is_dir():
        path = path / LAST_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}; resume it with the spd-rewrite version that wrote it"
        )
    tensors = _load_tensors(path.parent / meta["weights"])
    return Checkpoint(meta=meta, tensors=tensors)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"cannot read weights file {path}: {error}") from error


def restore_training_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state of ``checkpoint`` into ``optimizer`` (built over the same model).

    Raises:
        CheckpointError: the parameter groups do not match the optimizer's.
    """
    state: dict[int, dict[str, Any]] = {}
    for key, value in checkpoint.tensors.items():
        if key.startswith("optimizer.state."):
            index, name = key[len("optimizer.state.") :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in checkpoint.meta["optimizer_plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict(
            {"state": state, "param_groups": checkpoint.meta["optimizer_param_groups"]}
        )
    except (ValueError, KeyError) as error:
        raise CheckpointError(
            f"optimizer state in the checkpoint does not fit the model: {error}"
        ) from error


def save_model(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the model's state dict to ``path`` (safetensors) and ``meta`` next to it as JSON."""
    tensors = {key: _cpu_copy(value) for key, value in model.state_dict().items()}
    _save_tensors_atomic(path, tensors)
    write_json_atomic(path.with_suffix(".json"), {"format_version": FORMAT_VERSION, **meta})


def load_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the model state dict and metadata stored at ``path``.

    ``path`` is a final ``model.safetensors`` (its ``.json`` sibling, if any, gives the metadata),
    a training checkpoint's ``last.json``, or a checkpoint folder.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    if path.is_dir() or path.suffix == ".json":
        checkpoint = load_checkpoint(path)
        return checkpoint.model_state(), checkpoint.meta
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    tensors = _load_tensors(path)
    if any(key.startswith("optimizer.") for key in tensors):
        tensors = _strip_prefix(tensors, "model.")
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return tensors, meta
