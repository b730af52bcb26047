"""``spd-rewrite train`` and ``evaluate`` through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spd_rewrite.cli.app import app

runner = CliRunner()


def test_train_then_evaluate_digits(tmp_path):
    out = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train",
            "resnet18-lowres-spd",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--image-size",
            "4",
            "--batch-size",
            "128",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "trained resnet18-lowres-spd for 1 epochs" in trained.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 1

    evaluated = runner.invoke(
        app,
        [
            "evaluate",
            "resnet18-lowres-spd",
            "--weights",
            str(out / "model.safetensors"),
            "--data",
            "digits",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["val_accuracy"] == records[-1]["val_accuracy"]


def test_train_unknown_data_spec_exits_2(tmp_path):
    result = runner.invoke(
        app, ["train", "resnet18-lowres", "--data", str(tmp_path / "nowhere"), "--epochs", "1"]
    )
    assert result.exit_code == 2
    assert "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
