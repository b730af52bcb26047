"""Declarative rewrite rules: records, the TOML loader, and the built-in rule sets."""

from spd_rewrite.rules.loader import (
    builtin_rule_sets,
    builtin_source,
    load_rule_set,
    parse_rule_set,
)
from spd_rewrite.rules.model import (
    Action,
    Fallback,
    GroupsFilter,
    KernelChoice,
    Order,
    Rule,
    RuleSet,
)

__all__ = [
    "Action",
    "Fallback",
    "GroupsFilter",
    "KernelChoice",
    "Order",
    "Rule",
    "RuleSet",
    "builtin_rule_sets",
    "builtin_source",
    "load_rule_set",
    "parse_rule_set",
]
