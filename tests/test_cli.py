"""Tests of the spd-rewrite command line as a user runs it, on models and files made in tmp_path.

Most cases run the typer app in-process; the main ResNet-50 scenario, loading its output in a fresh
interpreter and ``python -m spd_rewrite --help`` run as real subprocesses.
"""

from __future__ import annotations

import json
import tomllib

import pytest
import safetensors.torch
import torch
import torchvision

import spd_rewrite

# The eight downsampling steps of torchvision's ResNet-50 that the built-in 'paper' rule set
# replaces: the stem conv, the stem max pool, and in stages 2-4 the stride-2 3x3 conv and the
# stride-2 1x1 shortcut conv.
RESNET50_REPLACED = [
    "conv1",
    "maxpool",
    "layer2.0.conv2",
    "layer2.0.downsample.0",
    "layer3.0.conv2",
    "layer3.0.downsample.0",
    "layer4.0.conv2",
    "layer4.0.downsample.0",
]
LAYER_KEYS = {"name", "op", "action", "in_shape", "out_shape", "params_before", "params_after"}
TOTALS_KEYS = {
    "params_before",
    "params_after",
    "flops_before",
    "flops_after",
    "downsampling_left",
    "replaced",
    "leaves",
}
SMALL_NET_REPLACED = ["stem", "pool", "block.conv", "block.shortcut"]
SMALL_SHAPE = "1,3,32,32"


@pytest.fixture(scope="module")
def resnet50_run(tmp_path_factory, cli_process):
    """Run the README's ResNet-50 command once, in a subprocess, for the tests that read it."""
    folder = tmp_path_factory.mktemp("resnet50") / "resnet50-spd"
    report = folder / "report.json"
    completed = cli_process(
        "rewrite",
        "torchvision.models:resnet50",
        "--input-shape",
        "1,3,224,224",
        "--out",
        folder,
        "--report",
        report,
    )
    return completed, folder, report


def test_resnet50_rewrite_exits_zero(resnet50_run):
    completed, folder, report = resnet50_run

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "replaced 8, downsampling left 0" in completed.stdout
    assert f"report written to {report}" in completed.stdout
    assert f"model saved to {folder}" in completed.stdout
    assert (folder / "manifest.json").is_file()
    assert (folder / "model.safetensors").is_file()


def test_resnet50_report_layers(resnet50_run):
    completed, _, report = resnet50_run
    assert completed.returncode == 0, completed.stderr

    data = json.loads(report.read_text())
    layers = data["layers"]

    assert [layer["name"] for layer in layers] == RESNET50_REPLACED
    assert "avgpool" not in {layer["name"] for layer in layers}
    for layer in layers:
        assert LAYER_KEYS <= set(layer), layer["name"]
        assert layer["action"] == "spd-conv", layer["name"]
        assert layer["params_after"] > layer["params_before"], layer["name"]
    by_name = {layer["name"]: layer for layer in layers}
    assert by_name["conv1"]["op"].startswith("Conv2d(3->64, k7, s2")
    assert by_name["conv1"]["in_shape"] == [1, 3, 224, 224]
    assert by_name["conv1"]["out_shape"] == [1, 64, 112, 112]
    assert by_name["maxpool"]["op"].startswith("MaxPool2d")
    assert by_name["layer4.0.downsample.0"]["out_shape"] == [1, 2048, 7, 7]


def test_resnet50_report_totals(resnet50_run):
    completed, _, report = resnet50_run
    assert completed.returncode == 0, completed.stderr

    totals = json.loads(report.read_text())["totals"]

    assert TOTALS_KEYS <= set(totals)
    assert totals["downsampling_left"] == 0
    assert totals["replaced"] == 8
    assert totals["leaves"] == 0
    assert totals["params_before"] == 25_557_032  # torchvision's ResNet-50
    assert totals["params_after"] > totals["params_before"]
    assert totals["flops_after"] > totals["flops_before"] > 0


def test_resnet50_folder_loads_in_fresh_process(resnet50_run, python_process):
    completed, folder, _ = resnet50_run
    assert completed.returncode == 0, completed.stderr
    script = (
        "import sys, torch, spd_rewrite\n"
        "model = spd_rewrite.load(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    print(tuple(model(torch.randn(1, 3, 224, 224)).shape))\n"
    )

    loaded = python_process("-c", script, folder)

    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "(1, 1000)"


def test_module_help_runs(cli_process):
    completed = cli_process("--help")

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    for command in ("rewrite", "plan", "rules", "targets"):
        assert command in completed.stdout


def test_plan_prints_rewrite_table_without_files(cli, nets_file, tmp_path):
    spec = f"{nets_file}:small_net"
    folder = tmp_path / "out"

    planned = cli("plan", spec, "--input-shape", SMALL_SHAPE)
    rewritten = cli("rewrite", spec, "--input-shape", SMALL_SHAPE, "--out", folder)

    assert planned.exit_code == 0, planned.stderr
    assert planned.stderr == ""
    assert rewritten.exit_code == 0, rewritten.stderr
    assert rewritten.stdout == planned.stdout + f"model saved to {folder}\n"
    for name in SMALL_NET_REPLACED:
        assert name in planned.stdout
    assert "model saved" not in planned.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nets.py", "out"]


def test_plan_has_no_out_option(cli, nets_file, tmp_path):
    result = cli("plan", f"{nets_file}:small_net", "--out", tmp_path / "out")

    assert result.exit_code == 2
    assert "--out" in result.stderr
    assert not (tmp_path / "out").exists()


def test_report_markdown(cli, nets_file, tmp_path):
    report = tmp_path / "report.md"

    result = cli("plan", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE, "--report", report)

    assert result.exit_code == 0, result.stderr
    assert f"report written to {report}" in result.stdout
    text = report.read_text()
    assert text.startswith(f"# SPD rewrite of {nets_file}:small_net\n")
    assert "## Replaced layers" in text
    for name in SMALL_NET_REPLACED:
        assert f"| `{name}` |" in text
    assert "replaced: 4, downsampling left: 0" in text


def test_report_json_of_file_spec(cli, nets_file, tmp_path):
    report = tmp_path / "report.json"

    result = cli("plan", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE, "--report", report)

    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["model"] == f"{nets_file}:small_net"
    assert [layer["name"] for layer in data["layers"]] == SMALL_NET_REPLACED
    assert data["totals"]["downsampling_left"] == 0
    assert "avgpool" not in {layer["name"] for layer in data["layers"]}


def test_saved_folder_of_file_spec_runs(cli, nets_file, tmp_path):
    folder = tmp_path / "out"

    result = cli("rewrite", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE, "--out", folder)

    assert result.exit_code == 0, result.stderr
    model = spd_rewrite.load(folder).eval()
    assert tuple(model(torch.randn(2, 3, 32, 32)).shape) == (2, 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metadata"]["input_shape"] == [1, 3, 32, 32]
    assert json.loads((folder / "report.json").read_text())["totals"]["replaced"] == 4


def test_explain_lists_nodes_left_alone(cli, nets_file):
    result = cli("plan", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE, "--explain")

    assert result.exit_code == 0, result.stderr
    assert "left alone mix Conv2d(8->8, k3, s1, p1): stride 1" in result.stdout
    assert "left alone avgpool AdaptiveAvgPool2d(1)" in result.stdout


def test_leaf_option_keeps_submodule_whole(cli, nets_file, tmp_path):
    report = tmp_path / "report.json"

    result = cli(
        "plan",
        f"{nets_file}:small_net",
        "--input-shape",
        SMALL_SHAPE,
        "--leaf",
        "block",
        "--report",
        report,
    )

    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert [leaf["name"] for leaf in data["leaves"]] == ["block"]
    assert data["totals"]["leaves"] == 1
    # Inside the leaf, the convs are still rewritten at module level.
    assert [layer["name"] for layer in data["layers"]] == SMALL_NET_REPLACED
    assert data["totals"]["downsampling_left"] == 0


def test_verbose_logs_summary_to_stderr(cli, nets_file):
    result = cli("-v", "plan", f"{nets_file}:conv_only", "--input-shape", SMALL_SHAPE)

    assert result.exit_code == 0, result.stderr
    assert "rewrote" in result.stderr
    assert "1 replaced" in result.stderr
    assert "rewrote" not in result.stdout


def test_rules_lists_paper(cli):
    result = cli("rules")

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "paper" in result.stdout
    assert "Built-in rule sets" in result.stdout


def test_rules_paper_prints_toml(cli):
    result = cli("rules", "paper")

    assert result.exit_code == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["name"] == "paper"
    assert len(data["rule"]) >= 1
    assert spd_rewrite.load_rule_set("paper").name == "paper"


def test_rules_unknown_name(cli):
    result = cli("rules", "papper")

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "'papper'" in result.stderr
    assert "paper" in result.stderr.replace("'papper'", "")


def test_targets_lists_bundled_models(cli):
    result = cli("targets")

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    names = {line.split("│")[1].strip() for line in result.stdout.splitlines() if "│" in line}
    assert "resnet18" in names
    assert "yolov5n" in names


def test_transfer_exact_keeps_function(cli, nets_file, tmp_path):
    report = tmp_path / "report.json"

    result = cli(
        "plan",
        f"{nets_file}:conv_only",
        "--input-shape",
        SMALL_SHAPE,
        "--transfer",
        "exact",
        "--report",
        report,
    )

    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["transfer"] == "exact"
    (layer,) = data["layers"]
    assert layer["name"] == "down"
    assert layer["transfer"] == "exact"
    assert layer["max_abs_error"] < 1e-5
    assert data["totals"]["max_abs_error"] < 1e-5
    assert "max abs output error" in result.stdout


def test_transfer_exact_marks_pool_approximate(cli, nets_file, tmp_path):
    report = tmp_path / "report.json"

    result = cli(
        "plan",
        f"{nets_file}:small_net",
        "--input-shape",
        SMALL_SHAPE,
        "--transfer",
        "exact",
        "--report",
        report,
    )

    assert result.exit_code == 0, result.stderr
    transfers = {
        layer["name"]: layer["transfer"] for layer in json.loads(report.read_text())["layers"]
    }
    assert transfers == {
        "stem": "exact",
        "pool": "approximate",  # a max pool is not linear, so no conv reproduces it
        "block.conv": "exact",
        "block.shortcut": "exact",
    }


def test_mode_modules_keeps_model_class(cli, nets_file, tmp_path):
    folder = tmp_path / "out"

    result = cli(
        "rewrite",
        f"{nets_file}:small_net",
        "--input-shape",
        SMALL_SHAPE,
        "--mode",
        "modules",
        "--out",
        folder,
    )

    assert result.exit_code == 0, result.stderr
    model = spd_rewrite.load(folder)
    assert type(model).__name__ == "SmallNet"
    assert type(model.stem).__name__ == "SPDConv"
    assert type(model.block).__name__ == "Block"
    assert tuple(model.eval()(torch.randn(1, 3, 32, 32)).shape) == (1, 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metadata"]["mode"] == "modules"


def test_weights_match_python_rewrite(cli, tmp_path):
    # Weights from another seed than the CLI builds the model with, so they must come from the file.
    torch.manual_seed(1234)
    model = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(model.state_dict(), weights)
    folder = tmp_path / "out"

    result = cli(
        "rewrite",
        "torchvision.models:resnet18",
        "--input-shape",
        "1,3,64,64",
        "--transfer",
        "exact",
        "--weights",
        weights,
        "--out",
        folder,
    )

    assert result.exit_code == 0, result.stderr
    example = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the CLI seeds the same before rewriting
    expected = spd_rewrite.rewrite(model, example, "paper", transfer="exact").model.state_dict()
    saved = spd_rewrite.load(folder).state_dict()
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    assert torch.equal(saved["fc.weight"], model.fc.weight.detach())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metadata"]["weights"] == str(weights)
