"""CLI cases a fresh-user trial ran into: --debug placement, export input shapes, removed pools."""

from __future__ import annotations

import json


def test_debug_after_subcommand_shows_traceback(cli_process):
    result = cli_process("plan", "no_such_target_name", "--debug")

    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "error: unknown target 'no_such_target_name'" in result.stderr


def test_export_saved_folder_wrong_channels(cli, nets_file, tmp_path):
    folder = tmp_path / "saved"
    saved = cli("rewrite", f"{nets_file}:small_net", "--input-shape", "1,3,16,16", "--out", folder)
    assert saved.exit_code == 0, saved.output

    result = cli("export", folder, "--output", tmp_path / "m.onnx", "--input-shape", "1,5,16,16")

    assert result.exit_code == 2
    assert "(1, 5, 16, 16)" in result.stderr
    assert "--input-shape" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_removed_pool_reports_input_shape(cli, tmp_path):
    rules = tmp_path / "drop.toml"
    rules.write_text('[[rule]]\nname = "drop"\nop = ["max_pool"]\naction = "remove"\n')
    report = tmp_path / "report.json"
    result = cli(
        "plan", "torchvision.models:resnet18", "--input-shape", "1,3,64,64",
        "--rules", rules, "--report", report,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    layer = json.loads(report.read_text())["layers"][0]
    assert layer["name"] == "maxpool"
    assert layer["action"] == "remove"
    assert layer["out_shape"] == layer["in_shape"] == [1, 64, 32, 32]
