"""Tests of model specs, weights files and the saved-folder format, on real files in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import fx, nn

import spd_rewrite
from spd_rewrite.errors import CheckpointError, ModelSpecError, OutputFolderError
from spd_rewrite.io import (
    apply_state_dict,
    load,
    load_model,
    read_manifest,
    read_state_dict,
    save,
    saved_folder,
    write_state_dict,
)

REPO_ROOT = Path(spd_rewrite.__file__).resolve().parent.parent

# A model file with a leaf module class, used through a 'file.py:callable' spec.
BLOCKS_SOURCE = '''
import operator

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    """A leaf module with a data-dependent branch, which symbolic tracing cannot look into."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1))
        self.register_buffer("shift", torch.full((1, channels, 1, 1), 0.25), persistent=False)

    def forward(self, x):
        if x.sum() > 0:
            return x * self.weight + self.shift
        return x * self.weight - self.shift


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = Scale(8)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = F.max_pool2d(self.conv(x), 2)
        y = operator.add(self.scale(y), y)
        return self.head(torch.flatten(y, 1))


def build():
    return Net()


def broken():
    raise ValueError("unsupported depth 7\\nsecond line")


MODEL = nn.Linear(4, 2)
NOT_A_MODEL = 3
'''

# Run in a fresh interpreter: load a saved folder, compare its output with the expected one,
# then train one step. Prints a JSON record.
CHECK_SCRIPT = """
import json, sys
import safetensors.torch, torch
from spd_rewrite.io import load

folder, data_file = sys.argv[1], sys.argv[2]
data = safetensors.torch.load_file(data_file)
model = load(folder)
result = {"class": type(model).__name__, "training": model.training}
result["state_dict_keys"] = list(model.state_dict())
if isinstance(model, torch.fx.GraphModule):
    result["code"] = model.code
    result["node_names"] = [node.name for node in model.graph.nodes]
with torch.no_grad():
    before = model(data["input"])
result["max_error"] = (before - data["output"]).abs().max().item()

model.train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model(data["input"]).square().mean().backward()
result["all_grads"] = all(p.grad is not None for p in model.parameters())
optimizer.step()
model.eval()
with torch.no_grad():
    after = model(data["input"])
result["change_after_step"] = (after - before).abs().max().item()
print(json.dumps(result))
"""


@pytest.fixture
def blocks_file(tmp_path: Path) -> Path:
    path = tmp_path / "blocks.py"
    path.write_text(BLOCKS_SOURCE)
    return path


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def check_in_fresh_process(folder: Path, model: nn.Module, example: torch.Tensor) -> dict:
    """Save the expected output, load ``folder`` in a new interpreter and return its record."""
    with torch.no_grad():
        expected = model(example)
    data_file = folder.parent / f"{folder.name}-data.safetensors"
    safetensors.torch.save_file({"input": example, "output": expected}, data_file)
    elsewhere = folder.parent / "empty-cwd"
    elsewhere.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, str(folder), str(data_file)],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Model specs


def test_spec_module_callable_resnet18():
    model = load_model("torchvision.models:resnet18")

    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 1000


def test_spec_file_callable_relative_and_absolute(blocks_file, monkeypatch):
    absolute = load_model(f"{blocks_file}:build")
    monkeypatch.chdir(blocks_file.parent)
    relative = load_model("./blocks.py:build")

    assert type(absolute).__name__ == "Net"
    assert type(relative) is type(absolute)
    assert type(absolute).__module__.startswith("spd_rewrite_user_blocks_")


def test_spec_file_class_and_instance(blocks_file):
    instance = load_model(f"{blocks_file}:MODEL")
    built = load_model(f"{blocks_file}:Net")

    assert isinstance(instance, nn.Linear)
    assert instance is load_model(f"{blocks_file}:MODEL")
    assert type(built).__name__ == "Net"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{tmp}/missing.py:build", ["missing.py", "not found"]),
        ("no_such_package_xyz.models:build", ["'no_such_package_xyz'", "install"]),
        ("torchvision.models:resnet81", ["'resnet81'", "resnet18"]),
        ("{tmp}/blocks.py:bulid", ["blocks.py", "'bulid'", "build"]),
        ("{tmp}/blocks.py:broken", ["broken()", "ValueError: unsupported depth 7"]),
        ("{tmp}/blocks.py:NOT_A_MODEL", ["NOT_A_MODEL", "int"]),
        ("torchvision.models:list_models", ["list_models()", "list", "nn.Module"]),
        ("{tmp}/blocks.py:", ["no callable"]),
        ("{tmp}/missing/model.pt", ["model.pt", "not found"]),
        ("no_such_target_xyz", ["no_such_target_xyz"]),
        ("{tmp}", ["is a directory", "--weights"]),
        ("{tmp}/blocks.py", ["no callable"]),
    ],
)
def test_spec_errors_name_the_offender(spec, expected, tmp_path, blocks_file):
    with pytest.raises(ModelSpecError) as caught:
        load_model(spec.format(tmp=tmp_path))

    message = str(caught.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_spec_file_with_missing_dependency(tmp_path):
    path = tmp_path / "needs_dep.py"
    path.write_text("import not_installed_dependency_xyz\n\ndef build():\n    return None\n")

    with pytest.raises(ModelSpecError, match="'not_installed_dependency_xyz'.*PYTHONPATH"):
        load_model(f"{path}:build")


def test_spec_module_with_missing_dependency(tmp_path, monkeypatch):
    (tmp_path / "spd_io_needs_dep.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ModelSpecError, match="'spd_io_needs_dep'.*needs module 'not_installed"):
        load_model("spd_io_needs_dep:build")


def test_spec_weights_file_as_model(tmp_path):
    path = tmp_path / "weights.safetensors"
    write_state_dict(small_model(), path)

    with pytest.raises(ModelSpecError, match="weights.safetensors.*--weights"):
        load_model(str(path))


def test_spec_state_dict_pt_as_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(small_model().state_dict(), path)

    with pytest.raises(
        ModelSpecError, match="weights.pt.*plain data.*not a pickled nn.Module.*--weights"
    ):
        load_model(str(path))


def test_spec_pickle_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    model = small_model()
    torch.save(model, path)

    with pytest.raises(ModelSpecError) as caught:
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)

    assert "whole.pt" in str(caught.value)
    assert "unpickling runs code" in str(caught.value)
    assert "--trust-pickle" in str(caught.value)
    assert isinstance(loaded, nn.Sequential)
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_spec_pickle_of_non_module(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"layers": nn.Linear(2, 2)}, path)

    with pytest.raises(ModelSpecError, match="object.pt.*type dict, not an nn.Module"):
        load_model(str(path), trust_pickle=True)


# ---------------------------------------------------------------------------------------------
# Weights files


def test_state_dict_safetensors_round_trip(tmp_path):
    source = torchvision.models.resnet18(weights=None).eval()
    path = write_state_dict(source, tmp_path / "resnet18.safetensors")
    target = torchvision.models.resnet18(weights=None).eval()

    apply_state_dict(target, read_state_dict(path), source=path)

    example = torch.randn(1, 3, 64, 64)
    assert torch.equal(source(example), target(example))


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_state_dict_torch_files(tmp_path, wrapper, suffix):
    model = small_model()
    state = model.state_dict()
    path = tmp_path / f"weights{suffix}"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)

    loaded = read_state_dict(path)

    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_state_dict_truncated_safetensors(tmp_path):
    path = write_state_dict(small_model(), tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-40])

    with pytest.raises(
        CheckpointError, match="cut.safetensors.*not a valid safetensors.*truncated"
    ):
        read_state_dict(path)


def test_state_dict_garbage_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 7)

    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_state_dict(path)


def test_state_dict_truncated_pt(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(small_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(CheckpointError, match="cut.pt.*cannot be read.*truncated"):
        read_state_dict(path)


def test_state_dict_pickled_model_rejected(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(small_model(), path)

    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)

    assert "whole.pt" in str(caught.value)
    assert "not a plain state dict" in str(caught.value)
    assert "model.state_dict()" in str(caught.value)


def test_state_dict_not_tensors(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"lr": 0.1, "epochs": 3}, path)

    with pytest.raises(CheckpointError, match="config.pt.*not a state dict"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing.safetensors", "missing.safetensors' not found"),
        ("weights.ckpt", "unknown extension '.ckpt'"),
        ("run", "is a directory; pass a weights file inside it such as last.pt"),
    ],
)
def test_state_dict_path_errors(tmp_path, name, expected):
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"x")

    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        read_state_dict(tmp_path / name)


def test_apply_state_dict_shape_mismatch(tmp_path):
    path = write_state_dict(
        torchvision.models.resnet18(weights=None, num_classes=10), tmp_path / "w.safetensors"
    )
    model = torchvision.models.resnet18(weights=None)

    with pytest.raises(CheckpointError) as caught:
        apply_state_dict(model, read_state_dict(path), source=path)

    message = str(caught.value)
    assert "w.safetensors" in message
    assert "'fc.weight'" in message
    assert "(10, 512)" in message
    assert "(1000, 512)" in message
    assert "1 more mismatches" in message


def test_apply_state_dict_missing_and_unexpected():
    model = small_model()
    missing = dict(model.state_dict())
    del missing["1.running_mean"]
    unexpected = {**model.state_dict(), "3.weight": torch.zeros(1)}

    with pytest.raises(CheckpointError, match=r"key '1\.running_mean' is missing from the file"):
        apply_state_dict(small_model(), missing, source="a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt.*the file has key '3\.weight'"):
        apply_state_dict(small_model(), unexpected, source="a.pt")


def test_apply_state_dict_prefix_hint():
    state = {f"module.{key}": value for key, value in small_model().state_dict().items()}

    with pytest.raises(CheckpointError, match="start with 'module.', so strip that prefix"):
        apply_state_dict(small_model(), state, source="ddp.pt")


def test_write_state_dict_tied_and_deterministic(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight

    first = write_state_dict(model, tmp_path / "first.safetensors")
    second = write_state_dict(model, tmp_path / "second.safetensors")
    loaded = read_state_dict(first)

    assert first.read_bytes() == second.read_bytes()
    assert list(loaded) == ["0.weight", "1.weight"]
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# Saved folders: round trips


def test_saved_folder_resnet18_fresh_process(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    folder = save(model, tmp_path / "resnet18")

    record = check_in_fresh_process(folder, model, torch.randn(2, 3, 64, 64))

    assert record["class"] == "ResNet"
    assert record["training"] is False
    assert record["state_dict_keys"] == list(model.state_dict())
    assert record["max_error"] == 0.0
    assert record["all_grads"] is True
    assert record["change_after_step"] > 0.0
    assert not (folder / "model.py").exists()


def test_saved_folder_traced_resnet18_fresh_process(tmp_path):
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None).eval())
    folder = save(gm, tmp_path / "traced")

    record = check_in_fresh_process(folder, gm, torch.randn(2, 3, 64, 64))

    assert record["class"] == "ResNet"
    assert record["code"] == gm.code
    assert record["node_names"] == [node.name for node in gm.graph.nodes]
    assert record["state_dict_keys"] == list(gm.state_dict())
    assert record["max_error"] == 0.0
    assert record["all_grads"] is True
    assert record["change_after_step"] > 0.0


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return type(module).__name__ == "Scale" or super().is_leaf_module(module, qualname)


def test_saved_folder_graph_with_functions_and_user_leaf(tmp_path, blocks_file):
    net = load_model(f"{blocks_file}:build").eval()
    gm = fx.GraphModule(net, _LeafTracer().trace(net), "Net")
    targets = {node.target for node in gm.graph.nodes if node.op == "call_function"}
    folder = save(gm, tmp_path / "custom")

    # The fresh process has no blocks.py on its path: the folder records the file to import.
    record = check_in_fresh_process(folder, gm, torch.randn(2, 3, 8, 8))

    assert {torch.nn.functional.max_pool2d, torch.flatten} <= targets
    assert any(getattr(target, "__name__", "") == "add" for target in targets)
    assert record["code"] == gm.code
    assert record["node_names"] == [node.name for node in gm.graph.nodes]
    assert record["state_dict_keys"] == list(gm.state_dict())
    assert record["max_error"] == 0.0
    assert record["change_after_step"] > 0.0


def test_load_after_model_file_removed(tmp_path, blocks_file):
    folder = save(load_model(f"{blocks_file}:build"), tmp_path / "net")
    blocks_file.unlink()
    script = "import sys; from spd_rewrite.io import load; load(sys.argv[1])"

    completed = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )

    last_line = completed.stderr.strip().splitlines()[-1]
    assert completed.returncode == 1
    assert "OutputFolderError" in last_line
    assert f"from file '{blocks_file}', which no longer exists" in last_line


def test_saved_folder_edited_graph_keeps_names(tmp_path):
    gm = fx.symbolic_trace(small_model())
    conv = next(node for node in gm.graph.nodes if node.op == "call_module")
    conv.name = "renamed_conv"
    with gm.graph.inserting_after(conv):
        extra = gm.graph.call_function(torch.relu, (conv,))
    extra.name = "custom_relu"
    conv.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    gm.graph.lint()
    gm.recompile()
    outer = nn.Sequential(gm, nn.Flatten())

    loaded = load(save(outer, tmp_path / "edited"))

    assert isinstance(loaded[0], fx.GraphModule)
    assert [node.name for node in loaded[0].graph.nodes] == [node.name for node in gm.graph.nodes]
    assert loaded[0].code == gm.code
    example = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded.eval()(example), outer.eval()(example))


def test_saved_folder_model_py_is_valid_python(tmp_path, blocks_file):
    net = load_model(f"{blocks_file}:build")
    gm = fx.GraphModule(net, _LeafTracer().trace(net), "Net")
    folder = save(gm, tmp_path / "custom")
    namespace: dict[str, object] = {}

    exec(compile((folder / "model.py").read_text(), "model.py", "exec"), namespace)

    assert callable(getattr(namespace["Net"], "forward", None))


class _Attributes(nn.Module):
    """Every kind of state the format stores, on one module."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("scale", torch.tensor([2.0]), persistent=False)
        self.register_buffer("unused", None)
        self.register_parameter("missing_bias", None)
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)
        self.optional_child = None
        self.register_module("empty_slot", None)
        self.constant = torch.arange(4.0)
        self.kernel = (3, 3)
        self.nested = {"sizes": [1, (2, 3)], "__tuple__": "a user key", "flag": True}
        self.limits = (float("inf"), float("-inf"), 0.5)
        self.dtype = torch.float16
        self.device = torch.device("cpu")
        self.shape = torch.Size([1, 4])
        self.norm_class = nn.BatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)) * self.scale + self.constant * self.frozen


def test_saved_folder_attribute_kinds(tmp_path):
    model = _Attributes()
    model.decoder.eval()
    folder = save(model, tmp_path / "attributes")

    loaded = load(folder)

    assert loaded.decoder.weight is loaded.encoder.weight
    assert loaded._non_persistent_buffers_set == {"scale"}
    assert loaded._buffers["unused"] is None
    assert loaded._parameters["missing_bias"] is None
    assert loaded._modules["empty_slot"] is None
    assert loaded.optional_child is None
    assert loaded.frozen.requires_grad is False
    assert torch.equal(loaded.constant, model.constant)
    assert loaded.kernel == (3, 3)
    assert loaded.nested == model.nested
    assert loaded.limits == model.limits
    assert loaded.dtype is torch.float16
    assert loaded.device == torch.device("cpu")
    assert type(loaded.shape) is torch.Size
    assert loaded.norm_class is nn.BatchNorm2d
    assert loaded.decoder.training is False
    assert loaded.encoder.training is True
    assert list(loaded.state_dict()) == list(model.state_dict())
    example = torch.randn(2, 4)
    assert torch.equal(loaded(example), model(example))


def test_saved_folder_conv_keeps_private_padding(tmp_path):
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    loaded = load(save(conv, tmp_path / "conv"))

    example = torch.randn(1, 3, 5, 5)
    assert loaded._reversed_padding_repeated_twice == conv._reversed_padding_repeated_twice
    assert torch.equal(loaded(example), conv(example))


def test_saved_folder_deterministic(tmp_path):
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None))
    first = save(gm, tmp_path / "first")
    second = save(gm, tmp_path / "second")

    for name in ("model.safetensors", "model.json", "model.py"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_saved_folder_manifest_and_extra_files(tmp_path):
    folder = save(
        small_model(),
        tmp_path / "out",
        metadata={"spec": "torchvision.models:resnet18", "stride_layers": 5},
        extra_files={"report.json": "{}", "report.md": b"# Report\n"},
    )

    manifest = read_manifest(folder)

    assert manifest["format_version"] == saved_folder.FORMAT_VERSION
    assert manifest["spd_rewrite_version"] == spd_rewrite.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["metadata"] == {"spec": "torchvision.models:resnet18", "stride_layers": 5}
    assert (folder / "report.md").read_bytes() == b"# Report\n"
    assert sorted(manifest["files"]) == sorted(
        p.name for p in folder.iterdir() if p.name != "manifest.json"
    )


# ---------------------------------------------------------------------------------------------
# Saved folders: refusals, atomicity and force


class _Unsavable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(2, 2))
        self.block[0].callback = object()


def test_save_unsavable_attribute_leaves_nothing(tmp_path):
    with pytest.raises(OutputFolderError) as caught:
        save(_Unsavable(), tmp_path / "out")

    message = str(caught.value)
    assert "'block.0'" in message
    assert "attribute 'callback'" in message
    assert "builtins.object" in message
    assert list(tmp_path.iterdir()) == []


def test_save_failure_at_rename_leaves_old_folder(tmp_path, monkeypatch):
    folder = save(small_model(), tmp_path / "out")
    before = (folder / "model.safetensors").read_bytes()

    def fail(staging: Path, target: Path) -> None:
        assert (staging / "model.safetensors").is_file()
        raise OSError("simulated failure after writing every file")

    monkeypatch.setattr(saved_folder, "_move_into_place", fail)
    with pytest.raises(OSError, match="simulated failure"):
        save(nn.Linear(3, 3), folder, force=True)

    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_existing_folder_needs_force(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    with pytest.raises(OutputFolderError, match=r"'.*out' exists and is not empty.*--force"):
        save(small_model(), folder)
    save(nn.Linear(3, 3), folder, force=True)

    assert not (folder / "old.txt").exists()
    assert isinstance(load(folder), nn.Linear)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_into_existing_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()

    assert isinstance(load(save(nn.Linear(3, 3), tmp_path / "out")), nn.Linear)


def test_save_rejects_hooks(tmp_path):
    model = small_model()
    model[1].register_forward_hook(lambda module, inputs, output: None)

    with pytest.raises(OutputFolderError, match=r"module '1' \(BatchNorm2d\).*hooks.*remove"):
        save(model, tmp_path / "out")


def test_save_rejects_local_class(tmp_path):
    class Local(nn.Module):
        pass

    with pytest.raises(OutputFolderError, match="Local cannot be imported by name.*top level"):
        save(nn.Sequential(Local()), tmp_path / "out")


@pytest.mark.parametrize("name", ["model.json", "../escape.txt", ""])
def test_save_rejects_bad_extra_file_names(tmp_path, name):
    with pytest.raises(OutputFolderError, match="extra file name"):
        save(small_model(), tmp_path / "out", extra_files={name: "x"})


def test_load_errors(tmp_path):
    folder = save(small_model(), tmp_path / "out")
    (tmp_path / "plain").mkdir()

    with pytest.raises(OutputFolderError, match="'.*nowhere' not found"):
        load(tmp_path / "nowhere")
    with pytest.raises(OutputFolderError, match="plain' is not a saved spd-rewrite folder"):
        load(tmp_path / "plain")

    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(OutputFolderError, match="format version 99.*upgrade spd-rewrite"):
        load(folder)


def test_load_class_not_importable(tmp_path):
    folder = save(small_model(), tmp_path / "out")
    tree_file = folder / "model.json"
    tree_file.write_text(
        tree_file.read_text().replace("torch.nn.modules.conv:Conv2d", "no_such_pkg.layers:Conv2d")
    )

    with pytest.raises(OutputFolderError, match="'no_such_pkg.layers:Conv2d'.*install the package"):
        load(folder)


def test_load_corrupt_weights(tmp_path):
    folder = save(small_model(), tmp_path / "out")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])

    with pytest.raises(
        OutputFolderError, match="model.safetensors cannot be read.*save the model again"
    ):
        load(folder)
