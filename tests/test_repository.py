"""A model repository: several models and versions at once, each answering its own numbers; the repository
extension (index, load, unload); a reload of a changed run folder while requests are in flight (none fails, the old
session answers until the new one passed its self-test); `--poll-s`; `--repository DIR` from another directory."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnxpipe.atomic import sha256_file
from onnxpipe.core.runtime import make_session
from onnxpipe.runfolder import Run
from onnxpipe.serving.app import ServeConfig, serve_in_thread
from onnxpipe.serving.model import ServedModel
from onnxpipe.serving.repository import Sources


def shifted(src: Path, dst: Path, shift: float) -> Path:
    """A copy of a run whose ONNX model answers different numbers: `shift * k` added to logit k (a recorded,
    self-consistent run folder: new sha256s, reference outputs made by the changed model)."""
    import onnx
    from onnx import numpy_helper

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    bias = [i for i in model.graph.initializer if list(i.dims) == [10]][-1]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + shift * np.arange(10, dtype=np.float32), bias.name))
    onnx.save(model, str(dst / "model.onnx"))
    with np.load(dst / "reference.npz") as z:
        ref = dict(z)
    ref["outputs"] = make_session(dst / "model.onnx", device="cpu")(ref["inputs"])
    np.savez(dst / "reference.npz", **ref)
    m = json.loads((dst / "manifest.json").read_text())
    m["artifacts"]["onnx"].update(sha256=sha256_file(dst / "model.onnx"), bytes=(dst / "model.onnx").stat().st_size)
    m["reference"]["sha256"] = sha256_file(dst / "reference.npz")
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def infer(client: httpx.Client, path: str, x: np.ndarray, name: str = "image") -> np.ndarray:
    blob = x.tobytes()
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = client.post(path, content=head + blob, headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    return np.frombuffer(r.content[n:], "<f4").reshape(len(x), -1)


def wait_ready(client, timeout=60):
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/v2/health/ready").text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("repo")
    cnn = tiny_run("cnn")
    v2 = shifted(cnn, base / "cnn_v2", 1.0)
    gru = tiny_run("gru")
    x = np.load(cnn / "reference.npz")["inputs"][:3].astype(np.float32)
    s = np.load(gru / "reference.npz")["inputs"][:3].astype(np.float32)
    return {"cnn": cnn, "cnn_v2": v2, "gru": gru, "x": x, "s": s, "base": base,
            "want1": make_session(cnn / "model.onnx", device="cpu")(x),
            "want2": make_session(v2 / "model.onnx", device="cpu")(x),
            "want_gru": make_session(gru / "model.onnx", device="cpu")(s)}


def serve_runs(roots, **settings):
    run_objs = [Run.open(r) for r in roots]
    sources = Sources.from_runs(list(roots), [r.model_name for r in run_objs])
    models = [ServedModel.prepare(r, s.variant, device="cpu", threads=1, name=s.name, version=s.version)
              for r, s in zip(run_objs, sources.fixed)]
    return serve_in_thread(models, ServeConfig(port=0, access_log=False, **settings), sources=sources)


def test_two_models_and_two_versions_each_answer_their_own_numbers(runs):
    with serve_runs([runs["cnn"], runs["cnn_v2"], runs["gru"]]) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as c:
            wait_ready(c)
            x, s = runs["x"], runs["s"]
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/versions/1/infer", x), runs["want1"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/versions/2/infer", x), runs["want2"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/infer", x), runs["want2"], rtol=1e-5, atol=1e-5)  # latest
            np.testing.assert_allclose(infer(c, "/v2/models/gru/infer", s, "sequence"), runs["want_gru"], rtol=1e-5, atol=1e-5)
            assert np.abs(runs["want2"] - runs["want1"]).max() > 1  # the versions really differ
            assert c.get("/v2/models/cnn").json()["versions"] == ["1", "2"]
            assert c.get("/v2/models/cnn/versions/1").json()["parameters"]["run"] == str(runs["cnn"].resolve())
            assert c.get("/v2/models/gru/ready").json() == {"name": "gru", "ready": True}
            index = c.post("/v2/repository/index").json()
            assert [(e["name"], e["version"], e["state"]) for e in index] == \
                [("cnn", "1", "READY"), ("cnn", "2", "READY"), ("gru", "1", "READY")]
            r = c.post("/v2/models/cnn/versions/3/infer", json={})
            assert r.status_code == 404 and "no version '3' (versions: 1, 2)" in r.json()["error"]
            text = c.get("/metrics").text
            assert re.search(r'^onnxpipe_model_version_ready\{model="cnn",version="2"\} 1$', text, re.M)
            assert re.search(r'^onnxpipe_model_rows_total\{model="gru",version="1"\} 3$', text, re.M)


def test_unload_and_load_again(runs):
    with serve_runs([runs["cnn"], runs["gru"]]) as (url, app):
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c)
            assert c.post("/v2/repository/models/gru/unload").json() == {"name": "gru", "unloaded": True}
            r = c.post("/v2/models/gru/infer", json={})
            assert r.status_code == 404 and "is unloaded" in r.json()["error"]
            assert {(e["name"], e["state"], e["reason"]) for e in c.post("/v2/repository/index").json()} == \
                {("cnn", "READY", ""), ("gru", "UNAVAILABLE", "unloaded")}
            assert c.post("/v2/repository/index", json={"ready": True}).json() == \
                [{"name": "cnn", "version": "1", "state": "READY", "reason": ""}]
            assert c.get("/v2/health/ready").status_code == 200   # an unloaded model does not make the server unready
            r = c.post("/v2/repository/models/gru/load")
            assert r.status_code == 200 and r.json() == {"name": "gru", "versions": {"1": "loaded"}}
            np.testing.assert_allclose(infer(c, "/v2/models/gru/infer", runs["s"], "sequence"), runs["want_gru"],
                                       rtol=1e-5, atol=1e-5)
            assert c.post("/v2/repository/models/gru/load").json()["versions"] == {"1": "unchanged"}
            r = c.post("/v2/repository/models/lstm/load")
            assert r.status_code == 404 and "no model 'lstm'" in r.json()["error"]


def test_a_reload_while_requests_are_in_flight_drops_none(runs, tmp_path):
    """The old session answers until the new one has passed its self-test; a request held inside the old model
    call when the swap happens still gets its (old) answer; every client sees old answers, then new ones."""
    root = shifted(runs["cnn"], tmp_path / "cnn", 0.0)   # a private copy that will change under the server
    x, want1, want2 = runs["x"], runs["want1"], runs["want2"]
    with serve_runs([root], max_batch=4) as (url, app):
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c)
            old = app.state.batcher
            real, gate, held = old.run_batch, threading.Event(), []

            def hold_first(arrays):
                if not held:
                    held.append(len(arrays[0]))
                    gate.wait(60)
                return real(arrays)

            old.run_batch = hold_first
            pool = ThreadPoolExecutor(5)
            inside = pool.submit(lambda: infer(httpx.Client(base_url=url, timeout=60), "/v2/models/cnn/infer", x))
            while not held:
                time.sleep(0.01)
            old.run_batch = real  # only the first call is held
            stop = threading.Event()

            def client_loop():
                seen = []
                with httpx.Client(base_url=url, timeout=60) as cc:
                    while not stop.is_set():
                        got = infer(cc, "/v2/models/cnn/infer", x)
                        seen.append("old" if np.allclose(got, want1, atol=1e-4) else
                                    "new" if np.allclose(got, want2, atol=1e-4) else "other")
                return seen

            loops = [pool.submit(client_loop) for _ in range(3)]
            time.sleep(0.3)
            shifted(runs["cnn_v2"], root, 0.0)   # the run folder changes on disk
            r = c.post("/v2/repository/models/cnn/load")   # returns once the new session passed its self-test
            assert r.status_code == 200 and r.json()["versions"] == {"1": "loaded"}, r.text
            assert app.state.repository.resolve("cnn", None).batcher is not old
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/infer", x), want2, rtol=1e-5, atol=1e-5)
            gate.set()   # the old model call ends; what queued behind it on the old session is answered by it
            time.sleep(0.5)
            stop.set()
            np.testing.assert_allclose(inside.result(60), want1, rtol=1e-5, atol=1e-5)  # held across the swap
            for f in loops:
                seen = f.result(60)
                assert seen and "other" not in seen and seen[-1] == "new"
                assert seen == sorted(seen, key=lambda s: s == "new"), "an old answer after a new one"
            pool.shutdown()
            deadline = time.monotonic() + 30
            while old._task is not None and not old._task.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert old._task.done(), "the old batcher was not retired after its requests finished"
            assert re.search(r'^onnxpipe_model_loads_total\{model="cnn",version="1",result="ready"\} 2$',
                             c.get("/metrics").text, re.M)


def test_a_reload_that_fails_keeps_the_old_version_serving(runs, tmp_path, edit):
    root = shifted(runs["cnn"], tmp_path / "cnn", 0.0)
    with serve_runs([root]) as (url, app):
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c)
            data = bytearray((root / "model.onnx").read_bytes())
            data[-20] ^= 0xFF   # the new file does not match its manifest
            (root / "model.onnx").write_bytes(bytes(data))
            edit(root, lambda m: m["artifacts"]["onnx"].__setitem__("bytes", len(data) + 1))
            edit(root, lambda m: m["reference"].__setitem__("note", "changed"))
            (root / "manifest.json").touch()
            r = c.post("/v2/repository/models/cnn/load")
            # the fingerprint (variant, sha256s) did not change: nothing to reload
            assert r.status_code == 200 and r.json()["versions"] == {"1": "unchanged"}
            edit(root, lambda m: m["artifacts"]["onnx"].__setitem__("sha256", "0" * 64))
            r = c.post("/v2/repository/models/cnn/load")
            assert r.status_code == 400 and "still serving the version loaded before" in r.json()["error"]
            assert c.get("/v2/health/ready").status_code == 200
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/infer", runs["x"]), runs["want1"], rtol=1e-5, atol=1e-5)
            (entry,) = c.post("/v2/repository/index").json()
            assert entry["state"] == "READY" and "last reload failed" in entry["reason"] and "sha256" in entry["reason"]


def test_poll_reloads_a_changed_run_folder(runs, tmp_path):
    root = shifted(runs["cnn"], tmp_path / "cnn", 0.0)
    with serve_runs([root], poll_s=0.2) as (url, app):
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c)
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/infer", runs["x"]), runs["want1"], rtol=1e-5, atol=1e-5)
            shifted(runs["cnn_v2"], root, 0.0)
            deadline = time.monotonic() + 60
            while not np.allclose(infer(c, "/v2/models/cnn/infer", runs["x"]), runs["want2"], atol=1e-4):
                assert time.monotonic() < deadline, "the changed run folder was not reloaded"
                time.sleep(0.1)


def test_cli_serves_a_repository_folder_from_another_directory(runs, tmp_path):
    """Triton's layout: repo/cnn/1, repo/cnn/2 (versions), repo/gru (a run folder: version 1), plus a stray folder."""
    repo = tmp_path / "work" / "repo"
    shutil.copytree(runs["cnn"], repo / "cnn" / "1")
    shutil.copytree(runs["cnn_v2"], repo / "cnn" / "2")
    shutil.copytree(runs["gru"], repo / "gru")
    (repo / "notes").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", "--repository", "repo", "--port", "0",
                             "--device", "cpu", "--no-access-log"], cwd=tmp_path / "work", stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            if m := re.search(r"on (http://127\.0\.0\.1:\d+)/", proc.stderr.readline()):
                url = m.group(1)
        assert url
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_ready(c)
            assert [(e["name"], e["version"], e["state"]) for e in c.post("/v2/repository/index").json()] == \
                [("cnn", "1", "READY"), ("cnn", "2", "READY"), ("gru", "1", "READY")]
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/versions/1/infer", runs["x"]), runs["want1"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/infer", runs["x"]), runs["want2"], rtol=1e-5, atol=1e-5)
            shutil.copytree(runs["cnn"], repo / "cnn" / "3")      # a new version appears on disk
            assert c.post("/v2/repository/models/cnn/load").json()["versions"] == \
                {"1": "unchanged", "2": "unchanged", "3": "loaded"}
            np.testing.assert_allclose(infer(c, "/v2/models/cnn/infer", runs["x"]), runs["want1"], rtol=1e-5, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
