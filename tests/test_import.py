"""`onnxpipe import`: a model exported elsewhere becomes a run whose root variant is `onnx`, and
external data that points outside the model's folder is refused before it is read."""
from __future__ import annotations

import importlib.util
import json
import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxpipe.stages import importer
from onnxpipe.cli import app
from onnxpipe.errors import ArtifactError, ConfigError
from onnxpipe.stages.importer import import_onnx
from onnxpipe.orchestrate import STAGES, Context, run_stages
from onnxpipe.runfolder import Run
from onnxpipe.core.runtime import make_session

LIMIT = 400  # the tiny_run fixture's subset: the same split, so the same test images


def matmul_model(weight: np.ndarray, batch=None) -> onnx.ModelProto:
    """y = x @ W: one input (batch, 4), one initializer, built with onnx.helper."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "batch", weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch or "batch", weight.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm", [x], [y],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def with_external_data(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """Point every initializer at `location` (offset 0), as a crafted file would."""
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.add(key="location", value=location)
    return model


@pytest.fixture(scope="module")
def imported(tiny_run, tmp_path_factory):
    """The tiny CNN's ONNX export, re-saved with its weights in a separate file, imported with data."""
    src = tmp_path_factory.mktemp("exported")
    model = onnx.load(str(tiny_run("cnn") / "model.onnx"))
    onnx.save_model(model, str(src / "cnn.onnx"), save_as_external_data=True, location="cnn.weights",
                    size_threshold=0)
    root = tmp_path_factory.mktemp("imported") / "cnn"
    return import_onnx(src / "cnn.onnx", root, data="digits", limit=LIMIT), tiny_run("cnn")


def test_import_makes_onnx_the_root(imported):
    run, original = imported
    art = run.artifact("onnx")
    assert run.variants() == ["onnx"] and art.parent is None and art.stage == "import"
    assert run.manifest["selected"] == "onnx" and run.lineage("onnx") == ["onnx"]
    source = run.manifest["model_source"]
    assert source["kind"] == "onnx" and source["external_data_files"][0].endswith("cnn.weights")
    assert source["inputs"] == [{"name": "image", "shape": [1, 28, 28], "dynamic": {"0": "batch"}, "dtype": "float32",
                                 "role": "data", "layout": "nchw"}]
    # the weights were folded in: one file, one sha256 in the manifest
    assert sorted(p.name for p in run.root.iterdir()) == ["manifest.json", "model.onnx", "reference.npz"]
    # the same model on the same test split: the same accuracy as where it came from
    orig = Run.open(original)
    assert run.manifest["dataset"]["split"] == orig.manifest["dataset"]["split"]
    assert run.metrics("onnx")["accuracy"] == pytest.approx(orig.metrics("onnx").get("accuracy", orig.metrics("torch")["accuracy"]), abs=1e-9)
    x = np.load(run.root / "reference.npz")["inputs"]
    np.testing.assert_allclose(make_session(run.path("onnx"), device="cpu")(x),
                               make_session(original / "model.onnx", device="cpu")(x), atol=1e-6)


def test_downstream_stages_use_the_imported_root(imported, tmp_path):
    """Compression (where present) and verify run on the import; verify compares against `onnx`."""
    import shutil

    src, _ = imported
    root = tmp_path / "cnn"
    shutil.copytree(src.root, root)
    run = Run.open(root)
    names = [n for n, _ in STAGES]
    wanted = [s for s in ("optimize", "quantize", "verify") if s in names]
    run_stages(run, Context(progress=False), wanted)
    run = Run.open(root)
    assert run.manifest["parity"] and all(p["passed"] for p in run.manifest["parity"]), run.manifest["parity"]
    assert {p["reference"] for p in run.manifest["parity"]} <= set(run.variants())
    for v in run.variants():
        assert run.lineage(v)[-1] == "onnx"
    with pytest.raises(ConfigError, match="imported as ONNX: it has no PyTorch definition"):
        run.spec.build(run.model_config())


@pytest.mark.skipif(importlib.util.find_spec("onnxpipe.serving") is None, reason="no pipeline.serving here")
def test_serve_the_imported_model(imported):
    import httpx

    from onnxpipe.serving.app import ServeConfig, serve_in_thread
    from onnxpipe.serving.model import ServedModel

    run, _ = imported
    x = np.load(run.root / "reference.npz")["inputs"][:3]
    model = ServedModel.prepare(run, device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(1500):
            if client.get("/v2/health/ready").status_code == 200:
                break
            time.sleep(0.02)
        body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        resp = client.post(f"/v2/models/{run.model_name}/infer", json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()["outputs"][0]
        got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, make_session(run.path("onnx"), device="cpu")(x), atol=1e-5)


@pytest.mark.parametrize("location", ["../secret.bin", "/tmp/secret.bin", "sub/../../secret.bin",
                                      "..\\secret.bin", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((4, 2), np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)  # a link inside the folder that leads out of it
    onnx.save_model(with_external_data(matmul_model(np.ones((4, 2), np.float32)), location), str(folder / "m.onnx"))
    with pytest.raises(ArtifactError, match="outside the model's folder"):
        import_onnx(folder / "m.onnx", tmp_path / "run")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.importing"))


def test_handmade_graph_without_data(tmp_path):
    """An onnx.helper graph with its weights in a sibling file: imported, verified, no data needed."""
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(matmul_model(w), str(folder / "mm.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    run = import_onnx(folder / "mm.onnx", tmp_path / "run")
    assert run.manifest["dataset"] is None and run.metrics("onnx") == {}
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(make_session(run.path("onnx"), device="cpu")(x), x @ w, rtol=1e-6)
    # Without data, verify still runs the lossless checks, on generated inputs over the shape grid.
    r = CliRunner().invoke(app, ["optimize", str(run.root)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["verify", str(run.root)])
    assert r.exit_code == 0, r.output
    (entry,) = Run.open(run.root).parity(reference="onnx", candidate="onnx_opt")
    assert entry["rule"] == "tensor" and entry["passed"] and entry["max_abs"] < 1e-4 and len(entry["shapes"]) == 3
    # Checks that need labelled data say so.
    r = CliRunner().invoke(app, ["quantize", str(run.root)])
    assert r.exit_code == 1 and "imported without --data" in r.output


def test_big_models_keep_one_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(importer, "INLINE_LIMIT", 0)  # pretend the weights are over protobuf's 2 GiB
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    onnx.save_model(matmul_model(w), str(tmp_path / "mm.onnx"))
    run = import_onnx(tmp_path / "mm.onnx", tmp_path / "run")
    ext = run.artifact("onnx").extra["external_data"]
    assert ext["path"] == "model.onnx.data" and (run.root / ext["path"]).stat().st_size == w.nbytes
    x = np.ones((3, 4), np.float32)
    np.testing.assert_allclose(make_session(run.path("onnx"), device="cpu")(x), x @ w)


def test_bad_inputs_are_clear_errors(tmp_path):
    runner = CliRunner()
    (tmp_path / "junk.onnx").write_bytes(b"this is not protobuf \x00\xff" * 10)
    r = runner.invoke(app, ["import", str(tmp_path / "junk.onnx"), "--run", str(tmp_path / "a")])
    assert r.exit_code == 1 and "is not an ONNX model" in r.output and "Traceback" not in r.output
    onnx.save_model(matmul_model(np.ones((4, 2), np.float32), batch=1), str(tmp_path / "fixed.onnx"))
    r = runner.invoke(app, ["import", str(tmp_path / "fixed.onnx"), "--run", str(tmp_path / "b")])
    assert r.exit_code == 1 and "fixed batch size of 1" in r.output
    onnx.save_model(matmul_model(np.ones((4, 2), np.float32)), str(tmp_path / "mm.onnx"))
    r = runner.invoke(app, ["import", str(tmp_path / "mm.onnx"), "--run", str(tmp_path / "c"), "--data", "digits"])
    assert r.exit_code == 1 and "--data gives one image or sequence input" in r.output
    assert not os.path.exists(tmp_path / "c")
    r = runner.invoke(app, ["import", str(tmp_path / "mm.onnx"), "--run", str(tmp_path / "c"), "--stages", "quantize,explain"])
    assert r.exit_code == 1 and "explain need the PyTorch model" in r.output and not os.path.exists(tmp_path / "c")
    # a good one, for contrast, leaves a run folder whose manifest parses
    r = runner.invoke(app, ["import", str(tmp_path / "mm.onnx"), "--run", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["artifacts"]["onnx"]["stage"] == "import"
