"""Reliability and security: the run folder is a trust boundary, concurrent stages lose nothing, an answer
depends only on its own request, ready means verified, and every failure is one clear line.

Each test is one break that a reliability battery found, reproduced the way a user (or an attacker who
can edit a run folder) would meet it."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxpipe.atomic import sha256_file
from onnxpipe.cli import app
from onnxpipe.core.data import reload_dataset
from onnxpipe.errors import RunFolderError
from onnxpipe.runfolder import Run
from onnxpipe.serving.app import ServeConfig, serve_in_thread
from onnxpipe.serving.model import ServedModel

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    """The CLI's answer to a user error: exit 1, exactly one `error:` line, no traceback."""
    text = result.output
    assert result.exit_code == 1, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def repoint(root: Path, variant: str, target: str, edit) -> None:
    """Point a variant's record at `target` (sha256 and bytes made to match, as a careful attacker would)."""
    full = Path(target) if os.path.isabs(target) else root / target

    def change(m):
        m["artifacts"][variant].update(path=target, sha256=sha256_file(full), bytes=full.stat().st_size)

    edit(root, change)


# --- 1, 2: the run folder is a trust boundary -----------------------------------------------------------

@pytest.mark.parametrize("where", ["../victim.txt", "ABSOLUTE"])
def test_quantize_never_deletes_a_file_outside_the_run_folder(copy_of, edit, tmp_path, where):
    root = copy_of("cnn")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = str(victim) if where == "ABSOLUTE" else where
    shutil.copy(root / "model.onnx", root / "stale.onnx")
    run = Run.open(root)
    run.add_artifact("int8_dynamic", "stale.onnx", stage="quantize", parent="onnx", lossy=True)
    repoint(root, "int8_dynamic", target, edit)
    with pytest.raises(RunFolderError, match="leaves the run folder"):
        Run.open(root).remove_variant("int8_dynamic", stage="quantize")
    assert victim.read_text() == "keep me"
    # the way the battery ran it: a mode that is not kept removes its stale record
    r = invoke("quantize", root, "--mode", "dynamic", "--min-agreement", "1.0", "--max-drop", "0", "--exclusion-rounds", "0")
    assert victim.read_text() == "keep me"
    if r.exit_code != 0:  # the mode was not kept: the stale record pointed outside, one clear error
        assert "leaves the run folder" in one_error_line(r)


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_serve_and_export_triton_never_read_outside_the_run_folder(copy_of, edit, tmp_path, how):
    root = copy_of("cnn")
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(root / "model.onnx", outside)
    if how == "symlink":
        (root / "model.onnx").unlink()
        (root / "model.onnx").symlink_to(outside)
    else:
        rel = os.path.relpath(outside, root) if how == "parent" else str(outside)
        repoint(root, "onnx", rel, edit)
    model = ServedModel.prepare(Run.open(root), "onnx", device="cpu", threads=1)
    model.load()
    assert model.state == "failed" and ("leaves the run folder" in model.error or "outside the run folder" in model.error)
    line = one_error_line(invoke("export-triton", root, tmp_path / "repo", "--variant", "onnx"))
    assert "run folder" in line
    assert not (tmp_path / "repo" / "cnn" / "1" / "model.onnx").exists()


def test_report_never_embeds_a_file_outside_the_run_folder(copy_of, edit, tmp_path):
    root = copy_of("cnn")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG the secret")
    edit(root, lambda m: m.__setitem__("explain", {"method": "x", "samples": 1, "groups": [
        {"title": "planted", "variant": None, "png": os.path.relpath(secret, root)}]}))
    line = one_error_line(invoke("report", root, "--no-divergence"))
    assert "leaves the run folder" in line
    assert not (root / "report.html").exists() or b"the secret" not in (root / "report.html").read_bytes()


# --- 3: concurrent stages lose nothing ------------------------------------------------------------------

def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("pair", [("optimize", "fp16"), ("dynamic", "fp16")])
def test_two_stages_on_one_run_folder_both_land_their_records(copy_of, pair):
    root = copy_of("cnn")
    commands = {"optimize": ("optimize", root), "dynamic": ("quantize", root, "--mode", "dynamic", "--max-drop", "100",
                                                             "--min-agreement", "0"),
                "fp16": ("quantize", root, "--mode", "fp16", "--max-drop", "100", "--min-agreement", "0")}
    procs = [_cli(*commands[name]) for name in pair]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    run = Run.open(root)
    want = {"optimize": "onnx_opt", "dynamic": "int8_dynamic", "fp16": "fp16"}
    for name in pair:
        v = want[name]
        assert run.has(v), (v, run.variants())
        assert sha256_file(run.path(v)) == run.artifact(v).sha256 and run.parity(candidate=v)
    assert run.has("torch") and run.has("onnx") and run.section("reference")


def test_a_killed_writer_leaves_no_temporary_manifest_behind(copy_of):
    root = copy_of("cnn")
    (root / ".manifest.json.k1ll3d.tmp").write_text("{half")
    Run.open(root).set_metrics("onnx", note=1)
    assert not list(root.glob(".manifest.json.*.tmp"))


def test_quantize_records_each_variant_the_moment_it_is_complete(copy_of, monkeypatch):
    """A kill during the second mode leaves the first mode's variant listed, not an unlisted file."""
    from onnxpipe.stages import quantize as q

    root = copy_of("cnn")
    real = q.quantize_mode

    def dies_on_fp16(run, mode, *a, **kw):
        if mode == "fp16":
            raise KeyboardInterrupt  # stands in for the kill
        return real(run, mode, *a, **kw)

    monkeypatch.setattr(q, "quantize_mode", dies_on_fp16)
    run = Run.open(root)
    with pytest.raises(KeyboardInterrupt):
        q.quantize(run, q.QuantizeConfig(mode="static,fp16", max_accuracy_drop=100, min_agreement=0.0),
                   reload_dataset(run.dataset_info))
    on_disk = json.loads((root / "manifest.json").read_text())
    assert "int8_static" in on_disk["artifacts"] and (root / on_disk["artifacts"]["int8_static"]["path"]).is_file()


# --- 4: an answer depends only on its own request --------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic_int8(tiny_run, copy_run_to, tmp_path_factory):
    """A tiny CNN run whose selected variant is dynamic INT8 (one activation scale per call)."""
    from onnxpipe.stages.configs import QuantizeConfig
    from onnxpipe.stages.quantize import quantize

    run = Run.open(copy_run_to(tiny_run("cnn"), tmp_path_factory.mktemp("dyn")))
    quantize(run, QuantizeConfig(mode="dynamic", max_accuracy_drop=100.0, min_agreement=0.0), reload_dataset(run.dataset_info))
    run.set_selected("int8_dynamic")
    return run.root


def test_a_batch_dependent_variant_is_detected_and_never_batched_across_callers(dynamic_int8):
    from onnxpipe.core.parity import rows_are_independent
    from onnxpipe.core.policy import POLICY
    from onnxpipe.core.runtime import make_session

    root = dynamic_int8
    x = np.load(root / "reference.npz")["inputs"][:8]
    fp32, int8 = make_session(root / "model.onnx", device="cpu"), make_session(root / "int8_dynamic.onnx", device="cpu")
    assert rows_are_independent(fp32, [x], POLICY.tensor)[0]
    independent, moved = rows_are_independent(int8, [x], POLICY.tensor)
    assert not independent and moved > 1e-3

    loud = (x * 50).astype(np.float32)
    solo = {i: int8(x[i:i + 1])[0] for i in range(4)}
    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0, max_batch=32, max_delay_ms=50), ) as (url, app_):
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 30
            while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.get("/v2/models/cnn").json()["parameters"]["batched_across_callers"] is False
            assert app_.state.batcher.merge_callers is False

            def ask(rows: np.ndarray) -> np.ndarray:
                body = {"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                                    "data": rows.ravel().tolist()}]}
                with httpx.Client(base_url=url, timeout=30) as c:
                    r = c.post("/v2/models/cnn/infer", json=body)
                assert r.status_code == 200, r.text
                return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(len(rows), -1)

            with ThreadPoolExecutor(16) as pool:  # callers A (ordinary rows) and B (loud rows), interleaved
                futures = [(i, pool.submit(ask, x[i:i + 1])) for i in range(4) for _ in range(3)]
                futures += [(None, pool.submit(ask, loud[j:j + 1])) for j in range(8) for _ in range(3)]
                for i, f in futures:
                    got = f.result()
                    if i is not None:
                        np.testing.assert_array_equal(got[0], solo[i])  # A's answer is A's alone


def test_select_records_which_variants_may_be_batched_across_callers(dynamic_int8, copy_run_to, tmp_path):
    from onnxpipe.stages.configs import SelectConfig
    from onnxpipe.stages.select import select

    run = Run.open(copy_run_to(dynamic_int8, tmp_path))
    select(run, SelectConfig(warmup=1, runs=2, min_seconds=0.0))
    assert run.metrics("onnx")["row_independent"] is True
    assert run.metrics("int8_dynamic")["row_independent"] is False
    sel = run.section("selection")
    assert sel["row_independent"] == run.metrics(sel["selected"])["row_independent"]
    if not sel["row_independent"]:
        assert "runs each caller's request alone" in sel["notes"][0]


# --- 5, 6, 7: ready means verified, by the rule verify used --------------------------------------------

def test_a_selected_student_becomes_ready_by_its_own_budget(copy_of):
    """After distill, the self-test holds a student (and its children) to the student's budget against the
    teacher, as verify did, over 128 reference rows, not to 0.99 agreement over 8."""
    from onnxpipe.stages.configs import DistillConfig, ExportConfig
    from onnxpipe.stages.distill import distill
    from onnxpipe.stages.export import export

    run = Run.open(copy_of("gru"))
    ds = reload_dataset(run.dataset_info)
    distill(run, DistillConfig(epochs=1, scratch_baseline=False, lr=1e-4), ds, progress=False)
    export(run, ExportConfig(batches=(2,)), source="student", target="student_onnx")
    with np.load(run.root / "reference.npz") as z:
        rows = len(z["inputs"])
        assert rows == min(128, len(ds.x_test)) and "labels" in z.files
    model = ServedModel.prepare(run, "student_onnx", device="cpu", threads=1)
    model.load()
    assert model.state == "ready", model.error
    assert model.self_test.rule == "task" and model.self_test.samples == rows and "as recorded along its lineage" in model.self_test.detail


def _graph(nodes, inits, shape=(None, 1, 28, 28)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *shape[1:]])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _plant(root: Path, model, edit) -> None:
    onnx.save(model, root / "model.onnx")
    repoint(root, "onnx", "model.onnx", edit)


def test_a_graph_that_fails_when_run_marks_the_model_failed_not_loading(copy_of, edit):
    root = copy_of("cnn")
    # loads fine, fails at run time: a batch of n rows reshaped to (3, -1) works only if 3 divides n * 784
    bad = _graph([helper.make_node("Reshape", ["image", "shape"], ["r"]),
                  helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=1),
                  helper.make_node("Expand", ["m", "out"], ["logits"])],
                 {"shape": np.array([3, -1], np.int64), "axes": np.array([1], np.int64), "out": np.array([1, 10], np.int64)})
    _plant(root, bad, edit)
    model = ServedModel.prepare(Run.open(root), "onnx", device="cpu", threads=1)
    model.load()
    assert model.state == "failed" and model.error and model.wait_loaded(0)


def test_a_corrupt_reference_with_a_matching_sha_marks_the_model_failed(copy_of, edit):
    root = copy_of("cnn")
    (root / "reference.npz").write_bytes(b"PK\x03\x04 not really a zip")
    edit(root, lambda m: m["reference"].__setitem__("sha256", sha256_file(root / "reference.npz")))
    model = ServedModel.prepare(Run.open(root), "onnx", device="cpu", threads=1)
    model.load()
    assert model.state == "failed" and "reference file" in model.error


def test_infinite_logits_never_reach_a_json_body(copy_of, edit):
    root = copy_of("cnn")
    inf = _graph([helper.make_node("Flatten", ["image"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
                 {"w": np.full((784, 10), np.inf, np.float32)})
    _plant(root, inf, edit)
    model = ServedModel.prepare(Run.open(root), "onnx", device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            assert model.wait_loaded(30)
            r = client.get("/v2/models/cnn")
            assert r.status_code == 200
            meta = r.json()
            assert meta["parameters"]["state"] == "failed" and "NaN or Inf" in meta["parameters"]["error"]
            assert meta["parameters"]["self_test"]["max_abs"] is None


# --- 8: every user error is one line and exit status 1 ---------------------------------------------------

COMMANDS = [("show",), ("verify",), ("report", "--no-divergence"), ("export-triton", "REPO"), ("predict", "INPUT"),
            ("serve", "--port", "0")]


def _args(cmd, root, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    out = []
    for a in cmd[1:]:
        out.append({"REPO": tmp_path / "repo", "INPUT": tmp_path / "x.npy"}.get(a, a))
    return [cmd[0], root, *out]


@pytest.mark.parametrize("damage", ["no sha256", "artifacts is a list", "bytes is a string"])
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_malformed_manifest_is_one_error_line_naming_the_field(copy_of, edit, tmp_path, damage, cmd):
    root = copy_of("cnn")
    edit(root, {"no sha256": lambda m: m["artifacts"]["onnx"].pop("sha256"),
                "artifacts is a list": lambda m: m.__setitem__("artifacts", list(m["artifacts"])),
                "bytes is a string": lambda m: m["artifacts"]["onnx"].__setitem__("bytes", "12")}[damage])
    line = one_error_line(invoke(*_args(cmd, root, tmp_path)))
    assert "malformed" in line and ("sha256" in line or "artifacts" in line or "bytes" in line)


def test_unknown_keys_from_a_newer_onnxpipe_are_kept_and_ignored(copy_of, edit):
    root = copy_of("cnn")
    edit(root, lambda m: (m.__setitem__("from_the_future", {"x": 1}),
                          m["artifacts"]["onnx"].__setitem__("signature", "abc")))
    r = invoke("show", root)
    assert r.exit_code == 0, r.output
    Run.open(root).set_metrics("onnx", touched=True)   # a write keeps what it does not know
    m = json.loads((root / "manifest.json").read_text())
    assert m["from_the_future"] == {"x": 1} and m["artifacts"]["onnx"]["signature"] == "abc"


class Payload:
    """Unpickling this runs code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo PWNED > /tmp/onnxpipe_pwned",))


@pytest.mark.parametrize("cmd", [("export",), ("explain", "--samples", "1", "--steps", "1"), ("verify",),
                                 ("bench", "--batch", "1", "--threads", "1", "--runs", "1", "--warmup", "0", "--no-memory")],
                         ids=lambda c: c[0])
def test_a_malicious_pickle_is_refused_in_one_line_that_does_not_advise_unsafe_loading(copy_of, edit, cmd):
    root = copy_of("cnn")
    (root / "model.pt").write_bytes(pickle.dumps({"model": "cnn", "config": {}, "state_dict": Payload()}))
    repoint(root, "torch", "model.pt", edit)
    Path("/tmp/onnxpipe_pwned").unlink(missing_ok=True)
    line = one_error_line(invoke(cmd[0], root, *cmd[1:]))
    assert "refused" in line or "cannot load" in line
    assert "weights_only=False" not in line and not Path("/tmp/onnxpipe_pwned").exists()


def test_a_truncated_checkpoint_is_one_error_line(tmp_path):
    root = tmp_path / "run"
    assert invoke("train", "cnn", "--run", root, "--limit", 100, "--epochs", 1, "--quiet").exit_code == 0
    ck = root / "checkpoints" / "last.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    line = one_error_line(invoke("train", "cnn", "--run", root, "--epochs", 2, "--resume", "--quiet"))
    assert "checkpoint" in line and "weights_only=False" not in line


def test_an_external_data_offset_that_is_not_a_number_is_one_error_line(tmp_path):
    w = np.ones((4, 2), np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "offset":
            e.value = "abc"
    if not any(e.key == "offset" for e in m.graph.initializer[0].external_data):
        m.graph.initializer[0].external_data.add(key="offset", value="abc")
    onnx.save_model(m, str(tmp_path / "m.onnx"))
    assert "offset" in one_error_line(invoke("import", tmp_path / "m.onnx", "--run", tmp_path / "run"))


@pytest.mark.parametrize("args, words", [
    (("train", "cnn", "--lr", "nan"), "finite"),
    (("train", "lstm", "--data", "npz:EMPTY"), "holds no samples"),
    (("train", "lstm", "--data", "npz:FIVE"), "at least 15 samples of each class"),
    (("serve", "RUN", "--max-body-mb", "nan"), "finite"),
    (("serve", "RUN", "--max-body-mb", "inf"), "finite"),
])
def test_settings_and_data_that_cannot_work_are_refused_in_one_line(tiny_run, tmp_path, args, words):
    for name, n in (("EMPTY", 0), ("FIVE", 5)):
        np.savez(tmp_path / f"{name}.npz", x=np.zeros((n, 8, 8), np.float32), y=np.arange(n) % 10)
    subst = {"npz:EMPTY": f"npz:{tmp_path / 'EMPTY.npz'}", "npz:FIVE": f"npz:{tmp_path / 'FIVE.npz'}",
             "RUN": tiny_run("cnn")}
    full = [subst.get(a, a) for a in args]
    if full[0] == "train":
        full += ["--run", tmp_path / "run", "--quiet"]
    assert words in one_error_line(invoke(*full))


# --- 9: status codes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_run):
    model = ServedModel.prepare(Run.open(tiny_run("cnn")), device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0)) as (url, app_):
        assert model.wait_loaded(30) and model.ready
        yield url


@pytest.mark.parametrize("binary", [False, True])
def test_an_impossible_shape_is_a_400_not_a_500(served, binary):
    shape = [0, 10**20, 28, 28]
    with httpx.Client(base_url=served, timeout=30) as client:
        if binary:
            head = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                                           "parameters": {"binary_data_size": 0}}]}).encode()
            r = client.post("/v2/models/cnn/infer", content=head,
                            headers={"Inference-Header-Content-Length": str(len(head))})
        else:
            r = client.post("/v2/models/cnn/infer", json={"inputs": [{"name": "image", "shape": shape,
                                                                        "datatype": "FP32", "data": []}]})
        assert r.status_code == 400 and "impossible" in r.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200


def test_a_client_that_disconnects_mid_body_is_logged_as_such_not_as_a_500(served, caplog):
    import logging

    host, port = served.removeprefix("http://").split(":")
    with caplog.at_level(logging.INFO, logger="onnxpipe.serve"):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"inputs\": [")
            time.sleep(0.2)
        time.sleep(0.5)
        with httpx.Client(base_url=served, timeout=30) as client:
            assert client.get("/v2/health/live").status_code == 200
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "client disconnected" in text and "internal error" not in text and "Traceback" not in text


def test_bench_on_a_missing_cuda_says_so_before_measuring_anything(tiny_run):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the error cannot happen")
    r = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "bench", str(tiny_run("cnn")), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[0].startswith("error:"), r.stderr
    assert "machine limits" not in r.stderr and "timing" not in r.stderr
