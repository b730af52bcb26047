"""The module tree of a saved folder: ``nn.Module`` objects to JSON-ready records and back.

A record stores what ``nn.Module.__init__`` cannot recreate: the class as an import path
(``module:QualName``), the plain attributes in ``__dict__``, ``training``, the children, and the
names of parameters, buffers and tensor attributes. The tensors themselves go to a separate mapping
of qualified names, which the saved folder writes as safetensors. A ``torch.fx.GraphModule`` also
stores its graph node by node, so loading rebuilds the same node names and code without running
any source code from the folder.

Loading imports the classes and functions that the record names. A folder from someone else can
therefore make ``forward`` call any function of an installed package; it cannot carry code itself.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from spd_rewrite.errors import OutputFolderError
from spd_rewrite.io.spec import USER_MODULE_PREFIX, import_source_file

__all__ = ["ModuleTreeEncoder", "build_module_tree", "first_line", "import_path"]

# Every key of ``__dict__`` that these constructors create is rebuilt on load, never stored.
_MODULE_INIT_KEYS = frozenset(nn.Module().__dict__)
_HOOK_KEYS = tuple(
    sorted(key for key in _MODULE_INIT_KEYS if "hook" in key and key != "_is_full_backward_hook")
)


def _graph_module_init_keys() -> frozenset[str]:
    empty = fx.GraphModule({}, fx.Graph())
    return frozenset(empty.__dict__)


_GRAPH_MODULE_INIT_KEYS = _graph_module_init_keys()
_GRAPH_MODULE_HOOK_KEYS = (
    "_create_node_hooks",
    "_erase_node_hooks",
    "_replace_hooks",
    "_deepcopy_hooks",
)

# Tags of values that JSON cannot hold directly. An encoded value is plain JSON, or a dict with one
# of these keys as its only key.
_TAGS = (
    "__tuple__", "__dict__", "__float__", "__dtype__", "__device__", "__size__", "__import__",
    "__node__", "__slice__", "__ellipsis__", "__memory_format__", "__layout__", "__set__",
    "__frozenset__",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Import paths


def import_path(obj: object) -> str | None:
    """Return ``"module:qualname"`` that imports back to ``obj`` itself, or None if none does.

    Tries ``__module__`` with ``__qualname__`` and with ``__name__``, then every split of the
    dotted name that ``torch.fx`` uses for the object (which covers ``torch.flatten`` and
    ``torch.ops`` overloads). Objects defined in ``__main__`` or inside a function get None,
    because a fresh process cannot import them.
    """
    candidates: list[str] = []
    module_name = getattr(obj, "__module__", None)
    if isinstance(module_name, str):
        for attribute in (getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)):
            if isinstance(attribute, str):
                candidates.append(f"{module_name}:{attribute}")
    try:
        dotted = fx.node._get_qualified_name(obj)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - any failure only means this candidate is unavailable
        dotted = ""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        candidates.append(".".join(parts[:split]) + ":" + ".".join(parts[split:]))

    for candidate in candidates:
        if candidate.startswith("__main__:") or "<" in candidate:
            continue
        try:
            found = resolve_import_path(candidate, {})
        except (ImportError, AttributeError, ValueError, TypeError):
            continue
        if found is obj:
            return candidate
    return None


def resolve_import_path(path: str, source_files: Mapping[str, str]) -> Any:
    """Import the object that ``"module:qualname"`` names.

    A module that ``load_model`` imported from a file by path is not on ``sys.path``, so
    ``source_files`` maps such module names to the files to import them from.
    """
    module_name, colon, qualname = path.partition(":")
    if not colon or not module_name or not qualname:
        raise ValueError(f"invalid import path {path!r}; expected 'module:qualname'")
    if module_name not in sys.modules and module_name in source_files:
        import_source_file(Path(source_files[module_name]), module_name)
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# Saving


@dataclass
class ModuleTreeEncoder:
    """Collects the JSON record and the tensors of one module tree.

    ``tensors`` maps qualified names to every parameter, buffer (persistent or not) and tensor
    attribute. A tensor object reached a second time, such as a tied weight, is stored once and
    recorded as ``same_as`` the first name.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source_files: dict[str, str] = field(default_factory=dict)
    graph_modules: dict[str, fx.GraphModule] = field(default_factory=dict)
    _first_names: dict[int, str] = field(default_factory=dict)

    def encode(self, root: nn.Module) -> dict[str, Any]:
        """Return the JSON-ready record of ``root`` and its descendants."""
        return {
            "root": self._encode_module(root, ""),
            "source_files": self.source_files,
        }

    def _encode_module(self, module: nn.Module, path: str) -> dict[str, Any]:
        where = f"module {path or '<root>'!r} ({type(module).__name__})"
        _check_savable(module, where)
        graph_module = module if isinstance(module, fx.GraphModule) else None
        record: dict[str, Any] = {
            "class": self._class_path(module, where),
            "training": module.training,
        }

        init_keys = _MODULE_INIT_KEYS if graph_module is None else _GRAPH_MODULE_INIT_KEYS
        attributes: dict[str, Any] = {}
        tensor_attributes: dict[str, Any] = {}
        for name, value in module.__dict__.items():
            if name in init_keys:
                continue
            if isinstance(value, torch.Tensor):
                tensor_attributes[name] = self._encode_tensor(value, _join(path, name), where)
            else:
                attributes[name] = self._encode_value(value, f"{where}, attribute {name!r}")
        if graph_module is not None and graph_module.meta:
            meta_where = f"{where}, attribute 'meta'"
            record["graph_module_meta"] = self._encode_value(dict(graph_module.meta), meta_where)
        record["attributes"] = attributes

        record["parameters"] = {
            name: None if value is None else self._encode_tensor(value, _join(path, name), where)
            for name, value in module._parameters.items()
        }
        buffers: dict[str, Any] = {}
        for name, value in module._buffers.items():
            if value is None:
                buffers[name] = None
                continue
            entry = self._encode_tensor(value, _join(path, name), where)
            entry["persistent"] = name not in module._non_persistent_buffers_set
            buffers[name] = entry
        record["buffers"] = buffers
        record["tensor_attributes"] = tensor_attributes

        record["children"] = {
            name: None if child is None else self._encode_module(child, _join(path, name))
            for name, child in module._modules.items()
        }
        if graph_module is not None:
            self.graph_modules[path] = graph_module
            record["graph"] = self._encode_graph(graph_module, where)
        return record

    def _class_path(self, module: nn.Module, where: str) -> str:
        cls: type = type(module)
        if isinstance(module, fx.GraphModule):
            # GraphModule.__new__ makes a private subclass per instance, so store the class it
            # derives from (GraphModule or a user subclass).
            cls = next(
                c
                for c in cls.__mro__
                if issubclass(c, fx.GraphModule) and "<" not in c.__qualname__
            )
        found = self._import_reference(cls)
        if found is None:
            raise OutputFolderError(
                f"cannot save {where}: its class {cls.__module__}.{cls.__qualname__} cannot be "
                "imported by name from a fresh process; define it at the top level of an "
                "importable module (not in __main__ or inside a function)"
            )
        return found

    def _import_reference(self, obj: object) -> str | None:
        found = import_path(obj)
        if found is not None:
            module_name = found.partition(":")[0]
            if module_name.startswith(USER_MODULE_PREFIX):
                self.source_files[module_name] = str(sys.modules[module_name].__file__)
        return found

    def _encode_tensor(self, tensor: torch.Tensor, name: str, where: str) -> dict[str, Any]:
        kind = type(tensor)
        if kind not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided:
            raise OutputFolderError(
                f"cannot save {where}: tensor {name!r} is a {kind.__name__} with layout "
                f"{tensor.layout}; only dense torch.Tensor and nn.Parameter values can be saved"
            )
        if tensor.is_meta:
            raise OutputFolderError(
                f"cannot save {where}: tensor {name!r} is on the meta device and has no data; "
                "materialize the model (for example with to_empty and an init) before saving"
            )
        entry: dict[str, Any] = {"requires_grad": tensor.requires_grad}
        first = self._first_names.get(id(tensor))
        if first is not None:
            entry["same_as"] = first
        else:
            self._first_names[id(tensor)] = name
            self.tensors[name] = tensor
        return entry

    def _encode_value(self, value: object, where: str) -> Any:
        return encode_value(value, where, self._import_reference)

    def _encode_graph(self, gm: fx.GraphModule, where: str) -> dict[str, Any]:
        codegen = type(getattr(gm.graph, "_codegen", fx.graph.CodeGen()))
        if codegen is not fx.graph.CodeGen:
            raise OutputFolderError(
                f"cannot save {where}: its graph uses {codegen.__name__}, which flattens "
                "pytree inputs or outputs; trace the model without concrete pytree arguments"
            )
        nodes = []
        for node in gm.graph.nodes:
            node_where = f"{where}, node {node.name!r} ({node.op})"
            target: Any = node.target
            if node.op == "call_function":
                target = self._import_reference(node.target)
                if target is None:
                    raise OutputFolderError(
                        f"cannot save {node_where}: it calls {node.target!r}, which cannot be "
                        "imported by name; call a function defined at the top level of an "
                        "importable module"
                    )
            # NOTE: a type annotation that is not an importable class, such as
            # typing.Optional[torch.Tensor], is dropped. This changes the annotation in the
            # generated code but not what the graph computes.
            annotation = self._import_reference(node.type) if isinstance(node.type, type) else None
            nodes.append(
                {
                    "name": node.name,
                    "op": node.op,
                    "target": target,
                    "args": [self._encode_graph_value(arg, node_where) for arg in node.args],
                    "kwargs": {
                        key: self._encode_graph_value(arg, f"{node_where}, argument {key!r}")
                        for key, arg in node.kwargs.items()
                    },
                    "type": annotation,
                }
            )
        return {"class_name": type(gm).__name__, "nodes": nodes}

    def _encode_graph_value(self, value: object, where: str) -> Any:
        return encode_value(value, where, self._import_reference, graph=True)


def encode_value(
    value: object,
    where: str,
    import_reference: Callable[[object], str | None],
    *,
    graph: bool = False,
) -> Any:
    """Encode a plain attribute value (or, with ``graph``, an fx node argument) as JSON data.

    Raises:
        OutputFolderError: the value has a type that the format cannot store; names ``where``.
    """

    def encode(item: object) -> Any:
        if item is None or isinstance(item, bool | int | str):
            return item
        if isinstance(item, float):
            return item if math.isfinite(item) else {"__float__": repr(item)}

        # fx stores list and dict arguments as immutable_list and immutable_dict subclasses.
        if isinstance(item, list):
            return [encode(x) for x in item]
        if isinstance(item, torch.Size):
            return {"__size__": list(item)}
        if isinstance(item, tuple) and type(item) is tuple:
            return {"__tuple__": [encode(x) for x in item]}
        if type(item) in (set, frozenset):
            # Sorted by encoded form, so that the same set always saves the same bytes.
            members = sorted((encode(x) for x in item), key=repr)  # type: ignore[union-attr]
            return {f"__{type(item).__name__}__": members}
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise OutputFolderError(
                        f"cannot save {where}: a dict has the non-str key {key!r}; the format "
                        "stores dicts with str keys only"
                    )
            encoded = {key: encode(x) for key, x in item.items()}
            if len(encoded) == 1 and next(iter(encoded)) in _TAGS:
                return {"__dict__": encoded}
            return encoded

        if isinstance(item, torch.dtype):
            return {"__dtype__": str(item).removeprefix("torch.")}
        if isinstance(item, torch.device):
            return {"__device__": str(item)}
        if graph and isinstance(item, fx.Node):
            return {"__node__": item.name}
        if graph and isinstance(item, slice):
            return {"__slice__": [encode(item.start), encode(item.stop), encode(item.step)]}
        if graph and item is Ellipsis:
            return {"__ellipsis__": None}
        if graph and isinstance(item, torch.memory_format):
            return {"__memory_format__": str(item).removeprefix("torch.")}
        if graph and isinstance(item, torch.layout):
            return {"__layout__": str(item).removeprefix("torch.")}

        if isinstance(item, type) or inspect.isroutine(item):
            reference = import_reference(item)
            if reference is not None:
                return {"__import__": reference}
            name = f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', '?')}"
            raise OutputFolderError(
                f"cannot save {where}: {name} cannot be imported by name from a fresh process; "
                "use a class or function defined at the top level of an importable module"
            )

        raise OutputFolderError(
            f"cannot save {where}: a value of type {type(item).__module__}."
            f"{type(item).__qualname__} is not plain data; store None, bool, int, float, str, "
            "list, tuple, set, str-keyed dict, torch.dtype, torch.device or torch.Size instead"
        )

    return encode(value)


def _check_savable(module: nn.Module, where: str) -> None:
    if isinstance(module, torch.jit.ScriptModule):
        raise OutputFolderError(
            f"cannot save {where}: TorchScript modules keep their state in C++; save the eager "
            "module instead, or use torch.jit.save"
        )
    hook_keys = list(_HOOK_KEYS)
    if isinstance(module, fx.GraphModule):
        hook_keys += _GRAPH_MODULE_HOOK_KEYS
    for key in hook_keys:
        if getattr(module, key, None):
            raise OutputFolderError(
                f"cannot save {where}: it has hooks registered ({key}), which the saved-folder "
                "format cannot store; remove them with handle.remove() before saving"
            )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def first_line(error: BaseException) -> str:
    """Return ``"ErrorType: first line of the message"``, to keep error messages on one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Loading


def build_module_tree(
    record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], folder: Path
) -> nn.Module:
    """Rebuild the module that ``ModuleTreeEncoder.encode`` recorded, with ``tensors`` as its data.

    Raises:
        OutputFolderError: a class or function cannot be imported, a tensor is missing, or the
            record is malformed.
    """
    builder = _TreeBuilder(tensors, record.get("source_files", {}), folder)
    return builder.build(record["root"], "")


@dataclass
class _TreeBuilder:
    tensors: Mapping[str, torch.Tensor]
    source_files: Mapping[str, str]
    folder: Path
    _built_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def build(self, record: Mapping[str, Any], path: str) -> nn.Module:
        where = f"module {path or '<root>'!r}"
        cls = self._import(record["class"], where)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: {where} names {record['class']!r}, which is "
                "not an nn.Module subclass; the folder is corrupt or was edited"
            )

        graph_record = record.get("graph")
        if (graph_record is not None) != issubclass(cls, fx.GraphModule):
            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: {where} has class {record['class']!r} but "
                f"{'a' if graph_record else 'no'} graph; the folder is corrupt or was edited"
            )
        module: nn.Module = cls.__new__(cls)
        if isinstance(module, fx.GraphModule):
            assert graph_record is not None  # checked against the class above
            # An empty graph and root: the children, tensors and real graph are set below.
            fx.GraphModule.__init__(module, {}, fx.Graph(), graph_record["class_name"])
            module.meta.update(self._decode(record.get("graph_module_meta", {}), f"{where}, meta"))
        else:
            nn.Module.__init__(module)
        module.training = record["training"]

        for name, value in record["attributes"].items():
            module.__dict__[name] = self._decode(value, f"{where}, attribute {name!r}")

        # Fill the registries directly, as the original module had them, so that no
        # __setattr__ or register_* check can reorder or reject an entry.
        for name, entry in record["parameters"].items():
            tensor = self._tensor(entry, _join(path, name))
            if tensor is not None and not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=entry["requires_grad"])
                self._built_tensors[_join(path, name)] = tensor
            module._parameters[name] = tensor
        for name, entry in record["buffers"].items():
            module._buffers[name] = self._tensor(entry, _join(path, name))
            if entry is not None and not entry["persistent"]:
                module._non_persistent_buffers_set.add(name)
        for name, entry in record["tensor_attributes"].items():
            module.__dict__[name] = self._tensor(entry, _join(path, name))

        for name, child in record["children"].items():
            module._modules[name] = None if child is None else self.build(child, _join(path, name))

        if isinstance(module, fx.GraphModule):
            assert graph_record is not None
            module.graph = self._build_graph(graph_record, where)
            try:
                module.graph.lint()
            except RuntimeError as error:
                raise OutputFolderError(
                    f"saved folder {str(self.folder)!r}: the graph of {where} is invalid "
                    f"({first_line(error)}); the folder is corrupt or was edited"
                ) from error
        return module

    def _tensor(self, entry: Mapping[str, Any] | None, name: str) -> torch.Tensor | None:
        if entry is None:
            return None
        if "same_as" in entry:
            return self._built_tensors[entry["same_as"]]
        if name not in self.tensors:
            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: model.safetensors is missing tensor {name!r}; "
                "the folder is incomplete or was edited, so save the model again"
            )
        tensor = self.tensors[name].requires_grad_(entry["requires_grad"])
        self._built_tensors[name] = tensor
        return tensor

    def _build_graph(self, record: Mapping[str, Any], where: str) -> fx.Graph:
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for entry in record["nodes"]:
            node_where = f"{where}, node {entry['name']!r}"
            target = entry["target"]
            if entry["op"] == "call_function":
                target = self._import(target, node_where)
            annotation = None if entry["type"] is None else self._import(entry["type"], node_where)
            args = tuple(self._decode(arg, node_where, nodes) for arg in entry["args"])
            kwargs = {
                key: self._decode(arg, node_where, nodes) for key, arg in entry["kwargs"].items()
            }
            node = graph.create_node(
                entry["op"], target, args, kwargs, name=entry["name"], type_expr=annotation
            )
            if node.name != entry["name"]:
                raise OutputFolderError(
                    f"saved folder {str(self.folder)!r}: {node_where} came back as {node.name!r}; "
                    "the graph record is corrupt, so save the model again"
                )
            nodes[node.name] = node
        return graph

    def _import(self, path: str, where: str) -> Any:
        try:
            return resolve_import_path(path, self.source_files)
        except FileNotFoundError as error:
            module_name = path.partition(":")[0]
            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: {where} needs {path!r} from file "
                f"{self.source_files.get(module_name)!r}, which no longer exists; restore that file"
            ) from error
        except (ImportError, AttributeError, ValueError) as error:
            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: {where} needs {path!r}, which cannot be "
                f"imported ({first_line(error)}); install the package that defines it"
            ) from error
        except Exception as error:
            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: {where} needs {path!r}, and importing it "
                f"failed with {first_line(error)}; fix the module that defines it"
            ) from error

    def _decode(self, value: Any, where: str, nodes: Mapping[str, fx.Node] | None = None) -> Any:
        def decode(item: Any) -> Any:
            if isinstance(item, list):
                return [decode(x) for x in item]
            if not isinstance(item, dict):
                return item
            if len(item) != 1 or next(iter(item)) not in _TAGS:
                return {key: decode(x) for key, x in item.items()}

            tag, payload = next(iter(item.items()))
            if tag == "__dict__":
                return {key: decode(x) for key, x in payload.items()}
            if tag == "__tuple__":
                return tuple(decode(x) for x in payload)
            if tag == "__set__":
                return {decode(x) for x in payload}
            if tag == "__frozenset__":
                return frozenset(decode(x) for x in payload)
            if tag == "__float__":
                return float(payload)
            if tag == "__size__":
                return torch.Size(payload)
            constant_kinds = {
                "__dtype__": torch.dtype,
                "__memory_format__": torch.memory_format,
                "__layout__": torch.layout,
            }
            constant = getattr(torch, payload, None) if tag in constant_kinds else None
            if constant is not None and isinstance(constant, constant_kinds[tag]):
                return constant
            if tag == "__device__":
                return torch.device(payload)
            if tag == "__import__":
                return self._import(payload, where)
            if tag == "__slice__":
                return slice(*(decode(x) for x in payload))
            if tag == "__ellipsis__":
                return Ellipsis

            if tag == "__node__" and nodes is not None and payload in nodes:
                return nodes[payload]

            raise OutputFolderError(
                f"saved folder {str(self.folder)!r}: {where} contains the invalid value {item!r}; "
                "the folder is corrupt or was edited, so save the model again"
            )

        return decode(value)
