"""Rule files: the built-in sets, parsing, and errors that name file, line and key."""

from __future__ import annotations

import pytest

from spd_rewrite.errors import RuleDefinitionError
from spd_rewrite.graph.fx_ops import OpKind, WindowOp
from spd_rewrite.rules import Action, builtin_rule_sets, load_rule_set, parse_rule_set


def _conv(kernel=3, stride=2, padding=1, groups=1, channels=8) -> WindowOp:
    return WindowOp(
        OpKind.CONV,
        "module",
        2,
        "Conv2d",
        kernel=(kernel, kernel),
        stride=(stride, stride),
        padding=(padding, padding),
        dilation=(1, 1),
        groups=groups,
        in_channels=channels,
        out_channels=channels,
    )


def test_builtin_sets_listed():
    sets = builtin_rule_sets()
    assert "paper" in sets
    assert "paper" in sets["paper"].lower() or "sunkara" in sets["paper"].lower()


def test_paper_patchify_gets_compact_kernel():
    paper = load_rule_set("paper")
    patch = paper.first_match(_conv(kernel=4, stride=4, padding=0), "stem", 0)
    strided = paper.first_match(_conv(), "layer", 1)

    assert patch is not None and patch.kernel.mode == "compact"
    assert strided is not None and strided.kernel.mode == "same"
    assert paper.first_match(_conv(stride=1), "x", None) is None


def test_groups_filter_matches_depthwise_only():
    rules = parse_rule_set("[[rule]]\nname='dw'\ngroups='depthwise'\n")
    assert rules.first_match(_conv(groups=8), "a", 0) is not None
    assert rules.first_match(_conv(groups=2), "a", 0) is None
    assert rules.first_match(_conv(groups=1), "a", 0) is None


def test_exclude_glob_wins():
    rules = parse_rule_set("[[rule]]\nname='r'\ninclude=['layer*']\nexclude=['layer4*']\n")
    assert rules.first_match(_conv(), "layer2.0.conv1", 0) is not None
    assert rules.first_match(_conv(), "layer4.0.conv1", 0) is None
    assert rules.first_match(_conv(), "conv1", 0) is None


def test_malformed_toml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n\n[[rule]]\nname = \n')
    with pytest.raises(RuleDefinitionError, match=r"malformed TOML in .*bad\.toml:4"):
        load_rule_set(path)


def test_unknown_key_names_line_and_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('name = "x"\n[[rule]]\nname = "a"\nstrides = 2\n')
    with pytest.raises(RuleDefinitionError, match=r"unknown key 'strides' .*typo\.toml:4"):
        load_rule_set(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("action = 'explode'", r"invalid action 'explode' .*:3.*spd-conv"),
        ("op = ['conv']\naction = 'remove'", r"'remove' .* pooling only"),
        ("op = ['avg_pool']\naction = 'spd-max'", r"'spd-max' .* max pooling only"),
        ("kernel = 'huge'", r"invalid kernel 'huge'"),
        ("stride = 0", r"'stride' .* integer >= 1"),
        ("op = ['adaptive_avg_pool']", r"cannot be matched"),
        ("first = -1", r"'first' .* integer >= 1"),
    ],
)
def test_invalid_values_rejected(body, message):
    with pytest.raises(RuleDefinitionError, match=message):
        parse_rule_set(f"[[rule]]\nname = 'r'\n{body}\n", source="rules.toml")


def test_no_rules_rejected():
    with pytest.raises(RuleDefinitionError, match=r"has no \[\[rule\]\] tables"):
        parse_rule_set('name = "empty"\n', source="empty.toml")


def test_unknown_builtin_lists_known_sets():
    with pytest.raises(RuleDefinitionError, match=r"no built-in rule set named 'papr'.*paper"):
        load_rule_set("papr")


def test_missing_rule_file():
    with pytest.raises(RuleDefinitionError, match=r"rule file 'nope/rules\.toml' is not found"):
        load_rule_set("nope/rules.toml")


def test_actions_parse():
    rules = parse_rule_set("[[rule]]\nname='k'\naction='keep'\n")
    assert rules.rules[0].action is Action.KEEP
