"""Walk the graph from conv-first blocks and decide how each node carries the wider channels.

:class:`Walk` visits nodes in graph order. Each node either passes a widened tensor on (per-channel
layers, channel-wise ops, concats), absorbs it (convs and linear layers, whose input is edited), or
stops propagation with a :class:`ChannelStop` naming the node and the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from spd_rewrite.graph.build import Built
from spd_rewrite.graph.channel_edits import (
    Layout,
    Segment,
    WidenError,
    layer_channels,
    merge_segments,
    original_width,
    widened_width,
)
from spd_rewrite.graph.fx_ops import OpKind, classify_node
from spd_rewrite.graph.match import layer_name
from spd_rewrite.ops.blocks import ConvSPD

__all__ = ["ChannelStop", "ModuleEdit", "PropagationStopped", "Walk", "Wide", "channels_of"]

logger = logging.getLogger(__name__)

# Modules whose output has the input's channels, each computed from its own channel only.
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.LeakyReLU, nn.ELU,
    nn.CELU, nn.SELU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS = frozenset({
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.silu, F.hardswish, F.hardsigmoid,
    F.gelu, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, torch.clamp, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.interpolate,
})  # fmt: skip
_CHANNELWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "contiguous",
    "clone", "detach", "float", "half", "double", "to",
})  # fmt: skip
_ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
})  # fmt: skip
_ELEMENTWISE_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})
_CONCAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})
_SPLIT_TARGETS = frozenset({
    torch.split, torch.chunk, torch.tensor_split, torch.unbind, torch.narrow, "split", "chunk",
    "tensor_split", "unbind", "narrow",
})  # fmt: skip
_POOL_KINDS = frozenset({
    OpKind.MAX_POOL, OpKind.AVG_POOL, OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL,
    OpKind.LP_POOL,
})  # fmt: skip


@dataclass(frozen=True)
class ChannelStop:
    """The node where propagation stopped, its op, the reason, and the blocks that reach it."""

    node: str
    op: str
    name: str
    reason: str
    producers: frozenset[str]


class PropagationStopped(Exception):
    def __init__(self, stop: ChannelStop) -> None:
        super().__init__(stop.reason)
        self.stop = stop


@dataclass(frozen=True)
class Wide:
    """A tensor whose channels changed: its layout, the blocks it comes from, the path so far."""

    layout: Layout
    producers: frozenset[str]
    path: tuple[str, ...]
    positions: int | None = None  # after a flatten: spatial positions per channel


@dataclass
class ModuleEdit:
    """A layer widened to read ``layout``, and the blocks whose channels reach it."""

    layout: Layout
    positions: int
    module: nn.Module
    producers: frozenset[str]


class Walk:
    """Visitor of the nodes that read a widened tensor, in graph order, recording the edits."""

    def __init__(
        self,
        gm: fx.GraphModule,
        blocks: Mapping[str, Built],
        shapes: Mapping[str, Any],
        exact: bool,
    ) -> None:
        self.gm = gm
        self.blocks = blocks
        self.shapes = shapes
        self.exact = exact
        self.state: dict[str, Wide] = {}
        self.module_edits: dict[str, ModuleEdit] = {}
        self.block_edits: dict[str, nn.Module] = {}
        self.lines: list[str] = []
        self.approximate: set[str] = set()

    def visit(self, node: fx.Node) -> None:
        wide = [arg for arg in node.all_input_nodes if arg.name in self.state]
        if not wide:
            return
        first = self.state[wide[0].name]
        producers = frozenset().union(*(self.state[arg.name].producers for arg in wide))
        result = self._handle(node, first, producers)
        if result is not None:
            self.state[node.name] = result

    def stop(self, node: fx.Node, reason: str, producers: frozenset[str]) -> PropagationStopped:
        stop = ChannelStop(node.name, _describe(node, self.gm), layer_name(node), reason, producers)
        return PropagationStopped(stop)

    def _handle(self, node: fx.Node, wide: Wide, producers: frozenset[str]) -> Wide | None:
        if node.op == "output":
            raise self.stop(node, "the widened tensor reaches the model's output", producers)
        if node.op == "call_module":
            return self._module(node, wide, producers)
        if node.op not in ("call_function", "call_method"):
            raise self.stop(node, f"unknown node kind {node.op!r}", producers)

        target = node.target
        if _in(target, _ELEMENTWISE_FUNCTIONS) or target in _ELEMENTWISE_METHODS:
            return self._elementwise(node, wide, producers)
        if _in(target, _CONCAT_FUNCTIONS):
            return self._concat(node, producers)
        if _in(target, _SPLIT_TARGETS):
            raise self.stop(node, "it splits the widened tensor", producers)
        if target is operator.getitem:
            raise self.stop(node, "it indexes the widened tensor", producers)
        if target is getattr:
            raise self.stop(node, "it reads an attribute such as the shape", producers)
        if target is torch.flatten or target == "flatten":
            start, end = _flatten_dims(node)
            return self._flatten(node, wide, start, end, producers)
        if target in ("view", "reshape") or target is torch.reshape:
            return self._reshape(node, wide, producers)
        if target == "size":
            return self._size(node, producers)
        if _in(target, _CHANNELWISE_FUNCTIONS) or target in _CHANNELWISE_METHODS:
            return self._channelwise(node, wide, producers)

        op = classify_node(node, self.gm)
        if op is not None and op.kind is OpKind.MEAN:
            return self._mean(node, wide, op.mean_dims, producers)
        if op is not None and op.kind in _POOL_KINDS and not op.unsupported:
            return self._channelwise(node, wide, producers)
        if op is not None and op.kind is OpKind.CONV:
            raise self.stop(
                node,
                f"a functional {op.op_name} keeps its weight tensor, which propagation does not "
                "widen; use an nn.Conv module",
                producers,
            )
        raise self.stop(
            node,
            "propagation does not know this op, and does not assume that it is channel-wise",
            producers,
        )

    def _module(self, node: fx.Node, wide: Wide, producers: frozenset[str]) -> Wide | None:
        target = str(node.target)
        module = self.gm.get_submodule(target)
        block = self.blocks.get(node.name)
        if block is not None:
            if block.module is None:  # a removed pool passes channels through
                return self._channelwise(node, wide, producers)
            if isinstance(block.module, ConvSPD):
                edit = self._edit(node, block.module.conv, wide, producers)
                self.block_edits[node.name] = edit
                self.lines.append(" -> ".join((*wide.path, f"{layer_name(node)}.in")))
                return None
            raise self.stop(
                node,
                f"it is replaced by {block.description}, which cannot take a widened input; "
                'give its rule order = "conv-first" too, or keep it',
                producers,
            )

        if isinstance(module, nn.Flatten):
            return self._flatten(node, wide, module.start_dim, module.end_dim, producers)
        if isinstance(module, _CHANNELWISE_MODULES) or (
            isinstance(module, nn.PReLU) and module.num_parameters == 1
        ):
            return self._channelwise(node, wide, producers)
        op = classify_node(node, self.gm)
        if op is not None and op.kind in _POOL_KINDS and not op.unsupported:
            return self._channelwise(node, wide, producers)

        entry = layer_channels(module)
        if entry is None:
            kind = type(module)
            reason = f"{kind.__name__} is not a layer whose channels propagation can edit"
            if not kind.__module__.startswith("torch.nn"):
                reason = f"submodule {target!r} ({kind.__name__}) is kept whole by tracing"
            raise self.stop(node, reason, producers)
        edited = self.module_edits.get(target)
        if edited is None:
            self.module_edits[target] = ModuleEdit(
                wide.layout, wide.positions or 1, self._edit(node, module, wide, producers),
                producers,
            )  # fmt: skip
        elif (edited.layout, edited.positions) != (wide.layout, wide.positions or 1):
            raise self.stop(
                node,
                f"module {target!r} is called again with another channel layout",
                producers,
            )
        if not entry.exact:
            self.approximate |= producers
        if entry.per_channel:
            return dataclasses.replace(wide, producers=producers, path=(*wide.path, target))
        self.lines.append(" -> ".join((*wide.path, f"{target}.in")))
        return None

    def _edit(
        self, node: fx.Node, module: nn.Module, wide: Wide, producers: frozenset[str]
    ) -> nn.Module:
        """Rebuild ``module`` for the widened input, after checking its channel count."""
        entry = layer_channels(module)
        assert entry is not None
        positions = wide.positions
        if isinstance(module, nn.Linear) and positions is None:
            rank = len(self.shapes.get(node.all_input_nodes[0].name) or ())
            if rank != 2:
                raise self.stop(
                    node,
                    f"nn.Linear reads the last axis of a {rank}-d tensor, not its channels",
                    producers,
                )
            positions = 1
        elif not isinstance(module, nn.Linear) and positions is not None:
            raise self.stop(node, "it reads the flattened features of the widened tensor",
                            producers)  # fmt: skip

        expected = original_width(wide.layout) * (positions or 1)
        if entry.read_in(module) != expected:
            raise self.stop(
                node,
                f"it expects {entry.read_in(module)} input channels, but the original tensor "
                f"has {expected}",
                producers,
            )
        try:
            return entry.edit_in(module, wide.layout, self.exact, positions or 1)
        except WidenError as error:
            raise self.stop(node, str(error), producers) from None

    def _channelwise(self, node: fx.Node, wide: Wide, producers: frozenset[str]) -> Wide:
        extra = [arg for arg in node.all_input_nodes if arg is not node.all_input_nodes[0]]
        if node.all_input_nodes[0].name not in self.state or extra:
            raise self.stop(node, "it takes a second tensor besides the widened one", producers)
        return dataclasses.replace(wide, path=(*wide.path, layer_name(node)))

    def _elementwise(self, node: fx.Node, wide: Wide, producers: frozenset[str]) -> Wide:
        out_rank = len(self.shapes.get(node.name) or ())
        for operand in (*node.args[:2], node.kwargs.get("other")):
            if not isinstance(operand, fx.Node):
                continue  # a Python number broadcasts to every channel
            other = self.state.get(operand.name)
            if other is not None:
                if (other.layout, other.positions) != (wide.layout, wide.positions):
                    raise self.stop(
                        node,
                        f"it combines tensors with different channel layouts "
                        f"({_fmt_layout(wide.layout)} and {_fmt_layout(other.layout)})",
                        producers,
                    )
                continue
            shape = self.shapes.get(operand.name)
            if not (isinstance(shape, tuple) and all(isinstance(v, int) for v in shape)):
                continue  # not a tensor
            axis = 1 - (out_rank - len(shape))
            if axis >= 0 and shape[axis] > 1:
                raise self.stop(
                    node,
                    f"the widened tensor ({widened_width(wide.layout)} channels) meets "
                    f"{operand.name!r} with its original {shape[axis]} channels, as in a residual "
                    "connection",
                    producers,
                )
        return dataclasses.replace(wide, producers=producers, path=(*wide.path, layer_name(node)))

    def _concat(self, node: fx.Node, producers: frozenset[str]) -> Wide:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(self.shapes.get(node.name) or ())
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or rank < 2:
            raise self.stop(node, "its inputs or dim are computed at run time", producers)
        states = [self.state.get(t.name) if isinstance(t, fx.Node) else None for t in tensors]
        if any(s is not None and s.positions is not None for s in states):
            raise self.stop(node, "it concatenates flattened features", producers)
        first = next(s for s in states if s is not None)
        if dim % rank != 1:
            if any(s is None or s.layout != first.layout for s in states):
                raise self.stop(
                    node,
                    f"it concatenates along dim {dim} tensors with different channel layouts",
                    producers,
                )
            return dataclasses.replace(first, producers=producers,
                                       path=(*first.path, layer_name(node)))  # fmt: skip

        segments: list[Segment] = []
        start = total = 0
        for tensor, state in zip(tensors, states, strict=True):
            if state is None:
                segments.append(Segment(channels_of(self.shapes, tensor.name), 1, "unshuffle"))
            else:
                if state is first:
                    start = widened_width(tuple(segments))
                segments.extend(state.layout)
            total = widened_width(tuple(segments))
        stop = start + widened_width(first.layout)
        label = f"{layer_name(node)}[{start}:{stop} of {total}]"
        return Wide(merge_segments(tuple(segments)), producers, (*first.path, label))

    def _flatten(
        self, node: fx.Node, wide: Wide, start: int, end: int, producers: frozenset[str]
    ) -> Wide:
        shape = self.shapes.get(node.all_input_nodes[0].name) or ()
        rank = len(shape)
        start, end = start % rank, end % rank
        if wide.positions is None and start >= 2:
            return dataclasses.replace(wide, path=(*wide.path, layer_name(node)))
        if wide.positions is None and start == 1 and end == rank - 1:
            positions = math.prod(shape[2:])
            return dataclasses.replace(wide, path=(*wide.path, layer_name(node)),
                                       positions=positions)  # fmt: skip
        raise self.stop(node, "it flattens the channel axis together with another one", producers)

    def _reshape(self, node: fx.Node, wide: Wide, producers: frozenset[str]) -> Wide:
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        shape = self.shapes.get(node.all_input_nodes[0].name) or ()
        if wide.positions is None and len(shape) >= 2 and len(sizes) == 2 and sizes[1] == -1:
            # (N, C, *spatial) -> (N, -1): the same as torch.flatten(x, 1).
            return self._flatten(node, wide, 1, -1, producers)
        raise self.stop(
            node,
            f"it reshapes the widened tensor to the fixed size {tuple(sizes)}; use "
            "torch.flatten(x, 1) or x.view(x.size(0), -1)",
            producers,
        )

    def _size(self, node: fx.Node, producers: frozenset[str]) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        rank = len(self.shapes.get(node.all_input_nodes[0].name) or ())
        if not isinstance(dim, int) or rank == 0 or dim % rank == 1:
            raise self.stop(node, "it reads the channel count of the widened tensor", producers)
        return None

    def _mean(
        self, node: fx.Node, wide: Wide, dims: tuple[int, ...], producers: frozenset[str]
    ) -> Wide:
        rank = len(self.shapes.get(node.all_input_nodes[0].name) or ())
        if not dims or rank == 0 or any(d % rank < 2 for d in dims):
            raise self.stop(node, "it averages over the channel or batch axis", producers)
        return self._channelwise(node, wide, producers)

    def check_shared_modules(self) -> None:
        """Reject a widened module that is also called with its original channels."""
        for node in self.gm.graph.nodes:
            edit = self.module_edits.get(str(node.target)) if node.op == "call_module" else None
            if edit is None or node.name in self.blocks:
                continue
            if not any(arg.name in self.state for arg in node.all_input_nodes):
                raise self.stop(
                    node,
                    f"module {node.target!r} is widened for another call but is called here "
                    "with its original channels",
                    edit.producers,
                )


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return int(start), int(end)


def _in(target: Any, functions: frozenset[Any]) -> bool:
    try:
        return target in functions
    except TypeError:  # unhashable target
        return False


def channels_of(shapes: Mapping[str, Any], name: str) -> int:
    shape = shapes.get(name)
    assert isinstance(shape, tuple) and len(shape) >= 2, f"no tensor shape for node {name}"
    return int(shape[1])


def _fmt_layout(layout: Layout) -> str:
    return " + ".join(f"{s.channels}x{s.factor}" for s in layout)


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        target = node.target
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", str(target))
        return f"{module.removeprefix('_')}.{name}" if module else name
    return node.op
