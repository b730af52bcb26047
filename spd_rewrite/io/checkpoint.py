"""Weights files: reading state dicts, loading them into a model, and writing them as safetensors.

Reading never unpickles code, because ``.safetensors`` files contain only tensors and
``.pt``/``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from spd_rewrite.errors import CheckpointError

__all__ = ["apply_state_dict", "read_state_dict", "write_state_dict"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_WEIGHTS_SUFFIXES = (".safetensors", *_TORCH_SUFFIXES)

# Keys under which training scripts commonly nest the state dict in a checkpoint dict.
_WRAPPER_KEYS = ("state_dict", "model")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` file onto the CPU.

    A torch file may contain the state dict itself, or a checkpoint dict that contains it under
    ``"state_dict"`` or ``"model"``.

    Raises:
        CheckpointError: the file is missing, a directory, corrupt, not a plain state dict, or has
            an unknown extension.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in _WEIGHTS_SUFFIXES)
        hint = f" such as {', '.join(found[:3])}" if found else ""
        raise CheckpointError(
            f"weights path {str(path)!r} is a directory; pass a weights file inside it{hint}"
        )
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} not found; check the path")

    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _read_torch_file(path)
    raise CheckpointError(
        f"weights file {str(path)!r} has the unknown extension {path.suffix!r}; expected "
        f"{', '.join(_WEIGHTS_SUFFIXES)}"
    )


def apply_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | os.PathLike[str]
) -> None:
    """Load ``state_dict`` into ``model`` strictly, in place.

    Args:
        model: the module to fill.
        state_dict: parameter and buffer tensors by qualified name.
        source: where the state dict came from, named in errors.

    Raises:
        CheckpointError: a key is missing or unexpected, or a tensor has the wrong shape. The
            message names the first such key (and both shapes) and counts the others.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        key
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = len(missing) + len(unexpected) + len(wrong_shape)
    more = f" ({problems - 1} more mismatches)" if problems > 1 else ""
    prefix = f"weights file {str(source)!r} does not fit the model"

    if wrong_shape:
        key = wrong_shape[0]
        raise CheckpointError(
            f"{prefix}: key {key!r} has shape {tuple(state_dict[key].shape)} in the file but "
            f"{tuple(expected[key].shape)} in the model{more}; build the model with the "
            "configuration the weights were trained with"
        )
    if missing:
        hint = _prefix_hint(list(state_dict), list(expected)) or "pass the weights of this model"
        raise CheckpointError(
            f"{prefix}: key {missing[0]!r} is missing from the file{more}; {hint}"
        )
    if unexpected:
        hint = _prefix_hint(list(state_dict), list(expected)) or "pass the weights of this model"
        raise CheckpointError(
            f"{prefix}: the file has key {unexpected[0]!r}, which the model lacks{more}; {hint}"
        )

    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{prefix}: {first}") from error


def write_state_dict(
    module: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> Path:
    """Write the state dict of ``module`` (or a state dict) to ``path`` as safetensors.

    Tensors are copied to the CPU. Tensors that share storage, such as tied weights, are written
    as separate copies, because safetensors rejects shared storage. The same tensors always give a
    byte-identical file. The file is written to a temporary name and renamed into place.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    state = module.state_dict() if isinstance(module, nn.Module) else dict(module)
    tensors = unshared_cpu_tensors(state)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(descriptor)
    try:
        safetensors.torch.save_file(tensors, temporary, metadata={"format": "pt"})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def unshared_cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``tensors`` detached, contiguous and on the CPU, with no two sharing storage.

    A tensor is cloned only when an earlier one already uses its storage, or when it has no
    storage (empty tensors), so most models need no extra memory.
    """
    result: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in seen_storages or storage[1] == 0:
            tensor = tensor.clone()
        seen_storages.add((str(tensor.device), tensor.untyped_storage().data_ptr()))
        result[name] = tensor
    return result


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"weights file {str(path)!r} is not a valid safetensors file ({_first_line(error)}); "
            "it may be truncated, so write or download it again"
        ) from error


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"weights file {str(path)!r} is not a plain state dict: loading it would unpickle "
            "code. In trusted code, load the model and write torch.save(model.state_dict(), path)"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"weights file {str(path)!r} cannot be read ({_first_line(error)}); it may be "
            "truncated or not a torch.save file"
        ) from error

    if isinstance(loaded, dict) and not _is_tensor_dict(loaded):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict) and _is_tensor_dict(loaded[key]):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not _is_tensor_dict(loaded):
        found = (
            f"a dict with keys {sorted(map(str, loaded))[:5]}"
            if isinstance(loaded, dict)
            else f"a {type(loaded).__name__}"
        )
        raise CheckpointError(
            f"weights file {str(path)!r} contains {found}, not a state dict; save a dict of "
            "parameter names to tensors, alone or under 'state_dict' or 'model'"
        )
    return loaded


def _is_tensor_dict(value: dict[object, object]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _prefix_hint(file_keys: list[str], model_keys: list[str]) -> str | None:
    """Suggest stripping or adding a common key prefix such as ``module.`` (from DataParallel)."""
    for prefix in ("module.", "model.", "_orig_mod."):
        if file_keys and all(k.startswith(prefix) for k in file_keys):
            if {k[len(prefix) :] for k in file_keys} & set(model_keys):
                return f"the file's keys start with {prefix!r}, so strip that prefix"
        if model_keys and all(k.startswith(prefix) for k in model_keys):
            if {prefix + k for k in file_keys} & set(model_keys):
                return f"the model's keys start with {prefix!r} but the file's do not, so add it"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
