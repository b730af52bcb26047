"""Check a rewritten model against the original on the example input.

The outputs must have the same structure and shapes (unless a rule removed a pool, which may change
them), and with exact transfer the same values within ``rtol * max|y_original|``. What is left to
downsample is counted on the rewritten model itself, not taken from the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from spd_rewrite.errors import ModelForwardError, VerificationError
from spd_rewrite.graph.fx_ops import OpKind, classify_module
from spd_rewrite.graph.match import find_candidates
from spd_rewrite.graph.shapes import propagate_shapes, tensor_shapes
from spd_rewrite.ops.blocks import REPLACEMENT_TYPES

__all__ = ["Verification", "max_abs_difference", "run_model", "verify"]

logger = logging.getLogger(__name__)

# Relative bound of exact transfer: max|y_new - y_old| <= EXACT_RTOL * max|y_old|.
EXACT_RTOL = 1e-4


@dataclass(frozen=True)
class Verification:
    """Outcome of verification: output shapes, errors and the downsampling steps left."""

    output_shapes_before: Any
    output_shapes_after: Any
    max_abs_error: float | None
    max_abs_output: float
    downsampling_left: int
    left: tuple[str, ...]  # names of the downsampling steps still in the model


def run_model(model: nn.Module, example_inputs: tuple[Any, ...]) -> Any:
    """Run ``model`` on the inputs under ``torch.no_grad``; wrap its errors as user errors."""
    try:
        with torch.no_grad():
            return model(*example_inputs)
    except Exception as error:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs if torch.is_tensor(x))
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelForwardError(
            f"{type(model).__name__} raised {type(error).__name__} on the example input of shape "
            f"{shapes}: {first}; check --input-shape (channels and size) against the model"
        ) from error


def verify(
    rewritten: nn.Module,
    example_inputs: tuple[Any, ...],
    reference_output: Any,
    *,
    shapes_may_change: bool,
    exact: bool,
    leaf_names: Iterable[str] = (),
) -> Verification:
    """Run the rewritten model and compare it with ``reference_output``.

    Raises:
        VerificationError: the rewritten model raises on the example input, the output structure
            or shapes differ (and no rule allowed it), the output is not finite where the
            original was, or exact transfer missed the bound.
    """
    if isinstance(rewritten, fx.GraphModule):
        try:
            record = propagate_shapes(rewritten, example_inputs)
        except Exception as error:
            raise VerificationError(_rewritten_failed(error, shapes_may_change)) from error
        output = record.output
        left = [c.name for c in find_candidates(rewritten, record.shapes) if c.downsampling]
        left += _strided_modules_in(rewritten, leaf_names)
    else:
        # The original ran on this input, so an error here comes from the rewrite, not the input.
        try:
            with torch.no_grad():
                output = rewritten(*example_inputs)
        except Exception as error:
            raise VerificationError(_rewritten_failed(error, shapes_may_change)) from error
        left = _strided_modules_in(rewritten, [""])

    before = tensor_shapes(reference_output)
    after = tensor_shapes(output)
    if _structure(reference_output) != _structure(output):
        raise VerificationError(
            f"the rewritten model returns a different output structure: {_brief(before)} before, "
            f"{_brief(after)} after"
        )
    if before != after and not shapes_may_change:
        raise VerificationError(
            f"the rewritten model changes the output shapes from {_brief(before)} to "
            f'{_brief(after)}; a rule that changes shapes must say so (action = "remove")'
        )

    difference: float | None = None
    scale = _max_abs(reference_output)
    if before == after:
        difference = max_abs_difference(reference_output, output)
        if math.isnan(difference) and not math.isnan(scale):
            raise VerificationError("the rewritten model returns NaN where the original did not")
        if exact and difference > EXACT_RTOL * max(scale, 1e-12):
            raise VerificationError(
                f"exact transfer missed its bound: max|y_new - y_old| = {difference:.3g} > "
                f"{EXACT_RTOL:g} * max|y_old| = {EXACT_RTOL * scale:.3g}"
            )
    return Verification(before, after, difference, scale, len(left), tuple(left))


def _rewritten_failed(error: Exception, shapes_may_change: bool) -> str:
    text = str(error).strip()
    message = (
        f"the rewritten model failed on the example input: {type(error).__name__}: "
        f"{text.splitlines()[0] if text else ''}"
    )
    if shapes_may_change:
        message += (
            '; a rule with action = "remove" changed a shape that a later layer depends on, '
            "so exclude that pool from the rule"
        )
    return message


def max_abs_difference(a: Any, b: Any) -> float:
    """Return the largest absolute difference over the tensors of two output structures."""
    left = [t for t in _tensors(a)]
    right = [t for t in _tensors(b)]
    worst = 0.0
    for x, y in zip(left, right, strict=True):
        if x.shape != y.shape or not x.is_floating_point():
            continue
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def _max_abs(value: Any) -> float:
    values = [t.double().abs().max().item() for t in _tensors(value) if t.numel()]
    return max(values, default=0.0)


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if torch.is_tensor(v) else None)
    return found


def _structure(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda v: "tensor" if torch.is_tensor(v) else type(v))


def _brief(shapes: Any) -> str:
    text = str(shapes)
    return text if len(text) <= 120 else text[:117] + "..."


def _strided_modules_in(model: nn.Module, roots: Iterable[str]) -> list[str]:
    """Name the strided conv and pool modules under ``roots`` (outside replacement blocks)."""
    names = []
    for root in roots:
        base = model.get_submodule(root) if root else model
        skip: set[str] = set()
        for name, module in base.named_modules():
            full = f"{root}.{name}" if root and name else (root or name)
            if any(full.startswith(prefix) for prefix in skip):
                continue
            if isinstance(module, REPLACEMENT_TYPES):
                skip.add(full + ".")
                continue
            op = classify_module(module)
            if op is not None and op.kind is not OpKind.MEAN and op.is_strided:
                names.append(full)
    return names
