"""examples/keras_cnn.py end to end: Keras 3 (torch backend) trains the classic CNN, Keras's own
exporter writes ONNX, `onnxpipe import` makes the run, and ONNX Runtime reproduces Keras's predictions.

Runs only where the `keras` extra is installed (pip install -e ".[keras]"); CI installs it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnxpipe.runfolder import Run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "keras_cnn.py"


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras not installed: pip install -e '.[keras]'")
def test_keras_cnn_example_matches_keras(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    # A fresh interpreter: Keras sets process-wide state that the other tests need not share.
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--limit", "400", "--json",
                           "--out", str(tmp_path / "keras_cnn")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_abs"] < 1e-5 and result["agreement"] == 1.0
    assert result["onnx_accuracy"] == pytest.approx(result["keras_accuracy"], abs=1e-9)
    assert result["keras_accuracy"] > 0.3  # 1 epoch on 400 images: well above chance (0.1), so the parity means something

    run = Run.open(result["run"])
    art = run.artifact("onnx")
    assert art.stage == "import" and art.parent is None and run.manifest["selected"] == "onnx"
    source = run.manifest["model_source"]
    assert source["layout"] == "nhwc" and source["inputs"][0]["shape"] == [28, 28, 1]
    assert run.manifest["dataset"]["layout"] == "nhwc" and source["num_classes"] == 10
