"""End to end through the CLI (typer's CliRunner): the pipeline, and user errors -> exit 1 with one line."""
import json

import pytest
from typer.testing import CliRunner

from onnxpipe.atomic import sha256_file
from onnxpipe.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("run", "train", "export", "verify"):
        assert cmd in r.output


def test_run_end_to_end(tmp_path):
    r = invoke("run", "--model", "lstm", "--out", tmp_path, "--limit", 400, "--epochs", 4, "--quiet",
               "--stages", "train,export,verify")
    assert r.exit_code == 0, r.output
    assert "lstm" in r.output and "pass" in r.output
    root = tmp_path / "lstm"
    m = json.loads((root / "manifest.json").read_text())
    for art in m["artifacts"].values():
        assert sha256_file(root / art["path"]) == art["sha256"]
    assert m["metrics"]["torch"]["accuracy"] > 0.5  # chance is 0.1
    assert m["metrics"]["onnx"]["accuracy"] == m["metrics"]["torch"]["accuracy"]
    pairs = {(p["reference"], p["candidate"]): p for p in m["parity"]}
    assert pairs[("torch", "onnx")]["passed"] and pairs[("torch", "onnx")]["max_abs"] < 1e-4
    assert m["training"]["epochs_run"] <= 4 and len(m["training"]["history"]) == m["training"]["epochs_run"]

    # each stage also works alone on the run folder
    r = invoke("verify", root)
    assert r.exit_code == 0 and "torch" in r.output
    r = invoke("show", root)
    assert r.exit_code == 0 and "onnx" in r.output


def test_train_resume_continues_from_checkpoint(tmp_path):
    root = tmp_path / "gru"
    r = invoke("train", "gru", "--run", root, "--limit", 300, "--epochs", 2, "--patience", 50, "--quiet")
    assert r.exit_code == 0, r.output
    first = json.loads((root / "manifest.json").read_text())["training"]
    assert first["epochs_run"] == 2
    r = invoke("train", "gru", "--run", root, "--limit", 300, "--epochs", 4, "--patience", 50, "--quiet")
    assert r.exit_code == 1 and "--resume" in r.output
    r = invoke("train", "gru", "--run", root, "--epochs", 4, "--patience", 50, "--quiet", "--resume")
    assert r.exit_code == 0, r.output
    hist = json.loads((root / "manifest.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[:2] == first["history"]


def test_training_is_deterministic(tmp_path):
    accs = []
    for name in ("a", "b"):
        r = invoke("train", "cnn", "--run", tmp_path / name, "--limit", 200, "--epochs", 1, "--quiet", "--seed", 3)
        assert r.exit_code == 0, r.output
        accs.append(json.loads((tmp_path / name / "manifest.json").read_text())["training"]["history"])
    assert accs[0] == accs[1]


@pytest.mark.parametrize("args, message", [
    (("run", "--model", "resnet"), "unknown model 'resnet'; registered models: cnn"),
    (("train", "cnn", "--set", "widht=3"), "unknown config key(s) widht"),
    (("train", "cnn", "--set", "channels1"), "expected KEY=VALUE"),
    (("train", "cnn", "--data", "mnist:/no/such/dir"), "MNIST folder /no/such/dir does not exist"),
    (("export", "/no/such/run"), "run folder /no/such/run does not exist"),
    (("verify", "/no/such/run"), "run folder /no/such/run does not exist"),
])
def test_user_errors_are_one_line(args, message):
    r = invoke(*args)
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output


def test_tampered_artifact_fails_verify(copy_of):
    root = copy_of("cnn")
    (root / "model.onnx").write_bytes((root / "model.onnx").read_bytes() + b"\0")
    r = invoke("verify", root)
    assert r.exit_code == 1 and "changed since it was recorded" in r.output


def test_corrupt_onnx_fails_clearly(copy_of):
    """A corrupt file whose manifest entry was also rewritten: ORT's load error becomes a clear message."""
    root = copy_of("gru")
    (root / "model.onnx").write_bytes(b"garbage")
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"]["onnx"]["sha256"] = sha256_file(root / "model.onnx")
    (root / "manifest.json").write_text(json.dumps(m))
    r = invoke("verify", root)
    assert r.exit_code == 1 and "cannot load" in r.output and "corrupt or not an ONNX model" in r.output


def test_cuda_without_cuda_fails_clearly(tiny_run):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA present")
    r = invoke("verify", tiny_run("cnn"), "--device", "cuda")
    assert r.exit_code == 1 and "no CUDA provider" in r.output and "--device cpu" in r.output
