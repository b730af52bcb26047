"""The saved-folder format: a model that loads back without unpickling.

A saved folder contains:

* ``manifest.json``: the format version, the spd-rewrite and torch versions that wrote it, the list
  of files, and the caller's metadata;
* ``model.json``: the module tree (classes as import paths, plain attributes, children, tensor
  names) and, for every ``torch.fx.GraphModule``, its graph node by node;
* ``model.safetensors``: every parameter, buffer (persistent or not) and tensor attribute, under
  its qualified name, once per tensor object (tied weights are stored once);
* ``model.py``: the generated forward code of each GraphModule, for reading only (loading rebuilds
  the graphs from ``model.json`` and never runs this file);
* any extra files the caller passes, such as a report.

Loading imports the classes the folder names, so the packages that define them must be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import fx, nn

import spd_rewrite
from spd_rewrite.errors import OutputFolderError
from spd_rewrite.io._module_tree import (
    ModuleTreeEncoder,
    build_module_tree,
    first_line,
    import_path,
)
from spd_rewrite.io.checkpoint import unshared_cpu_tensors

__all__ = ["FORMAT_VERSION", "load", "read_manifest", "save"]

FORMAT_VERSION = 1
FORMAT_NAME = "spd-rewrite saved model"

MANIFEST_FILE = "manifest.json"
TREE_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
SOURCE_FILE = "model.py"
_RESERVED_FILES = (MANIFEST_FILE, TREE_FILE, WEIGHTS_FILE, SOURCE_FILE)


def save(
    module: nn.Module,
    folder: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    force: bool = False,
) -> Path:
    """Save ``module`` as a folder that :func:`load` turns back into a runnable, trainable module.

    The folder is built under a temporary name next to ``folder`` and renamed into place when
    complete, so a failure leaves no partial folder. Parent folders are created as needed.

    Args:
        module: the module to save; tensors are written from the CPU and load onto the CPU.
        folder: the output folder. It must not exist or must be empty, unless ``force`` is set.
        metadata: JSON-serializable data stored in ``manifest.json`` under ``"metadata"``.
        extra_files: more files to write into the folder, by file name (str is written as UTF-8).
        force: replace an existing non-empty folder, after the new one is complete.

    Returns:
        The folder path.

    Raises:
        OutputFolderError: the folder exists and is not empty, an extra file name is invalid, the
            metadata is not JSON, part of the model cannot be saved (the message names the
            module path, attribute or node), or writing a file failed. An ``OSError`` from the
            final rename into place propagates as is.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output folder {str(folder)!r} is a file; choose another path")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise OutputFolderError(
            f"output folder {str(folder)!r} exists and is not empty; choose another folder or "
            "pass --force (force=True) to replace it"
        )
    _check_extra_file_names(extra_files or {})

    # Everything is encoded in memory first, so most errors surface before any file exists.
    encoder = ModuleTreeEncoder()
    tree = encoder.encode(module)
    files: dict[str, bytes] = {TREE_FILE: _json_bytes(tree)}
    if encoder.graph_modules:
        files[SOURCE_FILE] = _graph_source(encoder.graph_modules).encode()
    for name, content in (extra_files or {}).items():
        files[name] = content.encode() if isinstance(content, str) else bytes(content)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spd_rewrite_version": spd_rewrite.__version__,
        "torch_version": torch.__version__,
        "files": sorted([WEIGHTS_FILE, *files]),
        "metadata": dict(metadata or {}),
    }
    try:
        files[MANIFEST_FILE] = _json_bytes(manifest)
    except (TypeError, ValueError) as error:
        raise OutputFolderError(
            f"cannot save to {str(folder)!r}: the metadata is not JSON-serializable "
            f"({first_line(error)}); pass only str, int, float, bool, None, lists and "
            "str-keyed dicts"
        ) from error

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        try:
            safetensors.torch.save_file(
                unshared_cpu_tensors(encoder.tensors),
                staging / WEIGHTS_FILE,
                metadata={"format": "pt"},
            )
            for name, content in files.items():
                (staging / name).write_bytes(content)
        except (OSError, SafetensorError) as error:
            raise OutputFolderError(
                f"writing the saved folder {str(folder)!r} failed ({first_line(error)}); "
                "check the free space and permissions of its parent folder"
            ) from error
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load(folder: str | os.PathLike[str]) -> nn.Module:
    """Load a module from a folder written by :func:`save`, without unpickling.

    The module comes back on the CPU, with the same classes, attributes, ``training`` flags,
    parameters (tied ones still tied), buffers and, for GraphModules, the same graph and code.

    Raises:
        OutputFolderError: the folder is missing, is not a saved folder, was written by a newer
            format version, names a class that cannot be imported, or has a corrupt file.
    """
    folder = Path(folder)
    read_manifest(folder)
    tree = _read_json(folder, TREE_FILE)
    try:
        tensors = safetensors.torch.load_file(folder / WEIGHTS_FILE, device="cpu")
    except (SafetensorError, OSError) as error:
        raise OutputFolderError(
            f"saved folder {str(folder)!r}: {WEIGHTS_FILE} cannot be read "
            f"({first_line(error)}); it is missing or corrupt, so save the model again"
        ) from error
    try:
        return build_module_tree(tree, tensors, folder)
    except (KeyError, TypeError) as error:
        raise OutputFolderError(
            f"saved folder {str(folder)!r}: {TREE_FILE} is malformed ({first_line(error)}); "
            "save the model again"
        ) from error


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a saved folder.

    Raises:
        OutputFolderError: the folder or manifest is missing, or the format version is newer than
            this version of spd-rewrite reads.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputFolderError(f"saved folder {str(folder)!r} not found; check the path")
    if not (folder / MANIFEST_FILE).is_file():
        raise OutputFolderError(
            f"{str(folder)!r} is not a saved spd-rewrite folder (it has no {MANIFEST_FILE}); "
            "pass a folder written by spd_rewrite.save"
        )
    manifest = _read_json(folder, MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise OutputFolderError(
            f"{str(folder)!r} is not a saved spd-rewrite folder ({MANIFEST_FILE} does not name "
            f"the format {FORMAT_NAME!r}); pass a folder written by spd_rewrite.save"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise OutputFolderError(
            f"saved folder {str(folder)!r} has format version {version!r}, written by "
            f"spd-rewrite {manifest.get('spd_rewrite_version')}, but this spd-rewrite "
            f"{spd_rewrite.__version__} reads up to version {FORMAT_VERSION}; upgrade spd-rewrite"
        )
    return manifest


def _check_extra_file_names(extra_files: Mapping[str, str | bytes]) -> None:
    for name in extra_files:
        if name in _RESERVED_FILES:
            raise OutputFolderError(
                f"extra file name {name!r} is reserved for the saved model; rename the file"
            )
        if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
            raise OutputFolderError(
                f"extra file name {name!r} is not a plain file name; pass names such as "
                "'report.json', without folders"
            )


def _json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=1, allow_nan=False) + "\n").encode()


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputFolderError(
            f"saved folder {str(folder)!r}: {name} cannot be read ({first_line(error)}); "
            "it is missing or corrupt, so save the model again"
        ) from error


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename the complete ``staging`` folder to ``folder``, replacing an existing one."""
    if not folder.exists():
        staging.rename(folder)
        return
    holder = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.previous-"))
    previous = holder / folder.name
    folder.rename(previous)
    try:
        staging.rename(folder)
    except BaseException:
        previous.rename(folder)
        holder.rmdir()
        raise
    shutil.rmtree(holder)


# ---------------------------------------------------------------------------------------------
# model.py


def _graph_source(graph_modules: Mapping[str, fx.GraphModule]) -> str:
    """Return the generated code of each GraphModule as one readable Python module.

    Every GraphModule becomes a class whose ``forward`` is the code ``torch.fx`` generates, and
    every global that code uses is imported by name at the top.
    """
    globals_used: dict[str, object] = {"torch": torch}
    classes: list[str] = []
    for path, gm in graph_modules.items():
        python_code = gm.graph.python_code(root_module="self")
        for name, value in python_code.globals.items():
            known = globals_used.get(name, value)
            if known is not value and not _same_float(known, value):
                raise OutputFolderError(
                    f"cannot write {SOURCE_FILE}: the generated code of two GraphModules uses the "
                    f"name {name!r} for different objects; rename one of the functions"
                )
            globals_used[name] = value
        class_name = type(gm).__name__ + ("" if not path else "_" + path.replace(".", "_"))
        lines = python_code.src.strip("\n").splitlines()
        body = "\n".join(f"    {line}" if line.strip() else "" for line in lines)
        location = f"the GraphModule at {path!r}" if path else "the root GraphModule"
        classes.append(f"class {class_name}(torch.nn.Module):\n    # {location}\n{body.rstrip()}\n")

    header = (
        '"""The forward code of the torch.fx graphs in this saved folder, for reading.\n\n'
        f"spd_rewrite.io.load rebuilds the graphs from {TREE_FILE} and never runs this file.\n"
        '"""\n\n'
    )
    imports: set[str] = set()
    assignments: set[str] = set()
    for name, value in sorted(globals_used.items()):
        statement, assignment = _binding(name, value)
        if statement:
            imports.add(statement)
        if assignment:
            assignments.add(assignment)
    # Plain imports first, then from-imports, then assignments that use them.
    ordered = sorted(imports, key=lambda line: (line.startswith("from "), line))
    bindings = "\n".join(ordered) + ("\n\n" + "\n".join(sorted(assignments)) if assignments else "")
    return header + bindings + "\n\n\n" + "\n\n".join(classes)


def _binding(name: str, value: object) -> tuple[str | None, str | None]:
    """Return an import statement and an assignment that bind ``name`` to ``value``."""
    if isinstance(value, types.ModuleType):
        alias = "" if name == value.__name__ else f" as {name}"
        return f"import {value.__name__}{alias}", None
    if isinstance(value, float):
        return None, f'{name} = float("{value!r}")'
    if value is type(None):
        return None, f"{name} = type(None)"
    if isinstance(value, str):
        # A string annotation (modules with `from __future__ import annotations`).
        return None, f"{name} = {value!r}"
    reference = import_path(value)
    if reference is None:
        raise OutputFolderError(
            f"cannot write {SOURCE_FILE}: the generated code uses {name!r} ({value!r}), which "
            "cannot be imported by name; use functions defined at the top level of a module"
        )
    module_name, _, qualname = reference.partition(":")
    if "." not in qualname:
        alias = "" if name == qualname else f" as {name}"
        return f"from {module_name} import {qualname}{alias}", None
    return f"import {module_name}", f"{name} = {module_name}.{qualname}"


def _same_float(first: object, second: object) -> bool:
    """Return whether both are floats with the same repr, so that ``nan`` matches ``nan``."""
    return isinstance(first, float) and isinstance(second, float) and repr(first) == repr(second)
