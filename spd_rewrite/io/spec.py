"""Model specs: the strings that name the model a user wants to rewrite.

A spec takes one of four forms:

* ``package.module:callable``, for example ``torchvision.models:resnet18``;
* ``path/to/file.py:callable``, a Python file imported by path;
* ``path/to/model.pt``, a whole model saved with ``torch.save(model)`` (unpickled only on request);
* the name of a bundled target, for example ``resnet18``.

``callable`` may be a dotted attribute path (``module:Class.factory``). It is called with no
arguments, unless it already is an ``nn.Module`` instance.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import pickle
import re
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from spd_rewrite.errors import ModelSpecError

__all__ = ["USER_MODULE_PREFIX", "import_source_file", "load_model"]

# Files named by path are imported under this prefix, so they never shadow an installed module of
# the same name. The rest of the name is derived from the file's absolute path, so a fresh process
# that imports the same file gets the same module name (the saved-folder format relies on this).
USER_MODULE_PREFIX = "spd_rewrite_user_"

_WEIGHTS_SUFFIXES = {".safetensors", ".bin", ".ckpt"}
_PATH_SUFFIXES = {".py", ".pt", ".pth", ".pkl", ".pickle", *_WEIGHTS_SUFFIXES}


def load_model(spec: str, *, trust_pickle: bool = False) -> nn.Module:
    """Resolve a model spec to an ``nn.Module``.

    Args:
        spec: ``package.module:callable``, ``path/to/file.py:callable``, a pickled whole model
            ``path/to/model.pt``, or the name of a bundled target.
        trust_pickle: allow unpickling a whole-model file. Unpickling runs code from the file.

    Returns:
        The model, as built by the callable or stored in the file.

    Raises:
        ModelSpecError: the spec names no file, module, attribute or target, the callable raised,
            or the result is not an ``nn.Module``.
    """
    if Path(spec).is_dir():
        raise ModelSpecError(
            f"model spec {spec!r} is a directory; a model spec is 'module:callable', "
            "'file.py:callable', a pickled model file or a bundled target name, "
            "and a weights file goes to --weights"
        )
    if Path(spec).is_file():
        return _load_pickled_model(Path(spec), trust_pickle)

    location, colon, attribute = spec.rpartition(":")
    if colon:
        if not attribute:
            raise ModelSpecError(
                f"model spec {spec!r} names no callable after ':'; write it as "
                "'module:callable' or 'file.py:callable'"
            )
        if location.endswith(".py") or "/" in location or "\\" in location:
            module = _import_file_for_spec(Path(location), spec)
            where = f"file {location!r}"
        else:
            module = _import_module_for_spec(location, spec)
            where = f"module {location!r}"
        return _build_from_attribute(module, attribute, where, spec)

    if Path(spec).suffix in _PATH_SUFFIXES or "/" in spec or "\\" in spec:
        raise ModelSpecError(f"model file {spec!r} not found; check the path")
    return _build_target(spec)


def import_source_file(path: Path, module_name: str | None = None) -> ModuleType:
    """Import a Python file by path under a name that cannot clash with installed modules.

    The module is registered in ``sys.modules``. A file imported before is returned from there
    without running it again, as ``import`` does.

    Args:
        path: the ``.py`` file.
        module_name: the name to register; by default ``USER_MODULE_PREFIX`` plus the file's stem
            and a hash of its absolute path.
    """
    path = path.resolve()
    if module_name is None:
        stem = re.sub(r"\W", "_", path.stem)
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        module_name = f"{USER_MODULE_PREFIX}{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]

    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module
    try:
        import_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import_file_for_spec(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} not found (spec {spec!r}); check the path")
    try:
        return import_source_file(path)
    except ModuleNotFoundError as error:
        raise ModelSpecError(
            f"importing model file {str(path)!r} failed: it imports module {error.name!r}, which "
            "is not installed; install it, or add the folder that contains it to PYTHONPATH"
        ) from error
    except Exception as error:
        raise ModelSpecError(
            f"importing model file {str(path)!r} failed with {_first_line(error)}; "
            "fix the error in that file"
        ) from error


def _import_module_for_spec(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):
            raise ModelSpecError(
                f"importing module {module_name!r} (spec {spec!r}) failed: it needs module "
                f"{missing!r}, which is not installed; install the package that provides it"
            ) from error
        raise ModelSpecError(
            f"module {error.name!r} not found (spec {spec!r}); install the package that "
            "provides it, check the spelling, or add its folder to PYTHONPATH"
        ) from error
    except Exception as error:
        raise ModelSpecError(
            f"importing module {module_name!r} (spec {spec!r}) failed with {_first_line(error)}"
        ) from error


def _build_from_attribute(module: ModuleType, attribute: str, where: str, spec: str) -> nn.Module:
    target: object = module
    for depth, part in enumerate(attribute.split(".")):
        if not hasattr(target, part):
            owner = where if depth == 0 else repr(".".join(attribute.split(".")[:depth]))
            names = [name for name in dir(target) if not name.startswith("__")]
            close = difflib.get_close_matches(part, names)
            hint = f"close names: {', '.join(close)}" if close else "check the name"
            raise ModelSpecError(f"{owner} defines no {part!r} (spec {spec!r}); {hint}")
        target = getattr(target, part)

    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise ModelSpecError(
            f"{attribute!r} in {where} has type {type(target).__name__}, not a callable or an "
            f"nn.Module (spec {spec!r}); name a function or class that builds the model"
        )
    try:
        model = target()
    except Exception as error:
        raise ModelSpecError(
            f"calling {attribute}() from {where} failed with {_first_line(error)} (spec {spec!r}); "
            "the callable must build the model without arguments, so wrap it in a function that "
            "passes them"
        ) from error
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{attribute}() from {where} returned {type(model).__name__}, not an nn.Module "
            f"(spec {spec!r}); name a function or class that builds a torch.nn.Module"
        )
    return model


def _load_pickled_model(path: Path, trust_pickle: bool) -> nn.Module:
    if path.suffix in _WEIGHTS_SUFFIXES:
        raise ModelSpecError(
            f"model spec {str(path)!r} is a weights file; name the model as 'module:callable', "
            "'file.py:callable' or a bundled target, and pass this file with --weights"
        )
    if path.suffix == ".py":
        raise ModelSpecError(
            f"model spec {str(path)!r} names a Python file but no callable; write it as "
            f"'{path}:build_model', naming the function or class that builds the model"
        )

    # A weights-only load runs no code from the file, so it is safe to try first: a file that loads
    # this way is a state dict or plain data, never a whole model.
    try:
        plain = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        plain = None
    except Exception as error:
        raise ModelSpecError(
            f"model file {str(path)!r} cannot be read: {_first_line(error)}; "
            "it may be truncated or not a torch.save file"
        ) from error
    if plain is not None:
        raise ModelSpecError(
            f"model file {str(path)!r} contains plain data of type {type(plain).__name__}, not "
            "a pickled nn.Module; name the model as 'module:callable' or 'file.py:callable' "
            "and pass a state dict file with --weights"
        )

    if not trust_pickle:
        raise ModelSpecError(
            f"model file {str(path)!r} is a pickled model, and unpickling runs code from the "
            "file; pass --trust-pickle (trust_pickle=True) only for files you trust"
        )
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelSpecError(
            f"unpickling model file {str(path)!r} failed with {_first_line(error)}; the "
            "classes it stores must be importable, so install or add to PYTHONPATH the code "
            "that defines them"
        ) from error
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model file {str(path)!r} contains an object of type {type(model).__name__}, not "
            "an nn.Module; "
            "save the whole model with torch.save(model, path)"
        )
    return model


def _build_target(name: str) -> nn.Module:
    try:
        from spd_rewrite.targets import build_target
    except ImportError as error:
        raise ModelSpecError(
            f"model spec {name!r} is not a file or 'module:callable', and bundled targets cannot "
            f"be loaded ({_first_line(error)}); give the model as 'module:callable'"
        ) from error
    return build_target(name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
