"""Trace a model into a ``torch.fx.GraphModule``, keeping untraceable submodules as leaves.

``torch.fx.symbolic_trace`` fails on a whole model when one submodule has data-dependent control
flow. :func:`trace` then marks the deepest module whose forward raised as a leaf (fx records it as
one ``call_module`` node) and traces again, until the trace succeeds or the root itself fails.

Two more kinds of submodule become leaves up front, because tracing them would fix one behaviour:

* modules whose own ``forward`` reads ``self.training`` (stochastic depth, detection heads), so that
  both their training and eval behaviour survive;
* modules the caller names in ``leaf_modules``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from spd_rewrite.errors import TraceError
from spd_rewrite.ops.blocks import REPLACEMENT_TYPES

__all__ = ["Leaf", "TraceResult", "trace"]

logger = logging.getLogger(__name__)

# Node meta key holding the qualified name of the module whose forward created the node.
MODULE_PATH_KEY = "spd_module_path"
_MAX_FALLBACKS = 64


@dataclass(frozen=True)
class Leaf:
    """A submodule traced as a single node, and why."""

    name: str
    module_type: str
    reason: str


@dataclass(frozen=True)
class TraceResult:
    """The traced graph module and the submodules kept as leaves."""

    gm: fx.GraphModule
    leaves: tuple[Leaf, ...]


class _LeafFallbackTracer(fx.Tracer):
    """An fx tracer that records module paths and treats chosen submodules as leaves."""

    def __init__(self, leaf_names: set[str] | None = None) -> None:
        # NOTE: fx re-creates a GraphModule's tracer class with no arguments when unpickling it.
        super().__init__()
        self.record_stack_traces = True
        self.leaf_names = leaf_names or set()
        self.path_stack: list[str] = []
        # Deepest module whose forward raised during the last trace, and the error.
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, REPLACEMENT_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        path = self.path(m)
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None and not self.is_leaf_module(m, path):
                self.failed_path = path
            raise
        finally:
            self.path_stack.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[MODULE_PATH_KEY] = self.path_stack[-1] if self.path_stack else ""
        return node

    def path(self, m: nn.Module) -> str:
        try:
            return self.path_of_module(m)
        except NameError:
            return type(m).__name__


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str] = (),
    leaf_fallback: bool = True,
) -> TraceResult:
    """Trace ``model`` with ``torch.fx``, falling back to leaves for untraceable submodules.

    Args:
        model: the module to trace. It is not modified.
        leaf_modules: qualified names of submodules to keep as leaves.
        leaf_fallback: trace an untraceable submodule as a leaf and go on. When false, the first
            failure raises.

    Raises:
        TraceError: the root module's own forward cannot be traced, or a submodule fails and
            ``leaf_fallback`` is false.
    """
    leaves: dict[str, Leaf] = {}
    for name in leaf_modules:
        module = _get_submodule(model, name)
        leaves[name] = Leaf(name, type(module).__name__, "named as a leaf by the caller")
    for name, module in model.named_modules():
        if isinstance(module, REPLACEMENT_TYPES):
            continue
        if name and name not in leaves and _reads_training_flag(module):
            if not any(name.startswith(parent + ".") for parent in leaves):
                leaves[name] = Leaf(
                    name,
                    type(module).__name__,
                    "its forward reads self.training; kept whole to keep train and eval behaviour",
                )

    for _ in range(_MAX_FALLBACKS):
        tracer = _LeafFallbackTracer(set(leaves))
        try:
            graph = tracer.trace(model)
        except Exception as error:  # fx raises many types: TraceError, TypeError, RuntimeError...
            failed = tracer.failed_path
            summary = _first_line(error)
            if failed is None or failed == "":
                raise TraceError(
                    f"torch.fx cannot trace the forward of {type(model).__name__}: {summary}; "
                    "make the model's own forward free of data-dependent control flow, or use "
                    "mode='modules' (--mode modules) to rewrite layers without tracing"
                ) from error
            if not leaf_fallback:
                raise TraceError(
                    f"torch.fx cannot trace submodule {failed!r} "
                    f"({type(_get_submodule(model, failed)).__name__}): {summary}; "
                    "enable leaf fallback to keep it whole"
                ) from error
            module = _get_submodule(model, failed)
            logger.info("tracing %s as a leaf: %s", failed, summary)
            leaves[failed] = Leaf(failed, type(module).__name__, f"untraceable: {summary}")
            continue

        name = type(model).__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        ordered = tuple(leaves[key] for key in sorted(leaves))
        return TraceResult(gm=gm, leaves=ordered)

    raise TraceError(
        f"gave up tracing {type(model).__name__} after {_MAX_FALLBACKS} leaf fallbacks; "
        "use mode='modules' (--mode modules) to rewrite layers without tracing"
    )


def _get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise TraceError(f"no submodule named {name!r} in {type(model).__name__}") from error


def _reads_training_flag(module: nn.Module) -> bool:
    """Check whether the module's own forward (outside torch.nn) branches on ``self.training``."""
    forward = type(module).forward
    defining_module = getattr(forward, "__module__", "") or ""
    if defining_module.startswith("torch.nn") or defining_module.startswith("torch.ao.nn"):
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    # NOTE: a textual check; a forward that reads the flag through a helper function is missed.
    return "self.training" in source


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return f"{type(error).__name__}: {message}"


def device_of(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer (CPU for none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")
