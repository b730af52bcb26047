"""Tests of the command line on bad input: each case gets one error line that names the offending
spec, file, key or value, a documented exit code, no traceback and no output folder.

Exit codes: 0 success, 1 the rewritten model failed verification or channel propagation, 2 bad
input or a failed file operation, 3 an internal error.
"""

from __future__ import annotations

import errno
import json
import pathlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import spd_rewrite
from spd_rewrite.errors import OutputFolderError
from spd_rewrite.job import RewriteJob, run_job

SMALL_SHAPE = "1,3,32,32"


def assert_rejected(exit_code: int, stdout: str, stderr: str, expected_code: int, *names: str):
    """Check one ``error:`` line on stderr that contains every name, and nothing on stdout."""
    assert exit_code == expected_code, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for name in names:
        assert name in lines[0]


def assert_only(folder: Path, *names: str) -> None:
    """Check that ``folder`` contains exactly ``names``: no output and no hidden staging folder."""
    assert sorted(path.name for path in folder.iterdir()) == sorted(names)


def pickled_sequential(path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    torch.save(model, path)
    return path


# Model specs


def test_missing_model_file(cli_process, tmp_path):
    spec = f"{tmp_path / 'missing.py'}:build"

    result = cli_process("rewrite", spec, "--out", tmp_path / "out")

    assert_rejected(result.returncode, result.stdout, result.stderr, 2, "missing.py", "not found")
    assert_only(tmp_path)


def test_missing_attribute(cli, tmp_path):
    result = cli("rewrite", "torchvision.models:resnet999", "--out", tmp_path / "out")

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, "'resnet999'", "'torchvision.models'"
    )
    assert "resnet50" in result.stderr  # close names are suggested
    assert_only(tmp_path)


def test_missing_module(cli, tmp_path):
    result = cli("rewrite", "no_such_package_abc.models:build", "--out", tmp_path / "out")

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, "'no_such_package_abc'", "not found"
    )
    assert_only(tmp_path)


def test_file_defines_no_model(cli, nets_file, tmp_path):
    result = cli("rewrite", f"{nets_file}:missing", "--out", tmp_path / "out")

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, "defines no 'missing'", str(nets_file)
    )
    assert_only(tmp_path, "nets.py")


def test_callable_returns_non_module(cli, nets_file, tmp_path):
    result = cli("rewrite", f"{nets_file}:returns_int", "--out", tmp_path / "out")

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, "returns_int()", "returned int"
    )
    assert "nn.Module" in result.stderr
    assert_only(tmp_path, "nets.py")


def test_callable_raises_on_build(cli, nets_file, tmp_path):
    result = cli("rewrite", f"{nets_file}:raises_on_build", "--out", tmp_path / "out")

    assert_rejected(
        result.exit_code,
        result.stdout,
        result.stderr,
        2,
        "raises_on_build()",
        "cannot build without a config file",
    )
    assert_only(tmp_path, "nets.py")


def test_pickled_model_needs_trust(cli_process, tmp_path):
    model_file = pickled_sequential(tmp_path / "whole.pt")

    result = cli_process(
        "rewrite", model_file, "--input-shape", SMALL_SHAPE, "--out", tmp_path / "out"
    )

    assert_rejected(
        result.returncode,
        result.stdout,
        result.stderr,
        2,
        str(model_file),
        "unpickling runs code",
        "--trust-pickle",
    )
    assert_only(tmp_path, "whole.pt")


def test_pickled_model_with_trust(cli, tmp_path):
    model_file = pickled_sequential(tmp_path / "whole.pt")
    folder = tmp_path / "out"

    result = cli(
        "rewrite", model_file, "--trust-pickle", "--input-shape", SMALL_SHAPE, "--out", folder
    )

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "replaced 1, downsampling left 0" in result.stdout
    model = spd_rewrite.load(folder)
    assert tuple(model(torch.randn(1, 3, 32, 32)).shape) == (1, 4, 16, 16)


# Weights files


@pytest.fixture
def small_net_weights(tmp_path, nets_file) -> Path:
    """A safetensors file of the state dict of ``nets.py:small_net``."""
    model = spd_rewrite.io.load_model(f"{nets_file}:small_net")
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    return path


def test_truncated_safetensors(cli, nets_file, small_net_weights, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(small_net_weights.read_bytes()[:-100])

    result = cli(
        "rewrite", f"{nets_file}:small_net", "--weights", truncated, "--out", tmp_path / "out"
    )

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(truncated), "not a valid safetensors"
    )
    assert_only(tmp_path, "nets.py", "weights.safetensors", "truncated.safetensors")


def test_corrupt_safetensors(cli, nets_file, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)

    result = cli(
        "rewrite", f"{nets_file}:small_net", "--weights", corrupt, "--out", tmp_path / "out"
    )

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(corrupt), "not a valid safetensors"
    )
    assert_only(tmp_path, "nets.py", "corrupt.safetensors")


def test_state_dict_does_not_fit(cli, nets_file, tmp_path):
    state = spd_rewrite.io.load_model(f"{nets_file}:small_net").state_dict()
    state["block.conv.weight"] = torch.zeros(16, 4, 3, 3)
    state["fc.weight"] = torch.zeros(3, 16)
    weights = tmp_path / "other.safetensors"
    safetensors.torch.save_file(state, weights)

    result = cli(
        "rewrite", f"{nets_file}:small_net", "--weights", weights, "--out", tmp_path / "out"
    )

    assert_rejected(
        result.exit_code,
        result.stdout,
        result.stderr,
        2,
        str(weights),
        "'block.conv.weight'",
        "(16, 4, 3, 3) in the file",
        "(16, 8, 3, 3) in the model",
        "1 more mismatches",
    )
    assert_only(tmp_path, "nets.py", "other.safetensors")


def test_weights_path_is_directory(cli, nets_file, tmp_path):
    weights = tmp_path / "checkpoints"
    weights.mkdir()
    (weights / "last.safetensors").write_bytes(b"")

    result = cli(
        "rewrite", f"{nets_file}:small_net", "--weights", weights, "--out", tmp_path / "out"
    )

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(weights), "is a directory"
    )
    assert "last.safetensors" in result.stderr  # the hint names a file inside
    assert_only(tmp_path, "nets.py", "checkpoints")


def test_weights_file_missing(cli, nets_file, tmp_path):
    weights = tmp_path / "nope.safetensors"

    result = cli("plan", f"{nets_file}:small_net", "--weights", weights)

    assert_rejected(result.exit_code, result.stdout, result.stderr, 2, str(weights), "not found")


def test_weights_file_is_pickled_model(cli, nets_file, tmp_path):
    weights = pickled_sequential(tmp_path / "model.pt")

    result = cli("plan", f"{nets_file}:small_net", "--weights", weights)

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(weights), "not a plain state dict"
    )


# Rule files


def test_malformed_toml_mid_file(cli, nets_file, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('name = "mine"\nchannel_order = \n\n[[rule]]\nop = ["conv"]\n')

    result = cli("plan", f"{nets_file}:small_net", "--rules", rules)

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, "malformed TOML", f"{rules}:2"
    )


def test_malformed_toml_at_end(cli, nets_file, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('name = "mine"\n\n[[rule]]\nop = ["conv"\n')

    result = cli("plan", f"{nets_file}:small_net", "--rules", rules)

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, "malformed TOML", f"{rules}:4"
    )


def test_unknown_rule_key(cli, nets_file, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('name = "mine"\n\n[[rule]]\nname = "convs"\nop = ["conv"]\nstrides = 2\n')

    result = cli("plan", f"{nets_file}:small_net", "--rules", rules)

    assert_rejected(result.exit_code, result.stdout, result.stderr, 2, "'strides'", f"{rules}:6")
    known = result.stderr.strip().split("known rule keys: ")[1].split(", ")
    assert "stride" in known


def test_rule_file_missing(cli, nets_file, tmp_path):
    rules = tmp_path / "mine.toml"

    result = cli("plan", f"{nets_file}:small_net", "--rules", rules)

    assert_rejected(result.exit_code, result.stdout, result.stderr, 2, str(rules), "not found")


def test_rule_matching_nothing_warns(cli, nets_file, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        'name = "mine"\n\n'
        '[[rule]]\nname = "strided"\n\n'
        '[[rule]]\nname = "ghost"\ninclude = ["head.*"]\n'
    )
    report = tmp_path / "report.json"

    result = cli(
        "plan",
        f"{nets_file}:small_net",
        "--input-shape",
        SMALL_SHAPE,
        "--rules",
        rules,
        "--report",
        report,
    )

    assert result.exit_code == 0, result.stderr
    assert "rule 'ghost'" in result.stderr
    assert "matched nothing" in result.stderr
    assert str(rules) in result.stderr
    data = json.loads(report.read_text())
    assert data["unused_rules"] == ["ghost"]
    assert data["totals"]["replaced"] == 4


# Example input


@pytest.mark.parametrize("shape", ["1,3,abc", "0,3,8,8", "3,8", "1,3,-8,8", "1,3,8.5,8"])
def test_bad_input_shape(cli, nets_file, tmp_path, shape):
    result = cli(
        "rewrite", f"{nets_file}:small_net", "--input-shape", shape, "--out", tmp_path / "out"
    )

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, f"--input-shape {shape!r}", "1,3,224,224"
    )
    assert_only(tmp_path, "nets.py")


def test_wrong_channel_count(cli, tmp_path):
    result = cli(
        "rewrite",
        "torchvision.models:resnet18",
        "--input-shape",
        "1,4,64,64",
        "--out",
        tmp_path / "out",
    )

    assert_rejected(
        result.exit_code,
        result.stdout,
        result.stderr,
        2,
        "(1, 4, 64, 64)",
        "to have 3 channels, but got 4",
        "--input-shape",
    )
    assert_only(tmp_path)


def test_model_raises_in_forward(cli, nets_file, tmp_path):
    result = cli(
        "rewrite",
        f"{nets_file}:raises_in_forward",
        "--input-shape",
        SMALL_SHAPE,
        "--out",
        tmp_path / "out",
    )

    assert_rejected(
        result.exit_code,
        result.stdout,
        result.stderr,
        2,
        "RaisesInForward raised ValueError",
        "forward is not implemented yet",
    )
    assert_only(tmp_path, "nets.py")


@pytest.mark.parametrize("option,value", [("--transfer", "exactly"), ("--mode", "module")])
def test_unknown_option_value(cli, nets_file, option, value):
    result = cli("plan", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE, option, value)

    assert_rejected(result.exit_code, result.stdout, result.stderr, 2, repr(value))


# Rewrites that fail verification (exit 1)


@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_removed_pool_breaks_model(cli, tmp_path, mode):
    source = tmp_path / "flat.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Flat(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.pool = nn.MaxPool2d(2)\n"
        "        self.fc = nn.Linear(3 * 8 * 8, 2)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.flatten(self.pool(x), 1))\n"
    )
    rules = tmp_path / "drop.toml"
    rules.write_text('name = "drop"\n\n[[rule]]\nop = ["max_pool"]\naction = "remove"\n')

    result = cli(
        "rewrite",
        f"{source}:Flat",
        "--input-shape",
        "1,3,16,16",
        "--rules",
        rules,
        "--mode",
        mode,
        "--out",
        tmp_path / "out",
    )

    assert_rejected(
        result.exit_code,
        result.stdout,
        result.stderr,
        1,
        "the rewritten model failed",
        "mat1 and mat2",
        'action = "remove"',
    )
    assert_only(tmp_path, "flat.py", "drop.toml")


# Output folder and report file


def test_out_folder_not_empty(cli, nets_file, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    spec = f"{nets_file}:small_net"

    rejected = cli("rewrite", spec, "--input-shape", SMALL_SHAPE, "--out", folder)

    assert_rejected(
        rejected.exit_code, rejected.stdout, rejected.stderr, 2, str(folder), "not empty", "--force"
    )
    assert (folder / "notes.txt").read_text() == "keep me"

    replaced = cli("rewrite", spec, "--input-shape", SMALL_SHAPE, "--out", folder, "--force")

    assert replaced.exit_code == 0, replaced.stderr
    assert not (folder / "notes.txt").exists()
    assert type(spd_rewrite.load(folder).stem).__name__ == "SPDConv"
    assert_only(tmp_path, "nets.py", "out")


def test_out_is_file(cli, nets_file, tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")

    result = cli("rewrite", f"{nets_file}:small_net", "--out", target, "--force")

    assert_rejected(result.exit_code, result.stdout, result.stderr, 2, str(target), "is a file")
    assert target.read_text() == "a file"


@pytest.mark.parametrize("name", ["report.txt", "report"])
def test_report_unknown_extension(cli, nets_file, tmp_path, name):
    result = cli("plan", f"{nets_file}:small_net", "--report", tmp_path / name)

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(tmp_path / name), ".json or .md"
    )
    assert_only(tmp_path, "nets.py")


def test_report_parent_is_file(cli, nets_file, tmp_path):
    (tmp_path / "notes").write_text("a file")
    report = tmp_path / "notes" / "report.json"

    result = cli("rewrite", f"{nets_file}:small_net", "--out", tmp_path / "out", "--report", report)

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(report), str(tmp_path / "notes")
    )
    assert_only(tmp_path, "nets.py", "notes")


def test_save_fails_half_way(cli, nets_file, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    original_write_bytes = pathlib.Path.write_bytes
    written: list[str] = []

    def write_one_then_fail(self: Path, data: bytes) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        written.append(self.name)
        return original_write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_one_then_fail)

    result = cli("rewrite", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE, "--out", folder)

    assert written  # the failure came after a file was written
    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(folder), "No space left on device"
    )
    assert_only(tmp_path, "nets.py")


def test_report_write_fails_after_save(cli, nets_file, tmp_path, monkeypatch):
    report = tmp_path / "report.json"

    def fail(report_record, path):
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(spd_rewrite.job, "write_report", fail)

    result = cli(
        "rewrite",
        f"{nets_file}:small_net",
        "--input-shape",
        SMALL_SHAPE,
        "--out",
        tmp_path / "out",
        "--report",
        report,
    )

    assert_rejected(
        result.exit_code, result.stdout, result.stderr, 2, str(report), "Permission denied"
    )
    assert_only(tmp_path, "nets.py")


def test_unsavable_attribute_leaves_nothing(nets_file, tmp_path):
    job = RewriteJob(
        model=f"{nets_file}:with_object_attribute",
        input_shape=SMALL_SHAPE,
        mode="modules",
        out=tmp_path / "out",
    )

    with pytest.raises(OutputFolderError) as caught:
        run_job(job)

    message = str(caught.value)
    assert "attribute 'hook'" in message
    assert "WithObjectAttribute" in message
    assert_only(tmp_path, "nets.py")


# Tracebacks and internal errors


def test_debug_shows_traceback(cli_process, nets_file, tmp_path):
    result = cli_process(
        "--debug", "rewrite", f"{nets_file}:raises_in_forward", "--input-shape", SMALL_SHAPE
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" in result.stderr
    assert "forward is not implemented yet" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: RaisesInForward raised ValueError")


def test_internal_error_exit_code(cli, nets_file, monkeypatch):
    def broken_rewrite(*args, **kwargs):
        raise KeyError("layer2.0.conv1")

    monkeypatch.setattr(spd_rewrite.job, "rewrite", broken_rewrite)

    result = cli("plan", f"{nets_file}:small_net", "--input-shape", SMALL_SHAPE)

    assert result.exit_code == 3
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("internal error: KeyError: 'layer2.0.conv1'")
    assert "--debug" in lines[0]
