"""`onnxpipe predict`: images become exactly what the model was trained on; arrays classify like ORT."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from onnxpipe.cli import app
from onnxpipe.core.data import family_inputs, to_image
from onnxpipe.errors import DataError
from onnxpipe.stages.predict import load_inputs, predict_files
from onnxpipe.runfolder import Run

def specs(run: Run):
    return run.spec.input_specs(run.model_config())


@pytest.fixture(scope="module")
def digit():
    """A real digits image (8x8, values 0..16), its label, and the model input training made of it."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[5].astype(np.float32), int(d.target[5])


def training_input(run: Run, raw8x8: np.ndarray) -> np.ndarray:
    norm = run.manifest["dataset"]["normalization"]
    x = to_image(raw8x8[None], family_inputs("image", 28)[0], "digits") * norm["scale"]
    return ((x - norm["mean"]) / norm["std"]).astype(np.float32)


def test_png_becomes_the_training_input(tiny_run, digit, tmp_path):
    run = Run.open(tiny_run("cnn"))
    raw, _ = digit
    want = training_input(run, raw)
    pixels = np.round(raw * 255 / 16).astype(np.uint8)             # white digit on black, like the data
    Image.fromarray(pixels).save(tmp_path / "small.png")
    paper = Image.fromarray(255 - pixels).resize((64, 64), Image.Resampling.NEAREST)  # dark ink on paper, larger
    paper.convert("RGB").save(tmp_path / "paper.jpg", quality=100)
    paper.save(tmp_path / "paper.png")
    tol = 1.5 / 255 / run.manifest["dataset"]["normalization"]["std"]  # uint8 rounding, in normalized units
    for name, atol in (("small.png", tol), ("paper.png", tol), ("paper.jpg", 10 * tol)):
        got = load_inputs(run, tmp_path / name, specs(run)).first
        assert got.shape == (1, 1, 28, 28) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=atol, err_msg=name)


def test_arrays_classify_like_onnxruntime(tiny_run, tmp_path):
    root = tiny_run("cnn")
    run = Run.open(root)
    ref = np.load(root / "reference.npz")
    x, logits = ref["inputs"], ref["outputs"]
    np.save(tmp_path / "batch.npy", x)
    np.save(tmp_path / "one.npy", x[2])                     # a single sample, no batch axis
    preds = predict_files(run, [tmp_path / "batch.npy", tmp_path / "one.npy", root / "reference.npz"], top=3)
    assert [p.label for p in preds] == [*logits.argmax(1), logits[2].argmax(), *logits.argmax(1)]
    e = np.exp(logits[0] - logits[0].max())
    assert preds[0].probability == pytest.approx(e.max() / e.sum(), rel=1e-4)
    assert len(preds[0].top) == 3 and preds[0].top[0][1] >= preds[0].top[1][1] >= preds[0].top[2][1]
    # --raw: the same samples in source units (digits 0..16) are normalized first
    norm = run.manifest["dataset"]["normalization"]
    np.save(tmp_path / "raw.npy", (x * norm["std"] + norm["mean"]) / norm["scale"])
    assert [p.label for p in predict_files(run, [tmp_path / "raw.npy"], raw=True)] == list(logits.argmax(1))


def test_cli_prints_class_and_probability(tiny_run, digit, tmp_path):
    raw, _ = digit
    Image.fromarray(np.round(raw * 255 / 16).astype(np.uint8)).save(tmp_path / "d.png")
    result = CliRunner().invoke(app, ["predict", str(tiny_run("cnn")), str(tmp_path / "d.png"), "--top", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path / 'd.png'}: class ") and "(p=0." in result.output
    result = CliRunner().invoke(app, ["predict", str(tiny_run("cnn")), str(tmp_path / "d.png"), "--json"])
    row = json.loads(result.output)
    assert 0 <= row["class"] < 10 and 0 < row["probability"] <= 1


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,make,words", [
    ("wrong shape", lambda p: np.save(p / "bad.npy", np.zeros((3, 8, 8), np.float32)) or p / "bad.npy", "does not fit the model"),
    ("not an image", lambda p: _written(p / "x.png", b"not a png"), "cannot read image"),
    ("unknown type", lambda p: _written(p / "x.txt", b"1 2 3"), "unknown input type"),
    ("missing file", lambda p: p / "nothing.npy", "does not exist"),
    ("NaN", lambda p: np.save(p / "nan.npy", np.full((1, 28, 28), np.nan, np.float32)) or p / "nan.npy", "NaN"),
    ("strings", lambda p: np.save(p / "s.npy", np.array(["a"])) or p / "s.npy", "numeric"),
])
def test_bad_inputs_are_clear_errors(tiny_run, tmp_path, case, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError, match=words):
        load_inputs(Run.open(tiny_run("cnn")), path, specs(Run.open(tiny_run("cnn"))))
    result = CliRunner().invoke(app, ["predict", str(tiny_run("cnn")), str(path)])
    assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output


def test_predict_and_training_normalize_identically(tmp_path):
    """Same bytes in, same tensor out: raw rows of an npz source, normalized by `predict --raw`, equal the
    training split's rows bit for bit (one normalization function for both)."""
    from onnxpipe.core.data import load_dataset, stratified_split
    from onnxpipe.orchestrate import prepare_run

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(10), 20)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    run, ds = prepare_run("lstm", tmp_path / "run", data=f"npz:{tmp_path / 'data.npz'}")
    train_idx = stratified_split(y, (0.7, 0.1), seed=0)[0]
    np.save(tmp_path / "raw.npy", x[train_idx])
    got = load_inputs(run, tmp_path / "raw.npy", specs(run), raw=True).first
    assert got.dtype == ds.x_train.first.dtype and got.tobytes() == ds.x_train.first.tobytes()
    again = load_dataset(f"npz:{tmp_path / 'data.npz'}", "sequence")
    assert again.x_train.first.tobytes() == ds.x_train.first.tobytes()
