"""Put replacement blocks into a graph module.

A matched ``call_module`` node keeps its node and target: the block takes the place of the
submodule, so ``layer2.0.conv1`` becomes an ``SPDConv`` with children ``spd`` and ``conv``. A
matched function call gets a new submodule ``<module path>.spd_<node name>`` and a ``call_module``
node in its place; its weight and bias parameters go when nothing else reads them. A removed op's
node is bypassed. ``graph.lint()`` runs after the edits; the caller recompiles once.
"""

from __future__ import annotations

import logging

from torch import fx, nn

from spd_rewrite.graph.build import OriginalWeights
from spd_rewrite.graph.fx_ops import WindowOp
from spd_rewrite.graph.trace import MODULE_PATH_KEY

__all__ = ["install_block", "original_weights"]

logger = logging.getLogger(__name__)


def original_weights(gm: fx.GraphModule, node: fx.Node, op: WindowOp) -> OriginalWeights:
    """Return the weight and bias tensors of a matched conv node (``None`` for pools)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return OriginalWeights(getattr(module, "weight", None), getattr(module, "bias", None))
    weight_node = op.extra.get("weight_node")
    bias_node = op.extra.get("bias_node")
    weight = _fetch(gm, weight_node) if isinstance(weight_node, fx.Node) else None
    bias = _fetch(gm, bias_node) if isinstance(bias_node, fx.Node) else None
    return OriginalWeights(weight, bias)


def install_block(gm: fx.GraphModule, node: fx.Node, block: nn.Module | None) -> str:
    """Replace ``node``'s op by ``block`` (or bypass the node when ``block`` is None).

    Returns:
        The qualified name of the block's submodule (empty for a removed op).
    """
    graph = gm.graph
    source = node.args[0]

    if block is None:
        assert isinstance(source, fx.Node)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        if node.op == "call_module" and not _still_called(graph, str(node.target)):
            gm.delete_submodule(str(node.target))
        return ""

    if node.op == "call_module":
        target = str(node.target)
        if not isinstance(gm.get_submodule(target), type(block)):
            _set_submodule(gm, target, block)
        if len(node.args) > 1 or node.kwargs:
            node.args, node.kwargs = (source,), {}
        return target

    path = node.meta.get(MODULE_PATH_KEY, "")
    target = f"{path}.spd_{node.name}" if path else f"spd_{node.name}"
    gm.add_submodule(target, block)
    with graph.inserting_before(node):
        new_node = graph.call_module(target, (source,))
    new_node.meta.update(node.meta)
    node.replace_all_uses_with(new_node)
    inputs = [arg for arg in node.all_input_nodes if arg is not source]
    graph.erase_node(node)
    for arg in inputs:
        if arg.op == "get_attr" and not arg.users:
            _drop_attribute(gm, str(arg.target))
            graph.erase_node(arg)
    return target


def _fetch(gm: fx.GraphModule, node: fx.Node):
    value = gm
    for atom in str(node.target).split("."):
        value = getattr(value, atom)
    return value


def _still_called(graph: fx.Graph, target: str) -> bool:
    return any(n.op == "call_module" and n.target == target for n in graph.nodes)


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, module)


def _drop_attribute(gm: fx.GraphModule, target: str) -> None:
    """Delete a parameter or buffer that no node reads any more."""
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if hasattr(parent, name):
        delattr(parent, name)
        logger.debug("dropped unused attribute %s", target)
