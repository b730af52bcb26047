"""Each script in examples/ runs as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_finetune_exact_example_matches_then_trains():
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_exact.py"), "--steps", "4", "--size", "12"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("baseline: loss")
    assert lines[1].startswith("rewritten: 6 layers, max |y_new - y_old| = ")
    error = float(lines[1].rsplit("= ", 1)[1])
    assert error < 1e-4
    assert lines[3].startswith("SPD after fine-tuning: loss")


def test_spd_vs_baseline_example_smoke(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "spd_vs_baseline.py"),
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    assert "resnet18-lowres-spd" in completed.stdout
    assert "yolov5n-spd" in completed.stdout
    assert (tmp_path / "accuracy_vs_size.png").stat().st_size > 0
