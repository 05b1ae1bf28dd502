"""Models and data as users bring them, through every stage: Hugging Face BERT / GPT-2 / DistilBERT with
token ids and an attention mask, a ViT and a torchvision-style ResNet on 3-channel images, an RGB CNN on
channels-last npz data, a model with two float inputs; plus the built-in Transformer on token ids, the
relative-run-folder quantize, crash isolation and students of a user's factory.

The factories are in tests/users_models.py (built from tiny configs: nothing is downloaded)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxpipe.cli import app
from onnxpipe.core.runtime import make_session
from onnxpipe.errors import ConfigError, DataError
from onnxpipe.orchestrate import Context, run_model
from onnxpipe.runfolder import Run

pytest.importorskip("transformers")   # a dev dependency (pip install -e ".[dev]"); keeps the installed torch

FACTORIES = Path(__file__).parent / "users_models.py"
LOOSE = {"max_accuracy_drop": 100.0, "min_agreement": 0.0, "exclusion_rounds": 0}  # exercise the path, keep all
FAST = {"train": {"epochs": 2, "lr": 3e-3, "patience": 5},
        "export": {"batches": [1, 7]}, "optimize": {"batches": [1, 7]}, "verify": {"batches": [1, 7]},
        "quantize": {**LOOSE, "calib_samples": 32},
        "distill": {"epochs": 1, "scratch_baseline": False, "max_accuracy_drop": 100.0},
        "select": {"warmup": 0, "runs": 2, "min_seconds": 0.0},
        "bench": {"batches": [2], "threads": [1], "warmup": 0, "runs": 2, "block": 2, "memory": False},
        "explain": {"samples": 2, "steps": 2}}


def ref(name: str) -> str:
    return f"{FACTORIES}:{name}"


def run_factory(name: str, root: Path, stages: list[str], data: str = "digits", limit: int = 240, **sections) -> Run:
    ctx = Context(data=data, limit=limit, progress=False, sections={**FAST, **sections})
    return run_model(ref(name), root, ctx, stages=stages)


def tensor_checks_pass(run: Run) -> list[dict]:
    entries = [p for p in run.parity() if p["rule"] == "tensor"]
    assert entries and all(p["passed"] for p in entries), [p for p in entries if not p["passed"]]
    return entries


# --- Hugging Face BERT through every stage, served with two int64 inputs -------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return run_factory("bert", tmp_path_factory.mktemp("bert") / "bert", stages=None)


def test_bert_goes_through_every_stage_with_ids_and_mask(bert):
    run = bert
    inputs = {r["name"]: r for r in run.dataset_info["inputs"]}
    assert inputs["input_ids"]["role"] == "tokens" and inputs["attention_mask"]["role"] == "mask"
    with np.load(run.root / "reference.npz") as z:
        mask = z["input:attention_mask"]
        assert z["inputs"].dtype == np.int64 and mask.shape == z["inputs"].shape
    assert 0 < mask.mean() < 1  # some rows are shortened and padded: the mask is exercised
    # export at opset 23 (the model has attention), parity over every length of the grid
    assert run.artifact("onnx").opset == 23
    export = run.parity(reference="torch", candidate="onnx")[0]
    assert export["passed"] and export["max_abs"] < 1e-4 and {s[1] for s in export["shapes"]} == {1, 64, 128}
    # attention fused on the optimized graph
    opt = run.artifact("onnx_opt").extra
    assert opt["attention_nodes"] == 2 and opt["attention_layout_folds"] == 2
    tensor_checks_pass(run)
    # INT8 and FP16 with integer inputs never quantized
    for v in ("int8_dynamic", "int8_static", "fp16"):
        assert run.has(v), run.section("quantize")
        g = onnx.load(str(run.path(v)), load_external_data=False).graph
        assert {i.name: i.type.tensor_type.elem_type for i in g.input if i.name in inputs} == {
            "input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.INT64}
    assert run.artifact("int8_static").extra["int8_nodes"] > 0
    # a smaller student of the factory (its widths scaled by 0.5), through the same chain
    d = run.section("distillation")
    assert d["student_params"] < d["teacher_params"] / 2 and run.model_config_of("student").hidden_size == 16
    assert run.has("student_onnx") and run.has("student_int8_dynamic")
    # select, bench (FLOPs counted with integer inputs), explain (per token), report
    assert run.selected and run.metrics(run.selected).get("latency_ms")
    flops = run.metrics("onnx")["bench"]["flops"]
    assert flops["total"] > 0 and any("Attention" in op for op in flops["by_op"])
    assert "per-token integrated gradients through the embedding" in run.section("explain")["method"]
    assert (run.root / "report.html").is_file()


def test_bert_is_served_with_several_inputs_in_json_and_binary(bert):
    from onnxpipe.serving.app import ServeConfig, serve_in_thread
    from onnxpipe.serving.model import ServedModel

    run = bert
    with np.load(run.root / "reference.npz") as z:
        ids, mask = z["inputs"][:3], z["input:attention_mask"][:3]
    want = make_session(run.path("onnx"), device="cpu")(ids, mask)
    model = ServedModel.prepare(run, "onnx", device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0)) as (url, _):
        assert model.wait_loaded(60) and model.ready, model.error
        with httpx.Client(base_url=url, timeout=30) as client:
            meta = client.get(f"/v2/models/{run.model_name}").json()
            assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
                ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
            body = {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
                               {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64",
                                "data": mask.ravel().tolist()}]}
            r = client.post(f"/v2/models/{run.model_name}/infer", json=body)
            got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, -1)
            np.testing.assert_allclose(got, want, atol=1e-5)
            blobs = [ids.astype("<i8").tobytes(), mask.astype("<i8").tobytes()]
            head = json.dumps({"inputs": [
                {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "parameters": {"binary_data_size": len(blobs[0])}},
                {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64", "parameters": {"binary_data_size": len(blobs[1])}}],
                "parameters": {"binary_data_output": True}}).encode()
            r = client.post(f"/v2/models/{run.model_name}/infer", content=head + b"".join(blobs),
                            headers={"Inference-Header-Content-Length": str(len(head))})
            n = int(r.headers["inference-header-content-length"])
            got = np.frombuffer(r.content[n:], "<f4").reshape(3, -1)
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_bert_predict_and_triton_take_every_input(bert, tmp_path):
    run = bert
    with np.load(run.root / "reference.npz") as z:
        np.savez(tmp_path / "batch.npz", input_ids=z["inputs"][:4], attention_mask=z["input:attention_mask"][:4])
    r = CliRunner().invoke(app, ["predict", str(run.root), str(tmp_path / "batch.npz"), "--variant", "onnx", "--json"])
    assert r.exit_code == 0, r.output
    preds = [json.loads(line) for line in r.output.strip().splitlines()]
    want = make_session(run.path("onnx"), device="cpu")(*np.load(tmp_path / "batch.npz").values()).argmax(1)
    assert [p["class"] for p in preds] == want.tolist()
    r = CliRunner().invoke(app, ["export-triton", str(run.root), str(tmp_path / "repo"), "--variant", "onnx"])
    assert r.exit_code == 0, r.output
    text = next((tmp_path / "repo").glob("*/config.pbtxt")).read_text()
    assert text.count("TYPE_INT64") == 2 and 'name: "attention_mask"' in text


def test_an_imported_bert_takes_npz_data_by_input_name_and_is_quantized(bert, tmp_path):
    """`onnxpipe import --data npz:` maps the file's arrays to the graph's inputs (ids and mask), so an
    imported transformer is quantized and verified; `import --stages` takes --config like `run`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    ids = d.images.reshape(len(d.images), -1).astype(np.int64)
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids), y=d.target)
    (tmp_path / "exp.toml").write_text('[quantize]\nmodes = ["dynamic"]\nmax_accuracy_drop = 100.0\n'
                                       'min_agreement = 0.0\nexclusion_rounds = 0\n[verify]\nbatches = [1, 7]\n')
    r = CliRunner().invoke(app, ["import", str(bert.path("onnx")), "--run", str(tmp_path / "imported"), "--data",
                                 f"npz:{tmp_path / 'tokens.npz'}", "--limit", "200", "--config", str(tmp_path / "exp.toml"),
                                 "--stages", "optimize,quantize,verify", "--quiet"])
    assert r.exit_code == 0, r.output
    run = Run.open(tmp_path / "imported")
    roles = {i["name"]: i["role"] for i in run.section("model_source")["inputs"]}
    assert roles == {"input_ids": "tokens", "attention_mask": "mask"}
    assert run.metrics("onnx")["accuracy"] is not None and run.has("int8_dynamic") and not run.has("fp16")
    tensor_checks_pass(run)
    assert any(p["candidate"] == "int8_dynamic" and p["rule"] == "task" for p in run.parity())


# --- more transformers, vision models, user data -----------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "distilbert"])
def test_other_hugging_face_transformers_export_with_fused_attention(name, tmp_path):
    run = run_factory(name, tmp_path / name, ["train", "export", "optimize", "quantize", "verify"], limit=160,
                      train={"epochs": 1}, quantize={**LOOSE, "mode": "dynamic"})
    assert run.artifact("onnx_opt").extra["attention_nodes"] == 2 and run.artifact("onnx_opt").extra["attention_layout_folds"] == 2
    tensor_checks_pass(run)
    assert run.has("int8_dynamic") and run.artifact("int8_dynamic").extra["int8_nodes"] > 0


def test_vit_on_three_channel_images(tmp_path):
    run = run_factory("vit", tmp_path / "vit", ["train", "export", "optimize", "quantize", "verify"], limit=160,
                      train={"epochs": 1}, quantize={**LOOSE, "mode": "fp16,dynamic"})
    assert run.dataset_info["inputs"][0]["sample_shape"] == [3, 16, 16]   # digits, gray repeated to RGB
    with np.load(run.root / "reference.npz") as z:
        x = z["inputs"]
        np.testing.assert_array_equal(x[:, 0], x[:, 2])
    assert run.artifact("onnx_opt").extra["attention_nodes"] == 2
    tensor_checks_pass(run)
    assert run.has("fp16") and run.has("int8_dynamic")


def test_resnet_with_batchnorm(tmp_path):
    run = run_factory("resnet", tmp_path / "resnet", ["train", "export", "optimize", "quantize", "verify", "select"],
                      limit=300, train={"epochs": 5, "lr": 1e-2}, quantize={**LOOSE, "mode": "static"})
    tensor_checks_pass(run)
    ops = run.artifact("onnx_opt").extra["ops_after"]
    assert "BatchNormalization" not in ops  # folded into the convolutions
    assert run.has("int8_static") and run.metrics("torch")["accuracy"] > 0.2


def test_rgb_cnn_on_channels_last_npz(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.kron(d.images, np.ones((2, 2)))                                   # (N, 16, 16), 0..16
    rgb = np.stack([gray, gray * 0.5, 16 - gray], axis=-1)                       # (N, 16, 16, 3) channels last
    np.savez(tmp_path / "rgb.npz", x=np.round(rgb * 255 / 16).astype(np.uint8), y=d.target)
    run = run_factory("rgb_cnn", tmp_path / "rgb", ["train", "export", "quantize", "verify"],
                      data=f"npz:{tmp_path / 'rgb.npz'}", limit=400, train={"epochs": 4, "lr": 1e-2},
                      quantize={**LOOSE, "mode": "static"})
    assert run.dataset_info["inputs"][0]["sample_shape"] == [3, 16, 16]          # arranged channels first
    with np.load(run.root / "reference.npz") as z:
        assert not np.allclose(z["inputs"][:, 0], z["inputs"][:, 2])             # the channels are distinct
    assert run.metrics("torch")["accuracy"] > 0.3
    tensor_checks_pass(run)
    np.save(tmp_path / "one.npy", (rgb[:1].transpose(0, 3, 1, 2) * 255 / 16).astype(np.float32) / 255)
    r = CliRunner().invoke(app, ["predict", str(run.root), str(tmp_path / "one.npy"), "--variant", "onnx"])
    assert r.exit_code == 0 and "class" in r.output


def test_a_model_with_two_float_inputs(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "two.npz", rows=d.images, aux=d.images.mean(1), y=d.target)
    run = run_factory("two_inputs", tmp_path / "two", ["train", "export", "optimize", "quantize", "verify", "select",
                                                       "bench", "explain"],
                      data=f"npz:{tmp_path / 'two.npz'}", limit=300, train={"epochs": 3, "lr": 1e-2})
    g = onnx.load(str(run.path("onnx")), load_external_data=False).graph
    assert [i.name for i in g.input] == ["rows", "aux"]
    norms = {r["name"]: r["normalization"] for r in run.dataset_info["inputs"]}
    assert set(norms) == {"rows", "aux"} and norms["rows"]["scale"] == 1.0
    assert run.metrics("torch")["accuracy"] > 0.3
    tensor_checks_pass(run)
    assert any(run.has(v) for v in ("int8_dynamic", "int8_static"))
    assert run.metrics("onnx")["bench"]["latency"]["1"]["2"]["p50_ms"] > 0
    assert run.section("explain")["groups"]


def test_missing_or_misshapen_arrays_are_one_clear_error(tmp_path):
    from onnxpipe.orchestrate import prepare_run

    np.savez(tmp_path / "one.npz", rows=np.zeros((60, 8, 8), np.float32), y=np.arange(60) % 10)
    with pytest.raises(DataError, match=r"no data for input 'aux' .* one array per input name \(rows, aux\)"):
        prepare_run(ref("two_inputs"), tmp_path / "a", data=f"npz:{tmp_path / 'one.npz'}")
    np.savez(tmp_path / "bad.npz", rows=np.zeros((60, 8, 8), np.float32), aux=np.zeros((60, 5), np.float32),
             y=np.arange(60) % 10)
    with pytest.raises(DataError, match=r"takes 'aux' samples shaped \(8,\), the data has shape \(5,\)"):
        prepare_run(ref("two_inputs"), tmp_path / "b", data=f"npz:{tmp_path / 'bad.npz'}")


# --- the built-in Transformer on token ids ----------------------------------------------------------

def test_builtin_transformer_on_digit_tokens(tmp_path):
    r = CliRunner().invoke(app, ["run", "--model", "transformer", "--set", "vocab_size=16", "--out", tmp_path,
                                 "--limit", "160", "--epochs", "1", "--stages", "train", "--quiet"])
    assert r.exit_code == 1 and "--set vocab_size=17" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["run", "--model", "transformer", "--set", "vocab_size=17", "--set", "d_model=32",
                                 "--out", tmp_path, "--limit", "240", "--epochs", "2", "--stages", "train,export,verify",
                                 "--quiet", "--force"])
    assert r.exit_code == 0, r.output
    run = Run.open(tmp_path / "transformer")
    assert run.model_config().seq_len == 64 and [s.name for s in run.spec.input_specs(run.model_config())] == ["sequence", "mask"]
    tensor_checks_pass(run)


# --- quantize from a relative run folder; a native crash refuses one variant ----------------------------

def test_quantize_from_a_relative_run_folder_preprocesses_the_lstm(tmp_path):
    env = {**os.environ}
    cmd = [sys.executable, "-m", "onnxpipe.cli", "run", "--model", "lstm", "--limit", "240", "--epochs", "2",
           "--stages", "train,export,quantize", "--quiet"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads((tmp_path / "exports" / "lstm" / "manifest.json").read_text())   # the default, relative folder
    art = m["artifacts"]["int8_dynamic"]
    assert art["extra"]["preprocess"] == "full"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "exports" / "lstm" / art["path"])).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops


def test_a_native_crash_refuses_the_variant_and_the_run_goes_on(copy_of, monkeypatch):
    from onnxpipe.core import isolation
    from onnxpipe.core.data import reload_dataset
    from onnxpipe.stages import quantize as q

    crashing = [sys.executable, "-c", "import os, signal, sys\n"
                "for line in sys.stdin:\n"
                "    if 'fp16' in line: os.kill(os.getpid(), signal.SIGSEGV)\n"
                "    print('{\"ok\": true}', flush=True)"]
    monkeypatch.setattr(q, "NativeProbe", lambda: isolation.NativeProbe(command=crashing))
    run = Run.open(copy_of("cnn"))
    results = q.quantize(run, q.QuantizeConfig(mode="fp16,dynamic", **LOOSE), reload_dataset(run.dataset_info))
    by_mode = {r.mode: r for r in results}
    assert by_mode["fp16"].artifact is None and by_mode["fp16"].crash["how"] == "SIGSEGV"
    assert "refused" in run.section("quantize")["fp16"]["reason"] and not run.has("fp16")
    assert not list(run.root.glob("fp16*.onnx"))
    assert by_mode["dynamic"].artifact is not None and run.has("int8_dynamic")  # the next mode still ran


# --- a real student for any model ----------------------------------------------------------------------

def test_students_of_a_factory_are_smaller_or_refused(tmp_path):
    from onnxpipe.stages.configs import DistillConfig
    from onnxpipe.stages.distill import student_spec_and_config

    run = run_factory("resnet", tmp_path / "r", ["train"], limit=120, train={"epochs": 1})
    _, scaled = student_spec_and_config(run, DistillConfig())
    assert scaled.width == 4                       # the width keyword, scaled by the default 0.5
    _, explicit = student_spec_and_config(run, DistillConfig(student_set=(("width", "2"),)))
    assert explicit.width == 2
    with pytest.raises(ConfigError, match="as many as its teacher .* --student-scale"):
        student_spec_and_config(run, DistillConfig(student_set=(("width", "8"),)))
