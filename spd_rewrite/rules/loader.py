"""Load and validate rule sets from TOML.

A rule file looks like this (every key but ``name`` is optional)::

    name = "my-rules"
    description = "What the set is for."
    channel_order = "unshuffle"          # or "reference"

    [[rule]]
    name = "stem"
    op = ["conv"]                        # conv, max_pool, avg_pool
    include = ["conv1", "features.0*"]   # module-name globs; also `exclude`
    action = "spd-conv"                  # spd-conv, spd-max, remove, keep
    kernel = "same"                      # same, compact, or a size such as 3

Errors name the file, the line and the key.
"""

from __future__ import annotations

import logging
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from spd_rewrite.errors import RuleDefinitionError
from spd_rewrite.graph.fx_ops import OpKind
from spd_rewrite.rules.model import (
    MATCHABLE_KINDS,
    Action,
    Fallback,
    GroupsFilter,
    KernelChoice,
    Order,
    Rule,
    RuleSet,
)

__all__ = ["builtin_rule_sets", "builtin_source", "load_rule_set", "parse_rule_set"]

logger = logging.getLogger(__name__)

_TOP_KEYS = {"name", "description", "channel_order", "rule"}
_MATCH_KEYS = {
    "op",
    "dims",
    "form",
    "stride",
    "min_stride",
    "kernel_size",
    "padding",
    "dilation",
    "groups",
    "patchify",
    "include",
    "exclude",
    "first",
}
_ACTION_KEYS = {"action", "kernel", "order", "fallback"}
_RULE_KEYS = {"name", "description"} | _MATCH_KEYS | _ACTION_KEYS
_CHANNEL_ORDERS = ("unshuffle", "reference")
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")
# tomllib's position for an error it finds only at the end, such as an unclosed array.
_TOML_END = "(at end of document)"


def builtin_rule_sets() -> dict[str, str]:
    """Return the built-in rule sets as ``{name: description}``."""
    found = {}
    for entry in sorted(resources.files("spd_rewrite.rules.builtin").iterdir(), key=str):
        if entry.name.endswith(".toml"):
            name = entry.name.removesuffix(".toml")
            found[name] = load_rule_set(name).description
    return found


def builtin_source(name: str) -> str:
    """Return the TOML text of the built-in rule set ``name``."""
    entry = resources.files("spd_rewrite.rules.builtin").joinpath(f"{name}.toml")
    if not entry.is_file():
        known = ", ".join(sorted(_builtin_names()))
        raise RuleDefinitionError(
            f"no built-in rule set named {name!r}; built-in sets: {known} "
            "(or pass the path of a .toml file)"
        )
    return entry.read_text(encoding="utf-8")


def _builtin_names() -> list[str]:
    return [
        entry.name.removesuffix(".toml")
        for entry in resources.files("spd_rewrite.rules.builtin").iterdir()
        if entry.name.endswith(".toml")
    ]


def load_rule_set(spec: str | Path | RuleSet) -> RuleSet:
    """Load a rule set from a built-in name, a ``.toml`` path, or return a ``RuleSet`` as is."""
    if isinstance(spec, RuleSet):
        return spec
    path = Path(spec)
    if isinstance(spec, Path) or path.suffix == ".toml" or "/" in str(spec):
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not found"
            raise RuleDefinitionError(
                f"rule file {str(path)!r} is {what}; pass a .toml rule file or a built-in name "
                "(spd-rewrite rules lists them)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RuleDefinitionError(f"cannot read rule file {str(path)!r}: {error}") from error
        return parse_rule_set(text, source=str(path))
    return parse_rule_set(builtin_source(str(spec)), source=f"builtin:{spec}")


def parse_rule_set(text: str, source: str = "<string>") -> RuleSet:
    """Parse and validate the TOML ``text`` of a rule set; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        position = _TOML_POSITION.search(message)
        where = f"{source}:{position.group(1)}" if position else source
        if _TOML_END in message:
            where = f"{source}:{max(len(text.splitlines()), 1)} (end of file)"
        detail = _TOML_POSITION.sub("", message).replace(_TOML_END, "").strip()
        raise RuleDefinitionError(f"malformed TOML in {where}: {detail}") from None

    locator = _Locator(text, source)
    for key in data:
        if key not in _TOP_KEYS:
            raise RuleDefinitionError(
                f"unknown key {key!r} at {locator.top(key)}; known top-level keys: "
                f"{', '.join(sorted(_TOP_KEYS))}"
            )
    name = _string(data, "name", locator.top("name"), default=Path(source).stem)
    channel_order = _string(
        data, "channel_order", locator.top("channel_order"), default="unshuffle"
    )
    if channel_order not in _CHANNEL_ORDERS:
        raise RuleDefinitionError(
            f"invalid channel_order {channel_order!r} at {locator.top('channel_order')}; "
            f"use one of {', '.join(_CHANNEL_ORDERS)}"
        )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise RuleDefinitionError(
            f"'rule' at {locator.top('rule')} must be an array of tables, written [[rule]]"
        )
    if not raw_rules:
        raise RuleDefinitionError(f"rule set {source} has no [[rule]] tables; add at least one")

    rules = tuple(_parse_rule(raw, index, locator) for index, raw in enumerate(raw_rules))
    return RuleSet(
        name=name,
        rules=rules,
        description=_string(data, "description", locator.top("description"), default=""),
        channel_order=channel_order,
        source=source,
    )


class _Locator:
    """Find the line of a key in the raw text, for error messages (tomllib keeps no positions)."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.rule_starts = [
            number
            for number, line in enumerate(self.lines, start=1)
            if re.match(r"\s*\[\[\s*rule\s*\]\]", line)
        ]

    def top(self, key: str) -> str:
        end = self.rule_starts[0] if self.rule_starts else len(self.lines) + 1
        return self._find(key, 1, end)

    def rule(self, index: int, key: str | None = None) -> str:
        if index >= len(self.rule_starts):
            return self.source
        start = self.rule_starts[index]
        if key is None:
            return f"{self.source}:{start}"
        end = self.rule_starts[index + 1] if index + 1 < len(self.rule_starts) else None
        return self._find(key, start, end or len(self.lines) + 1)

    def _find(self, key: str, start: int, end: int) -> str:
        pattern = re.compile(rf"\s*(\"{re.escape(key)}\"|{re.escape(key)})\s*=")
        for number in range(start, end):
            if pattern.match(self.lines[number - 1]):
                return f"{self.source}:{number} (key {key!r})"
        return f"{self.source}:{start} (key {key!r})" if start > 1 else self.source


def _parse_rule(raw: dict[str, Any], index: int, locator: _Locator) -> Rule:
    label = f"rule {index + 1}"
    for key in raw:
        if key not in _RULE_KEYS:
            raise RuleDefinitionError(
                f"unknown key {key!r} in {label} at {locator.rule(index, key)}; known rule keys: "
                f"{', '.join(sorted(_RULE_KEYS))}"
            )

    def where(key: str) -> str:
        return locator.rule(index, key)

    name = _string(raw, "name", where("name"), default=f"rule-{index + 1}")
    label = f"rule {index + 1} ({name!r})"
    ops = _enum_list(raw, "op", OpKind, where("op"), default=MATCHABLE_KINDS)
    for op in ops:
        if op not in MATCHABLE_KINDS:
            raise RuleDefinitionError(
                f"op {op.value!r} in {label} at {where('op')} cannot be matched; use "
                f"{', '.join(k.value for k in MATCHABLE_KINDS)}"
            )
    action = _enum(raw, "action", Action, where("action"), default=Action.SPD_CONV)
    order = _enum(raw, "order", Order, where("order"), default=Order.SPD_FIRST)
    pools_only = all(op in (OpKind.MAX_POOL, OpKind.AVG_POOL) for op in ops)
    if action is Action.REMOVE and not pools_only:
        raise RuleDefinitionError(
            f"action 'remove' in {label} at {where('action')} applies to pooling only; "
            'set op = ["max_pool", "avg_pool"]'
        )
    if action is Action.SPD_MAX and ops != (OpKind.MAX_POOL,):
        raise RuleDefinitionError(
            f"action 'spd-max' in {label} at {where('action')} applies to max pooling only; "
            'set op = ["max_pool"]'
        )
    if order is Order.CONV_FIRST and ops != (OpKind.CONV,):
        raise RuleDefinitionError(
            f"order 'conv-first' in {label} at {where('order')} applies to convs only; "
            'set op = ["conv"]'
        )

    return Rule(
        name=name,
        ops=ops,
        dims=_int_list(raw, "dims", where("dims"), default=(1, 2, 3), allowed=(1, 2, 3)),
        form=_choice(raw, "form", ("any", "module", "function"), where("form"), "any"),
        stride=_int_list(raw, "stride", where("stride"), default=None),
        min_stride=_int(raw, "min_stride", where("min_stride"), default=2, minimum=1),
        kernel_size=_int_list(raw, "kernel_size", where("kernel_size"), default=None),
        padding=_int_list(raw, "padding", where("padding"), default=None, minimum=0),
        dilation=_int_list(raw, "dilation", where("dilation"), default=None),
        groups=_groups(raw, where("groups")),
        patchify=_bool(raw, "patchify", where("patchify")),
        include=_string_list(raw, "include", where("include")),
        exclude=_string_list(raw, "exclude", where("exclude")),
        first=_int(raw, "first", where("first"), default=None, minimum=1),
        action=action,
        kernel=_kernel(raw, where("kernel")),
        order=order,
        fallback=_enum(raw, "fallback", Fallback, where("fallback"), default=Fallback.REFUSE),
        description=_string(raw, "description", where("description"), default=""),
        source=locator.rule(index),
    )


def _string(raw: dict[str, Any], key: str, where: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise RuleDefinitionError(f"{key!r} at {where} must be a string, got {value!r}")
    return value


def _bool(raw: dict[str, Any], key: str, where: str) -> bool | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise RuleDefinitionError(f"{key!r} at {where} must be true or false, got {value!r}")
    return value


def _int(raw: dict[str, Any], key: str, where: str, default: int | None, minimum: int = 1) -> Any:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RuleDefinitionError(
            f"{key!r} at {where} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def _int_list(
    raw: dict[str, Any],
    key: str,
    where: str,
    default: tuple[int, ...] | None,
    minimum: int = 1,
    allowed: tuple[int, ...] | None = None,
) -> tuple[int, ...] | None:
    if key not in raw:
        return default
    value = raw[key]
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise RuleDefinitionError(
                f"{key!r} at {where} must be an integer >= {minimum} or a list of them, "
                f"got {value!r}"
            )
        if allowed is not None and item not in allowed:
            raise RuleDefinitionError(
                f"{key!r} at {where} allows {', '.join(map(str, allowed))}, got {item!r}"
            )
    if not values:
        raise RuleDefinitionError(f"{key!r} at {where} is an empty list; remove it to match any")
    return tuple(values)


def _string_list(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in values):
        raise RuleDefinitionError(
            f"{key!r} at {where} must be a string or a list of strings, got {value!r}"
        )
    return tuple(values)


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], where: str, default: str):
    value = raw.get(key, default)
    if value not in choices:
        raise RuleDefinitionError(
            f"invalid {key} {value!r} at {where}; use one of {', '.join(choices)}"
        )
    return value


def _enum(raw: dict[str, Any], key: str, enum: Any, where: str, default: Any) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise RuleDefinitionError(
            f"invalid {key} {value!r} at {where}; use one of {choices}"
        ) from None


def _enum_list(
    raw: dict[str, Any], key: str, enum: Any, where: str, default: tuple[Any, ...]
) -> tuple[Any, ...]:
    if key not in raw:
        return default
    value = raw[key]
    values = value if isinstance(value, list) else [value]
    if not values:
        raise RuleDefinitionError(f"{key!r} at {where} is an empty list; remove it to match any")
    return tuple(_enum({key: item}, key, enum, where, default=None) for item in values)


def _groups(raw: dict[str, Any], where: str) -> GroupsFilter | int:
    value = raw.get("groups", GroupsFilter.ANY.value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return _enum({"groups": value}, "groups", GroupsFilter, where, default=GroupsFilter.ANY)


def _kernel(raw: dict[str, Any], where: str) -> KernelChoice:
    value = raw.get("kernel", "same")
    if value in ("same", "compact"):
        return KernelChoice(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return KernelChoice("size", value)
    raise RuleDefinitionError(
        f'invalid kernel {value!r} at {where}; use "same", "compact" or a size such as 3'
    )
