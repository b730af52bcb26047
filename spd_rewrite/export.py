"""Export a (rewritten) model to ONNX, to a torch.export program, or to TorchScript, and check it.

Each exporter runs the exported artifact on the example input and compares it with the eager
model: ``max|y_exported - y_eager| <= 1e-4 * max|y_eager|`` over all output tensors. Where the
model accepts a second input with a larger batch and larger spatial sizes, the export is made
dynamic along those axes and checked at that second input too.

Models are exported in eval mode; the caller's model is put back in its own mode afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spd_rewrite.errors import OutputFolderError, VerificationError
from spd_rewrite.pipeline import as_inputs
from spd_rewrite.verify import max_abs_difference

__all__ = ["EXPORT_RTOL", "export_onnx", "export_pt2", "trace_torchscript"]

logger = logging.getLogger(__name__)

# Relative bound of every export check: max|y_exported - y_eager| <= EXPORT_RTOL * max|y_eager|.
EXPORT_RTOL = 1e-4

# The second input of the dynamic-shape check adds this to the batch and to each spatial size.
_EXTRA_BATCH = 1
_EXTRA_SPATIAL = 32


@dataclass(frozen=True)
class _DynamicAxes:
    """Input axes that the model accepts at other sizes, and a second input that uses them."""

    batch: bool
    spatial: bool
    second_inputs: tuple[Any, ...] | None


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    path: str | Path,
    *,
    opset: int = 17,
    dynamic: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file and check it in onnxruntime.

    With ``dynamic``, the batch axis and the spatial axes of every input tensor are dynamic where
    the eager model accepts other sizes, and the file is checked at a second input of those sizes.
    The inputs are named ``input_0, input_1, ...`` and the outputs ``output_0, ...``, in the
    order ``torch.onnx.export`` flattens them.

    NOTE: this uses torch's TorchScript-based exporter (``dynamo=False``). The torch.export-based
    one needs the ``onnxscript`` package; it also specialises a batch of 1 to a constant.

    Returns:
        The path of the written file.

    Raises:
        OutputFolderError: the file cannot be written.
        VerificationError: the export failed or onnxruntime's outputs differ from the model's.
    """
    import onnx
    import onnxruntime

    inputs = as_inputs(example_inputs)
    target = _writable_file(path)
    with _eval_mode(model):
        axes = _dynamic_axes(model, inputs) if dynamic else _DynamicAxes(False, False, None)
        reference = _run(model, inputs)
        input_names = [f"input_{i}" for i, x in enumerate(inputs) if torch.is_tensor(x)]
        outputs = _flatten(reference)
        output_names = [f"output_{i}" for i in range(len(outputs))]
        named_tensors = [
            *zip(input_names, _tensor_inputs(inputs), strict=True),
            *zip(output_names, outputs, strict=True),
        ]
        dynamic_axes = {name: _axes_of(tensor, axes) for name, tensor in named_tensors}
        try:
            torch.onnx.export(
                model,
                inputs,
                str(target),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={name: value for name, value in dynamic_axes.items() if value},
            )
        except OSError as error:
            raise OutputFolderError(f"cannot write ONNX file {str(target)!r}: {error}") from error
        except Exception as error:
            raise VerificationError(
                f"torch.onnx.export failed for {type(model).__name__}: {_first_line(error)}"
            ) from error

        try:
            onnx.checker.check_model(str(target))
            session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        except Exception as error:
            raise VerificationError(
                f"onnxruntime cannot load {str(target)!r}: {_first_line(error)}"
            ) from error

        def run_session(values: tuple[Any, ...]) -> list[torch.Tensor]:
            feed = {
                name: x.detach().cpu().numpy()
                for name, x in zip(input_names, _tensor_inputs(values), strict=True)
            }
            return [torch.from_numpy(y) for y in session.run(None, feed)]

        _check(model, inputs, run_session, "onnxruntime", reference)
        if axes.second_inputs is not None:
            _check(model, axes.second_inputs, run_session, "onnxruntime")
    logger.info("exported %s to %s (opset %d)", type(model).__name__, target, opset)
    return target


def export_pt2(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    path: str | Path,
    *,
    dynamic: bool = True,
) -> Path:
    """Export ``model`` with ``torch.export.export``, save it as ``.pt2`` and check the saved file.

    With ``dynamic``, the batch and spatial axes that the eager model accepts at other sizes are
    marked ``Dim.AUTO``, so torch.export keeps them dynamic unless the model's code fixes them. An
    example batch of 1 is repeated to 2 for export, because torch.export turns a size-1 axis into
    a constant. The program loaded back from ``path`` is run on the example input and, where it
    accepts one, on a second input of other sizes.

    Returns:
        The path of the written file.

    Raises:
        OutputFolderError: the file cannot be written or read back.
        VerificationError: export failed or the loaded program's outputs differ from the model's.
    """
    inputs = as_inputs(example_inputs)
    target = _writable_file(path)
    with _eval_mode(model):
        axes = _dynamic_axes(model, inputs) if dynamic else _DynamicAxes(False, False, None)
        export_inputs = _repeat_batch_of_one(inputs) if axes.batch else inputs
        dynamic_shapes = [
            _auto_dims(x, axes) if torch.is_tensor(x) else None for x in export_inputs
        ]
        try:
            program = torch.export.export(
                model, export_inputs, dynamic_shapes=tuple(dynamic_shapes) if dynamic else None
            )
        except Exception as error:
            raise VerificationError(
                f"torch.export.export failed for {type(model).__name__}: {_first_line(error)}"
            ) from error

        try:
            torch.export.save(program, str(target))
            loaded = torch.export.load(str(target)).module()
        except OSError as error:
            raise OutputFolderError(
                f"cannot write or read back {str(target)!r}: {error}"
            ) from error

        def run_loaded(values: tuple[Any, ...]) -> Any:
            with torch.no_grad():
                return loaded(*values)

        _check(model, inputs, run_loaded, "the loaded torch.export program")
        if axes.second_inputs is not None and _accepts(run_loaded, axes.second_inputs):
            _check(model, axes.second_inputs, run_loaded, "the loaded torch.export program")
    logger.info("exported %s to %s", type(model).__name__, target)
    return target


def trace_torchscript(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[Any]
) -> torch.jit.ScriptModule:
    """Trace ``model`` with ``torch.jit.trace`` and check the trace against the eager model.

    The trace is checked on the example input and, where the eager model accepts one, on a second
    input with a larger batch and spatial size. A trace that recorded the example's sizes as
    constants fails that second check.

    Raises:
        VerificationError: tracing failed or the traced module's outputs differ from the model's.
    """
    inputs = as_inputs(example_inputs)
    with _eval_mode(model):
        axes = _dynamic_axes(model, inputs)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        except Exception as error:
            raise VerificationError(
                f"torch.jit.trace failed for {type(model).__name__}: {_first_line(error)}"
            ) from error

        def run_traced(values: tuple[Any, ...]) -> Any:
            with torch.no_grad():
                return traced(*values)

        _check(model, inputs, run_traced, "the TorchScript trace")
        if axes.second_inputs is not None:
            _check(model, axes.second_inputs, run_traced, "the TorchScript trace")
    return traced


def _check(
    model: nn.Module,
    inputs: tuple[Any, ...],
    run_exported: Callable[[tuple[Any, ...]], Any],
    what: str,
    reference: Any = None,
) -> None:
    """Compare ``run_exported(inputs)`` with the eager model within ``EXPORT_RTOL``."""
    if reference is None:
        reference = _run(model, inputs)
    shapes = _shapes(inputs)
    try:
        exported = run_exported(inputs)
    except Exception as error:
        raise VerificationError(
            f"{what} failed on inputs of shape {shapes}: {_first_line(error)}"
        ) from error

    expected, found = _flatten(reference), _flatten(exported)
    if [tuple(y.shape) for y in expected] != [tuple(y.shape) for y in found]:
        raise VerificationError(
            f"{what} returns shapes {[tuple(y.shape) for y in found]} on inputs of shape "
            f"{shapes}, the model {[tuple(y.shape) for y in expected]}"
        )
    difference = max_abs_difference(expected, found)
    scale = max((y.double().abs().max().item() for y in expected if y.numel()), default=0.0)
    if not difference <= EXPORT_RTOL * max(scale, 1e-12):
        raise VerificationError(
            f"{what} differs from the model on inputs of shape {shapes}: max|diff| = "
            f"{difference:.3g} > {EXPORT_RTOL:g} * max|y| = {EXPORT_RTOL * scale:.3g}"
        )
    logger.debug("%s matches the model on %s: max|diff| = %.3g", what, shapes, difference)


def _dynamic_axes(model: nn.Module, inputs: tuple[Any, ...]) -> _DynamicAxes:
    """Find which axes the eager model accepts at other sizes, trying batch and spatial together."""
    for batch, spatial in ((True, True), (True, False), (False, True)):
        second = _grown(inputs, batch, spatial)
        if second is not None and _accepts(lambda values: _run(model, values), second):
            return _DynamicAxes(batch, spatial, second)
    return _DynamicAxes(False, False, None)


def _grown(inputs: tuple[Any, ...], batch: bool, spatial: bool) -> tuple[Any, ...] | None:
    """Return ``inputs`` with random tensors of a larger batch and/or larger spatial sizes."""
    grown = []
    changed = False
    generator = torch.Generator().manual_seed(0)
    for x in inputs:
        if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
            grown.append(x)
            continue
        shape = list(x.shape)
        if batch:
            shape[0] += _EXTRA_BATCH
        if spatial and x.dim() >= 3:
            shape[2:] = [size + _EXTRA_SPATIAL for size in shape[2:]]
        changed = changed or shape != list(x.shape)
        grown.append(torch.randn(shape, generator=generator, dtype=x.dtype).to(x.device))
    return tuple(grown) if changed else None


def _accepts(run: Callable[[tuple[Any, ...]], Any], inputs: tuple[Any, ...]) -> bool:
    try:
        run(inputs)
    except Exception:  # a model that checks its input size raises whatever it likes
        return False
    return True


def _axes_of(x: torch.Tensor, axes: _DynamicAxes) -> dict[int, str]:
    """Name the dynamic axes of one input or output tensor for ``torch.onnx.export``."""
    named: dict[int, str] = {}
    if axes.batch and x.dim() >= 1:
        named[0] = "batch"
    if axes.spatial and x.dim() >= 3:
        named.update({axis: f"size_{axis - 2}" for axis in range(2, x.dim())})
    return named


def _auto_dims(x: torch.Tensor, axes: _DynamicAxes) -> dict[int, Any] | None:
    dims = {axis: torch.export.Dim.AUTO for axis in _axes_of(x, axes)}
    return dims or None


def _repeat_batch_of_one(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        torch.cat([x, x]) if torch.is_tensor(x) and x.dim() >= 1 and x.shape[0] == 1 else x
        for x in inputs
    )


def _run(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*inputs)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _flatten(value: Any) -> list[torch.Tensor]:
    """Return the tensors of an output structure in ``torch.onnx.export``'s order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flatten(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten(item)]
    return []


def _tensor_inputs(inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    return [x for x in inputs if torch.is_tensor(x)]


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in _tensor_inputs(inputs))


def _writable_file(path: str | Path) -> Path:
    target = Path(path)
    if target.is_dir():
        raise OutputFolderError(f"{str(target)!r} is a directory; pass a file path")
    if not target.parent.is_dir():
        raise OutputFolderError(
            f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist; "
            "create it first"
        )
    return target


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
