"""DistributedDataParallel on two gloo processes matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

# Run by one process and by torchrun, it trains and saves a small model without batch norm.
# Per-process batch statistics would make the runs differ, and SyncBatchNorm needs CUDA.
SCRIPT = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    from pathlib import Path

    import torch
    from torch import nn
    from torch.utils.data import Subset

    from spd_rewrite.train import TrainConfig, load_data, train

    out = Path(sys.argv[1])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    bundle = load_data("digits")
    bundle = replace(
        bundle, train=Subset(bundle.train, range(128)), val=Subset(bundle.val, range(30))
    )
    config = TrainConfig(
        epochs=2, batch_size=32, lr=0.1, momentum=0.9, warmup_epochs=0.5,
        device="cpu", progress=False, out_dir=out,
    )
    result = train(model, bundle, config)
    assert result.completed
    """
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(command: list[str], cwd: Path) -> None:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    script = tmp_path / "train_small.py"
    script.write_text(SCRIPT)
    run([sys.executable, str(script), str(tmp_path / "single")], tmp_path)
    run(
        [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(script), str(tmp_path / "pair"),
        ],
        tmp_path,
    )  # fmt: skip

    single = load_file(tmp_path / "single" / "model.safetensors")
    pair = load_file(tmp_path / "pair" / "model.safetensors")
    assert single.keys() == pair.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(pair[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    # Only rank 0 writes: one metrics line per epoch, and accuracy counted over all 30 images.
    lines = (tmp_path / "pair" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    single_records = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    final_single = json.loads(single_records[-1])
    assert round(records[-1]["val_accuracy"] * 30) == round(final_single["val_accuracy"] * 30)
    assert abs(records[-1]["train_loss"] - final_single["train_loss"]) < 1e-4
