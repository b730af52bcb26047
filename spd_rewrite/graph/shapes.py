"""Run an example input through a graph, recording every node's output shape.

The shapes decide the SPD layout (channel counts of functional ops, input sizes) and fill the
report. Values of chosen nodes can be kept too: the inputs and outputs of replaced ops are what
the per-layer error of exact transfer is measured on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["ShapeRecord", "propagate_shapes", "tensor_shapes"]

logger = logging.getLogger(__name__)


@dataclass
class ShapeRecord:
    """Output shapes of every node, plus the values kept for chosen nodes."""

    shapes: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    output: Any = None


def tensor_shapes(value: Any) -> Any:
    """Return ``value`` with every tensor replaced by its shape as a tuple of ints."""
    return fx.node.map_aggregate(
        value, lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None
    )


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str], record: ShapeRecord) -> None:
        super().__init__(gm)
        self.keep = keep
        self.record = record

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:
            error.add_note(f"while running node {n.name!r} ({n.format_node()})")
            raise
        self.record.shapes[n.name] = tensor_shapes(result)
        if n.name in self.keep:
            self.record.values[n.name] = _detach(result)
        return result


def _detach(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda v: v.detach() if isinstance(v, torch.Tensor) else v)


def propagate_shapes(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...], keep: Iterable[str] = ()
) -> ShapeRecord:
    """Run ``example_inputs`` through ``gm`` under ``torch.no_grad`` and record node shapes.

    Args:
        gm: the graph module, in the mode it should run in.
        example_inputs: positional inputs of its forward.
        keep: names of nodes whose output values to keep (detached).
    """
    record = ShapeRecord()
    with torch.no_grad():
        record.output = _Recorder(gm, set(keep), record).run(*example_inputs)
    return record
