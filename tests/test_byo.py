"""Bring your own model: a factory in a user's file goes through the pipeline like a built-in model,
and every mistake in it is one clear error."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from onnxpipe.core.byo import factory_spec, resolve_model
from onnxpipe.cli import app
from onnxpipe.errors import ArtifactError, ConfigError
from onnxpipe.orchestrate import STAGES, Context, run_model
from onnxpipe.runfolder import Run
from onnxpipe.core.predictors import load_torch_model

TINY = dict(limit=300, progress=False, sections={"train": {"epochs": 3, "lr": 3e-3, "patience": 3}})

CNN_FILE = """
import torch
from torch import nn

def build(width: int = 8, num_classes: int = 10) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (N, w, 4, 4)
        nn.Flatten(), nn.Linear(width * 16, num_classes))
    model.example_inputs = {"image": torch.zeros(2, 1, 8, 8)}
    return model
"""

SEQUENCE_FILE = """
import torch
from torch import nn

class MeanPool(nn.Module):
    def __init__(self, features, hidden, num_classes):
        super().__init__()
        self.proj = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, rows):                     # (N, T, F)
        return self.head(torch.relu(self.proj(rows)).mean(1))

def build(hidden: int = 16) -> nn.Module:
    return MeanPool(8, hidden, 10)

EXAMPLE_INPUTS = {"rows": torch.zeros(2, 8, 8)}
DYNAMIC_AXES = {"rows": {0: "batch", 1: "seq_len"}}
"""


def write(tmp_path, text: str, name: str = "mymodel.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_user_factory_goes_through_the_pipeline(tmp_path):
    ref = write(tmp_path, CNN_FILE) + ":build"
    names = [n for n, _ in STAGES]
    wanted = [s for s in ("train", "export", "optimize", "quantize", "verify") if s in names]
    run = run_model(ref, tmp_path / "run", Context(**TINY), overrides={"width": "12"}, stages=wanted)

    manifest = run.manifest
    assert manifest["model"] == "mymodel" and manifest["model_config"] == {"width": 12, "num_classes": 10}
    assert manifest["model_source"]["kind"] == "factory" and len(manifest["model_source"]["sha256"]) == 64
    assert manifest["metrics"]["torch"]["accuracy"] > 0.5
    assert manifest["parity"] and all(p["passed"] for p in manifest["parity"]), manifest["parity"]
    export = next(p for p in manifest["parity"] if (p["reference"], p["candidate"]) == ("torch", "onnx"))
    assert export["max_abs"] < 1e-4 and [1, 1, 8, 8] in export["shapes"] and [64, 1, 8, 8] in export["shapes"]
    if "quantize" in wanted:
        assert any(run.artifact(v).lossy for v in run.variants())

    # A later stage, in a fresh Run, rebuilds the model from the manifest alone.
    again = Run.open(run.root)
    model = load_torch_model(again, "torch")
    x = torch.from_numpy(np.load(run.root / "reference.npz")["inputs"])
    assert model[0].out_channels == 12
    np.testing.assert_allclose(model(x).detach().numpy(), np.load(run.root / "reference.npz")["outputs"], atol=1e-6)


def test_user_sequence_model_keeps_its_dynamic_length(tmp_path):
    """Spec object beside the factory; the export is checked at lengths 1, T and 2T."""
    ref = write(tmp_path, SEQUENCE_FILE, "rows.py") + ":build"
    spec = resolve_model(ref)
    assert spec.family == "sequence" and spec.inputs[0].dynamic == {0: "batch", 1: "seq_len"}
    run = run_model(ref, tmp_path / "run", Context(**{**TINY, "sections": {"train": {"epochs": 1}}}),
                    stages=["train", "export"])
    export = next(p for p in run.manifest["parity"] if p["candidate"] == "onnx")
    assert export["passed"] and {1, 8, 16} <= {s[1] for s in export["shapes"]}


def test_changed_factory_file_is_refused(tmp_path):
    path = write(tmp_path, CNN_FILE)
    run = run_model(path + ":build", tmp_path / "run", Context(**{**TINY, "train": False}), stages=["train"])
    (tmp_path / "mymodel.py").write_text(CNN_FILE.replace("width: int = 8", "width: int = 9"))
    with pytest.raises(ArtifactError, match="changed since this run was made"):
        Run.open(run.root).spec


def test_no_train_with_the_users_weights(tmp_path):
    ref = write(tmp_path, CNN_FILE) + ":build"
    torch.manual_seed(123)
    own = resolve_model(ref).build(resolve_model(ref).make_config())
    torch.save(own.state_dict(), tmp_path / "mine.pt")
    run = run_model(ref, tmp_path / "run", Context(**{**TINY, "weights": tmp_path / "mine.pt"}), stages=["train"])
    art = run.artifact("torch")
    assert art.stage == "weights" and art.config["weights"].endswith("mine.pt") and "training" not in run.manifest
    loaded = load_torch_model(run, "torch").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in own.state_dict().items())

    torch.save({"nope": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ArtifactError, match="does not fit the model"):
        run_model(ref, tmp_path / "run2", Context(**{**TINY, "weights": tmp_path / "wrong.pt"}), stages=["train"])


@pytest.mark.parametrize("body, message", [
    ("def other():\n    pass\n", "has no factory 'build'; its callables: other"),
    ("def build():\n    return 42\n", "returned a int, not a torch.nn.Module"),
    ("import torch\ndef build(width):\n    return torch.nn.Linear(2, 2)\n", "parameter 'width' has no default"),
    ("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n", "declares no example input"),
    ("import torch\ndef build():\n    m = torch.nn.Flatten()\n    m.example_inputs = torch.zeros(2, 64)\n"
     "    m.dynamic_axes = {'input': {0: 'batch', 2: 'x'}}\n    return m\n",
     "dynamic axis 2 \\(x\\) of input 'input' does not exist"),
    ("import torch\ndef build():\n    m = torch.nn.Flatten()\n    m.example_inputs = torch.zeros(2, 64)\n"
     "    m.dynamic_axes = {'pixels': {0: 'batch'}}\n    return m\n", "names input\\(s\\) 'pixels'"),
    ("import torch\nclass Fixed(torch.nn.Module):\n    def forward(self, x):\n        return x.reshape(2, 16)\n"
     "def build():\n    m = Fixed()\n    m.example_inputs = torch.zeros(2, 1, 4, 4)\n    return m\n",
     "hard-codes a size that dynamic_axes declares dynamic"),
    ("import torch\nclass Fixed(torch.nn.Module):\n    def forward(self, x):\n        return x.reshape(2, -1)\n"
     "def build():\n    m = Fixed()\n    m.example_inputs = torch.zeros(2, 1, 4, 4)\n    return m\n",
     "first output has shape \\[2, 24\\]; its axis 0 must follow the batch"),
    ("raise RuntimeError('broken on import')\n", "importing .* failed: RuntimeError: broken on import"),
])
def test_factory_mistakes_are_clear_errors(tmp_path, body, message):
    ref = write(tmp_path, body) + ":build"
    with pytest.raises(ConfigError, match=message):
        factory_spec(ref)


def test_command_line_names_the_problem(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["run", "--model", str(tmp_path / "missing.py") + ":build"])
    assert r.exit_code == 1 and "missing.py does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["run", "--model", "no_such_pkg_here.models:build"])
    assert r.exit_code == 1 and "cannot import module 'no_such_pkg_here.models'" in r.output
