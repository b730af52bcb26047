"""Recognise the window ops that the pass can match, in module and functional form.

This is the one place that reads fx op strings (``call_module``, ``call_function``,
``call_method``) and call targets. Everything downstream works on :class:`WindowOp` records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["OpKind", "WindowOp", "classify_module", "classify_node", "describe_op"]

logger = logging.getLogger(__name__)


class OpKind(StrEnum):
    """Kinds of op the pass recognises."""

    CONV = "conv"
    MAX_POOL = "max_pool"
    AVG_POOL = "avg_pool"
    ADAPTIVE_AVG_POOL = "adaptive_avg_pool"
    ADAPTIVE_MAX_POOL = "adaptive_max_pool"
    LP_POOL = "lp_pool"
    MEAN = "mean"
    RESIZE = "resize"  # transposed convs, interpolation, pixel shuffle: look-alikes, never matched


POOL_KINDS = frozenset({OpKind.MAX_POOL, OpKind.AVG_POOL})


@dataclass(frozen=True)
class WindowOp:
    """A conv or pooling op, in the terms of its module or functional form.

    Tuples hold one entry per spatial axis. ``unsupported`` is set when the op is recognised but
    cannot be replaced (the reason, as a sentence fragment).
    """

    kind: OpKind
    form: str  # "module" or "function"
    dims: int
    op_name: str  # e.g. "Conv2d" or "F.max_pool2d"
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    has_bias: bool = False
    output_size: tuple[int | None, ...] | None = None  # adaptive pools
    mean_dims: tuple[int, ...] = ()  # MEAN
    unsupported: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_strided(self) -> bool:
        return any(s > 1 for s in self.stride)

    @property
    def is_pool(self) -> bool:
        return self.kind in POOL_KINDS


# Module classes and their kind and number of spatial dims.
_MODULE_KINDS: dict[type[nn.Module], tuple[OpKind, int]] = {
    nn.Conv1d: (OpKind.CONV, 1),
    nn.Conv2d: (OpKind.CONV, 2),
    nn.Conv3d: (OpKind.CONV, 3),
    nn.MaxPool1d: (OpKind.MAX_POOL, 1),
    nn.MaxPool2d: (OpKind.MAX_POOL, 2),
    nn.MaxPool3d: (OpKind.MAX_POOL, 3),
    nn.AvgPool1d: (OpKind.AVG_POOL, 1),
    nn.AvgPool2d: (OpKind.AVG_POOL, 2),
    nn.AvgPool3d: (OpKind.AVG_POOL, 3),
    nn.AdaptiveAvgPool1d: (OpKind.ADAPTIVE_AVG_POOL, 1),
    nn.AdaptiveAvgPool2d: (OpKind.ADAPTIVE_AVG_POOL, 2),
    nn.AdaptiveAvgPool3d: (OpKind.ADAPTIVE_AVG_POOL, 3),
    nn.AdaptiveMaxPool1d: (OpKind.ADAPTIVE_MAX_POOL, 1),
    nn.AdaptiveMaxPool2d: (OpKind.ADAPTIVE_MAX_POOL, 2),
    nn.AdaptiveMaxPool3d: (OpKind.ADAPTIVE_MAX_POOL, 3),
    nn.LPPool1d: (OpKind.LP_POOL, 1),
    nn.LPPool2d: (OpKind.LP_POOL, 2),
}
if hasattr(nn, "LPPool3d"):
    _MODULE_KINDS[nn.LPPool3d] = (OpKind.LP_POOL, 3)
_MODULE_KINDS.update(
    {
        nn.ConvTranspose1d: (OpKind.RESIZE, 1),
        nn.ConvTranspose2d: (OpKind.RESIZE, 2),
        nn.ConvTranspose3d: (OpKind.RESIZE, 3),
        nn.Upsample: (OpKind.RESIZE, 0),
        nn.PixelShuffle: (OpKind.RESIZE, 2),
    }
)

# Positional parameter names of the functional forms, after the input.
_CONV_PARAMS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_POOL_PARAMS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_PARAMS = (
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
_ADAPTIVE_PARAMS = ("output_size", "return_indices")
_LP_POOL_PARAMS = ("norm_type", "kernel_size", "stride", "ceil_mode")


def _function_table() -> dict[Any, tuple[OpKind, int, str, tuple[str, ...]]]:
    table: dict[Any, tuple[OpKind, int, str, tuple[str, ...]]] = {}

    def add(functions: list[Any], kind: OpKind, dims: int, name: str, params: tuple[str, ...]):
        for function in functions:
            if function is not None:
                table[function] = (kind, dims, name, params)

    for dims in (1, 2, 3):
        add(
            [getattr(F, f"conv{dims}d"), getattr(torch, f"conv{dims}d", None)],
            OpKind.CONV,
            dims,
            f"F.conv{dims}d",
            _CONV_PARAMS,
        )
        add(
            [
                getattr(F, f"max_pool{dims}d"),
                getattr(F, f"max_pool{dims}d_with_indices"),
                getattr(F, f"_max_pool{dims}d", None),
                getattr(torch, f"max_pool{dims}d", None),
            ],
            OpKind.MAX_POOL,
            dims,
            f"F.max_pool{dims}d",
            _MAX_POOL_PARAMS,
        )
        add(
            [getattr(F, f"avg_pool{dims}d"), getattr(torch, f"avg_pool{dims}d", None)],
            OpKind.AVG_POOL,
            dims,
            f"F.avg_pool{dims}d",
            _AVG_POOL_PARAMS[:5] if dims == 1 else _AVG_POOL_PARAMS,
        )
        add(
            [
                getattr(F, f"adaptive_avg_pool{dims}d"),
                getattr(torch, f"adaptive_avg_pool{dims}d", None),
            ],
            OpKind.ADAPTIVE_AVG_POOL,
            dims,
            f"F.adaptive_avg_pool{dims}d",
            _ADAPTIVE_PARAMS[:1],
        )
        add(
            [
                getattr(F, f"adaptive_max_pool{dims}d"),
                getattr(F, f"adaptive_max_pool{dims}d_with_indices", None),
                getattr(torch, f"adaptive_max_pool{dims}d", None),
            ],
            OpKind.ADAPTIVE_MAX_POOL,
            dims,
            f"F.adaptive_max_pool{dims}d",
            _ADAPTIVE_PARAMS,
        )
        add(
            [getattr(F, f"lp_pool{dims}d", None)],
            OpKind.LP_POOL,
            dims,
            f"F.lp_pool{dims}d",
            _LP_POOL_PARAMS,
        )
    add([torch.mean], OpKind.MEAN, 0, "torch.mean", ("dim", "keepdim"))
    resize = [F.interpolate, F.pixel_shuffle, getattr(F, "upsample", None)]
    resize += [getattr(F, f"conv_transpose{dims}d") for dims in (1, 2, 3)]
    add(resize, OpKind.RESIZE, 0, "resize", ())
    return table


_FUNCTIONS = _function_table()


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and dims > 1:
            return tuple(int(value[0]) for _ in range(dims))
        return tuple(int(v) for v in value)
    return (int(value),) * dims


def _has_node(value: Any) -> bool:
    found = False

    def visit(arg: Any) -> Any:
        nonlocal found
        found = found or isinstance(arg, fx.Node)
        return arg

    fx.node.map_aggregate(value, visit)
    return found


def classify_module(module: nn.Module) -> WindowOp | None:
    """Describe ``module`` if it is a conv or pooling layer, else return ``None``."""
    entry = None
    for cls in type(module).__mro__:
        if cls in _MODULE_KINDS:
            entry = _MODULE_KINDS[cls]
            base = cls
            break
    if entry is None:
        return None
    kind, dims = entry
    name = type(module).__name__
    if kind is OpKind.RESIZE:
        return WindowOp(kind, "module", dims, name)
    unsupported = None
    # A subclass with its own forward computes something else than its base layer.
    if type(module).forward is not base.forward:
        unsupported = f"{name} overrides forward(), so a replacement would change what it computes"

    if kind is OpKind.CONV:
        conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
        if isinstance(conv.padding, str):
            padding_reason = f"string padding {conv.padding!r}"
            padding = (0,) * dims
        else:
            padding_reason = None
            padding = _tuple(conv.padding, dims)
        if unsupported is None and conv.padding_mode != "zeros":
            unsupported = f"padding_mode {conv.padding_mode!r} (only 'zeros' is supported)"
        if unsupported is None and padding_reason and any(s > 1 for s in _tuple(conv.stride, dims)):
            unsupported = padding_reason
        return WindowOp(
            kind=kind,
            form="module",
            dims=dims,
            op_name=name,
            kernel=_tuple(conv.kernel_size, dims),
            stride=_tuple(conv.stride, dims),
            padding=padding,
            dilation=_tuple(conv.dilation, dims),
            groups=conv.groups,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            has_bias=conv.bias is not None,
            unsupported=unsupported,
        )

    if kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL):
        output_size = module.output_size  # type: ignore[attr-defined]
        if not isinstance(output_size, (list, tuple)):
            output_size = (output_size,) * dims
        return WindowOp(kind, "module", dims, name, output_size=tuple(output_size))

    kernel = _tuple(module.kernel_size, dims)  # type: ignore[attr-defined]
    stride_value = module.stride or module.kernel_size  # type: ignore[attr-defined]
    fields: dict[str, Any] = dict(
        kernel=kernel,
        stride=_tuple(stride_value, dims),
        padding=_tuple(getattr(module, "padding", 0), dims),
        dilation=_tuple(getattr(module, "dilation", 1), dims),
        ceil_mode=bool(getattr(module, "ceil_mode", False)),
    )
    if kind is OpKind.AVG_POOL:
        fields["count_include_pad"] = bool(module.count_include_pad)  # type: ignore[attr-defined]
        fields["divisor_override"] = getattr(module, "divisor_override", None)
    if kind is OpKind.MAX_POOL and getattr(module, "return_indices", False) and unsupported is None:
        unsupported = "return_indices=True (the indices have no stride-free equivalent)"
    if kind is OpKind.LP_POOL and unsupported is None:
        unsupported = "LP pooling has no SPD replacement yet"
    return WindowOp(kind, "module", dims, name, unsupported=unsupported, **fields)


def _bind(params: tuple[str, ...], node: fx.Node) -> dict[str, Any]:
    bound = dict(zip(params, node.args[1:], strict=False))
    bound.update({k: v for k, v in node.kwargs.items() if k != "input"})
    return bound


def classify_node(node: fx.Node, gm: fx.GraphModule) -> WindowOp | None:
    """Describe the window op that ``node`` calls, or return ``None`` for any other node."""
    if node.op == "call_module":
        return classify_module(gm.get_submodule(str(node.target)))
    if node.op == "call_method" and node.target == "mean":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return _mean_op("Tensor.mean", dim)
    if node.op != "call_function":
        return None

    try:
        entry = _FUNCTIONS.get(node.target)
    except TypeError:  # unhashable target
        entry = None
    if entry is None:
        return None
    kind, dims, name, params = entry
    bound = _bind(params, node)

    if kind is OpKind.MEAN:
        return _mean_op(name, bound.get("dim"))
    if kind is OpKind.RESIZE:
        return WindowOp(kind, "function", dims, getattr(node.target, "__name__", name))
    if kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL):
        output_size = bound.get("output_size")
        if _has_node(output_size):
            return WindowOp(
                kind, "function", dims, name, unsupported="output size computed at run time"
            )
        if not isinstance(output_size, (list, tuple)):
            output_size = (output_size,) * dims
        return WindowOp(kind, "function", dims, name, output_size=tuple(output_size))

    if kind is OpKind.CONV:
        return _functional_conv(node, gm, dims, name, bound)
    return _functional_pool(kind, dims, name, bound)


def _mean_op(name: str, dim: Any) -> WindowOp:
    if dim is None or _has_node(dim):
        dims_tuple: tuple[int, ...] = ()
    elif isinstance(dim, (list, tuple)):
        dims_tuple = tuple(int(d) for d in dim)
    else:
        dims_tuple = (int(dim),)
    return WindowOp(OpKind.MEAN, "function", 0, name, mean_dims=dims_tuple)


def _functional_conv(
    node: fx.Node, gm: fx.GraphModule, dims: int, name: str, bound: dict[str, Any]
) -> WindowOp:
    weight, bias = bound.get("weight"), bound.get("bias")
    static = {k: bound.get(k) for k in ("stride", "padding", "dilation", "groups")}
    if _has_node(static):
        return WindowOp(
            OpKind.CONV,
            "function",
            dims,
            name,
            unsupported="stride, padding, dilation or groups computed at run time",
        )
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return WindowOp(
            OpKind.CONV, "function", dims, name, unsupported="its weight is computed at run time"
        )

    stride = _tuple(static["stride"] if static["stride"] is not None else 1, dims)
    groups = int(static["groups"] or 1)
    padding = static["padding"] if static["padding"] is not None else 0
    unsupported = None
    if isinstance(padding, str):
        if any(s > 1 for s in stride):
            unsupported = f"string padding {padding!r}"
        padding = 0
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        unsupported = unsupported or "its bias is computed at run time"

    weight_tensor = _fetch_attr(gm, str(weight.target))
    return WindowOp(
        kind=OpKind.CONV,
        form="function",
        dims=dims,
        op_name=name,
        kernel=tuple(int(k) for k in weight_tensor.shape[2:]),
        stride=stride,
        padding=_tuple(padding, dims),
        dilation=_tuple(static["dilation"] or 1, dims),
        groups=groups,
        in_channels=int(weight_tensor.shape[1]) * groups,
        out_channels=int(weight_tensor.shape[0]),
        has_bias=bias is not None,
        unsupported=unsupported,
        extra={"weight_node": weight, "bias_node": bias},
    )


def _fetch_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _functional_pool(kind: OpKind, dims: int, name: str, bound: dict[str, Any]) -> WindowOp:
    if _has_node({k: v for k, v in bound.items()}):
        return WindowOp(
            kind, "function", dims, name, unsupported="pooling arguments computed at run time"
        )
    kernel_value = bound.get("kernel_size")
    stride_value = bound.get("stride")
    if stride_value is None or stride_value == [] or stride_value == ():
        stride_value = kernel_value
    fields: dict[str, Any] = dict(
        kernel=_tuple(kernel_value, dims),
        stride=_tuple(stride_value, dims),
        padding=_tuple(bound.get("padding", 0) or 0, dims),
        dilation=_tuple(bound.get("dilation", 1) or 1, dims),
        ceil_mode=bool(bound.get("ceil_mode", False)),
    )
    unsupported = None
    if kind is OpKind.AVG_POOL:
        fields["count_include_pad"] = bool(bound.get("count_include_pad", True))
        fields["divisor_override"] = bound.get("divisor_override")
    if kind is OpKind.MAX_POOL and bound.get("return_indices"):
        unsupported = "return_indices=True (the indices have no stride-free equivalent)"
    if kind is OpKind.LP_POOL:
        fields.pop("dilation")
        fields.pop("padding")
        unsupported = "LP pooling has no SPD replacement yet"
    return WindowOp(kind, "function", dims, name, unsupported=unsupported, **fields)


def describe_op(op: WindowOp) -> str:
    """Return a short human-readable form, e.g. ``Conv2d(64->128, k3, s2, p1)``."""
    if op.kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL):
        return f"{op.op_name}({_compact(op.output_size or ())})"
    if op.kind is OpKind.MEAN:
        return f"{op.op_name}(dim={list(op.mean_dims)})"
    if op.kind is OpKind.RESIZE:
        return op.op_name
    parts = []
    if op.in_channels is not None and op.out_channels is not None:
        parts.append(f"{op.in_channels}->{op.out_channels}")
    parts.append(f"k{_compact(op.kernel)}" if op.kernel else "")
    parts.append(f"s{_compact(op.stride)}")
    if any(op.padding):
        parts.append(f"p{_compact(op.padding)}")
    if any(d > 1 for d in op.dilation):
        parts.append(f"d{_compact(op.dilation)}")
    if op.groups > 1:
        parts.append(f"g{op.groups}")
    if op.ceil_mode:
        parts.append("ceil")
    return f"{op.op_name}({', '.join(p for p in parts if p)})"


def _compact(values: tuple[Any, ...]) -> str:
    if values and all(v == values[0] for v in values):
        return str(values[0])
    return "x".join(str(v) for v in values)
