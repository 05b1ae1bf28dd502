"""`onnxpipe serve`: the real server on a free loopback port, spoken to over HTTP.

Numbers are checked against ONNX Runtime run directly on the same file; every bad request is
followed by a good one that must still be answered correctly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from onnxpipe.runfolder import Run
from onnxpipe.core.runtime import make_session
from onnxpipe.serving.app import ServeConfig, serve_in_thread
from onnxpipe.serving.batcher import DynamicBatcher
from onnxpipe.serving.model import ServedModel

POISON = 12345.0  # a pixel value that makes the test server feed ONNX Runtime a broken tensor


def json_request(x: np.ndarray, name: str = "image", nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": data}], **extra}


def binary_request(x: np.ndarray, binary_out: bool = True) -> tuple[bytes, dict]:
    blob = np.ascontiguousarray(x, "<f4").tobytes()
    head = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": binary_out}}]}
    head = json.dumps(head).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def logits_of(resp: httpx.Response) -> np.ndarray:
    """Decode a response, JSON or binary (Triton's extension)."""
    assert resp.status_code == 200, resp.text
    n = resp.headers.get("inference-header-content-length")
    head = json.loads(resp.content[:int(n)] if n else resp.content)
    out = head["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32"
    if "data" in out:
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    size = out["parameters"]["binary_data_size"]
    return np.frombuffer(resp.content[int(n):int(n) + size], "<f4").reshape(out["shape"])


def wait_ready(client: httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/v2/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/v2/health/ready').text}")


@pytest.fixture(scope="module")
def cnn(tiny_run):
    """(run folder, reference inputs, ORT outputs for them) of the tiny CNN."""
    root = tiny_run("cnn")
    x = np.load(root / "reference.npz")["inputs"].astype(np.float32)
    session = make_session(root / "model.onnx", device="cpu")
    rng = np.random.default_rng(0)
    pool = np.concatenate([x, rng.normal(size=(56, *x.shape[1:])).astype(np.float32)])  # 64 distinct inputs
    return root, pool, session(pool)


@pytest.fixture(scope="module")
def server(cnn):
    """The real server for the tiny CNN, with a small body limit and a poison pill that breaks ORT."""
    root, _, _ = cnn
    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    cfg = ServeConfig(port=0, max_batch=8, max_delay_ms=2, max_body_mb=1.0)
    with serve_in_thread(model, cfg) as (url, app):
        real = app.state.batcher.run_batch

        def run_or_break(arrays):
            if (arrays[0] == POISON).any():  # a genuine ORT error: a tensor of the wrong rank
                return real([arrays[0][:, 0]])
            return real(arrays)

        app.state.batcher.run_batch = run_or_break
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client)
            yield client, app


def test_every_endpoint(server):
    client, _ = server
    assert client.get("/v2").json() == {"name": "onnxpipe", "version": client.get("/v2").json()["version"],
                                        "extensions": ["binary_tensor_data", "model_repository"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for base in ("/v2/models/cnn", "/v2/models/cnn/versions/1"):
        meta = client.get(base).json()
        assert meta["name"] == "cnn" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        p = meta["parameters"]
        assert p["providers"] == ["CPUExecutionProvider"] and p["device"] == "cpu" and p["variant"] == "onnx"
        assert p["self_test"]["passed"] and p["self_test"]["rule"] == "tensor" and p["self_test"]["max_abs"] < 1e-4
        assert client.get(base + "/ready").json() == {"name": "cnn", "ready": True}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE onnxpipe_request_duration_seconds histogram" in metrics.text
    assert re.search(r"^onnxpipe_model_ready 1$", metrics.text, re.M)


def test_json_flat_nested_and_binary_match_onnxruntime(server, cnn):
    client, _ = server
    _, pool, want = cnn
    x = pool[:3]
    flat = logits_of(client.post("/v2/models/cnn/infer", json=json_request(x)))
    nested = logits_of(client.post("/v2/models/cnn/versions/1/infer", json=json_request(x, nested=True, id="r1")))
    body, headers = binary_request(x)
    binary = client.post("/v2/models/cnn/infer", content=body, headers=headers)
    assert binary.headers["content-type"] == "application/octet-stream"
    body2, headers2 = binary_request(x, binary_out=False)
    binary_in_json_out = client.post("/v2/models/cnn/infer", content=body2, headers=headers2)
    json_in_binary_out = client.post("/v2/models/cnn/infer",
                                     json=json_request(x, parameters={"binary_data_output": True}))
    assert "inference-header-content-length" in json_in_binary_out.headers
    for got in (flat, nested, logits_of(binary), logits_of(binary_in_json_out), logits_of(json_in_binary_out)):
        np.testing.assert_allclose(got, want[:3], rtol=1e-6, atol=1e-6)
    nested_resp = client.post("/v2/models/cnn/infer", json=json_request(x[:1], id="r2")).json()
    assert nested_resp["id"] == "r2" and nested_resp["model_name"] == "cnn" and nested_resp["model_version"] == "1"


def test_concurrent_requests_come_back_to_their_callers(server, cnn):
    client, _ = server
    _, pool, want = cnn

    def ask(i: int) -> tuple[int, np.ndarray]:
        body, headers = binary_request(pool[i:i + 1])
        return i, logits_of(shared.post("/v2/models/cnn/infer", content=body, headers=headers))

    with httpx.Client(base_url=str(client.base_url), timeout=30, limits=httpx.Limits(max_connections=16)) as shared:
        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(ask, [i % len(pool) for i in range(96)]))
    for i, got in results:
        np.testing.assert_allclose(got[0], want[i], rtol=1e-5, atol=1e-5, err_msg=f"request {i} got someone else's answer")


def test_request_larger_than_max_batch_is_answered(server, cnn):
    client, _ = server
    _, pool, want = cnn
    body, headers = binary_request(pool[:40])  # max batch is 8
    np.testing.assert_allclose(logits_of(client.post("/v2/models/cnn/infer", content=body, headers=headers)),
                               want[:40], rtol=1e-5, atol=1e-5)


def _binary(head: dict, blob: bytes, header_length: str | None = None) -> dict:
    h = json.dumps(head).encode()
    return {"content": h + blob, "headers": {"Inference-Header-Content-Length": header_length or str(len(h))}}


GOOD = np.zeros((1, 1, 28, 28), np.float32)
IMG = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32"}
BLOB = GOOD.tobytes()
BAD_REQUESTS = [
    # (case, path, request kwargs, status, words the error must contain)
    ("malformed JSON", "infer", {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("body is a list", "infer", {"json": [1, 2]}, 400, "JSON object"),
    ("no inputs", "infer", {"json": {"inputs": []}}, 400, "non-empty list"),
    ("unknown model", "/v2/models/resnet/infer", {"json": json_request(GOOD)}, 404, "unknown model 'resnet'"),
    ("unknown version", "/v2/models/cnn/versions/7/infer", {"json": json_request(GOOD)}, 404, "no version '7'"),
    ("missing input", "infer", {"json": json_request(GOOD, name="pixels")}, 400, "missing input(s) 'image'"),
    ("extra input", "infer", {"json": {"inputs": json_request(GOOD)["inputs"] + json_request(GOOD, name="mask")["inputs"]}},
     400, "unknown input(s) 'mask'"),
    ("input twice", "infer", {"json": {"inputs": json_request(GOOD)["inputs"] * 2}}, 400, "given twice"),
    ("wrong datatype", "infer", {"json": {"inputs": [{**IMG, "datatype": "INT64", "data": [0] * 784}]}}, 400,
     "datatype INT64 but model 'cnn' takes FP32"),
    ("unknown datatype", "infer", {"json": {"inputs": [{**IMG, "datatype": "FLOAT", "data": [0] * 784}]}}, 400, "'FLOAT' is not supported"),
    ("wrong rank", "infer", {"json": {"inputs": [{**IMG, "shape": [1, 784], "data": [0] * 784}]}}, 400, "shape [1, 784]"),
    ("wrong shape", "infer", {"json": {"inputs": [{**IMG, "shape": [1, 1, 27, 27], "data": [0] * 729}]}}, 400, "takes [-1, 1, 28, 28]"),
    ("negative dim", "infer", {"json": {"inputs": [{**IMG, "shape": [-1, 1, 28, 28], "data": [0] * 784}]}}, 400, "negative"),
    ("shape not a list", "infer", {"json": {"inputs": [{**IMG, "shape": "1x784", "data": [0] * 784}]}}, 400, "list of integers"),
    ("too few values", "infer", {"json": {"inputs": [{**IMG, "data": [0.5] * 700}]}}, 400, "has 700 values"),
    ("nested too deep", "infer", {"content": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                  "headers": {"content-type": "application/json"}}, 400, "nested too deeply"),
    ("ragged nesting", "infer", {"json": {"inputs": [{**IMG, "data": [[0.0] * 28] * 27 + [[0.0] * 5]}]}}, 400, "ragged"),
    ("strings", "infer", {"json": {"inputs": [{**IMG, "data": ["a"] * 784}]}}, 400, "strings"),
    ("no data", "infer", {"json": {"inputs": [IMG]}}, 400, "has no 'data'"),
    ("NaN in JSON", "infer", {"content": json.dumps({"inputs": [{**IMG, "data": [float("nan")] + [0.0] * 783}]}).encode(),
                              "headers": {"content-type": "application/json"}}, 400, "1 NaN or Inf"),
    ("Inf in binary", "infer", _binary({"inputs": [{**IMG, "parameters": {"binary_data_size": 3136}}]},
                                       np.full((1, 1, 28, 28), np.inf, np.float32).tobytes()), 400, "784 NaN or Inf"),
    ("empty batch", "infer", {"json": {"inputs": [{**IMG, "shape": [0, 1, 28, 28], "data": []}]}}, 400, "empty batch"),
    ("body over the limit", "infer", {"content": b" " * ((1 << 20) + 1), "headers": {"content-type": "application/json"}},
     413, "over the limit"),
    ("binary without header length", "infer", {"content": _binary({"inputs": [{**IMG, "parameters": {"binary_data_size": 3136}}]}, BLOB)["content"]},
     400, "Inference-Header-Content-Length header"),
    ("header length not a number", "infer", _binary({"inputs": [IMG]}, BLOB, header_length="abc"), 400, "must be an integer"),
    ("header length past the body", "infer", _binary({"inputs": [IMG]}, BLOB, header_length="999999"), 400, "but the body has"),
    ("binary size mismatch", "infer", _binary({"inputs": [{**IMG, "parameters": {"binary_data_size": 3000}}]}, BLOB[:3000]),
     400, "needs 3136 bytes"),
    ("binary body too short", "infer", _binary({"inputs": [{**IMG, "parameters": {"binary_data_size": 3136}}]}, BLOB[:100]),
     400, "bytes short"),
    ("bytes left over", "infer", _binary({"inputs": [{**IMG, "parameters": {"binary_data_size": 3136}}]}, BLOB + b"xx"),
     400, "2 bytes after"),
    ("data and binary", "infer", _binary({"inputs": [{**IMG, "data": [0] * 784, "parameters": {"binary_data_size": 3136}}]}, BLOB),
     400, "both 'data'"),
    ("unknown output", "infer", {"json": json_request(GOOD, outputs=[{"name": "probs"}])}, 400, "unknown output(s) 'probs'"),
    ("unsupported extension", "infer", {"json": json_request(GOOD, outputs=[{"name": "logits", "parameters": {"classification": 3}}])},
     400, "'classification' is not supported"),
    ("GET on infer", "GET /v2/models/cnn/infer", {}, 405, "GET is not allowed"),
    ("unknown path", "GET /v2/nothing", {}, 404, "no endpoint /v2/nothing"),
]


@pytest.mark.parametrize("case,path,kwargs,status,words", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_4xx_then_server_still_answers(server, cnn, case, path, kwargs, status, words):
    client, _ = server
    _, pool, want = cnn
    method, _, url = path.rpartition(" ") if " " in path else ("POST", "", path)
    url = "/v2/models/cnn/infer" if url == "infer" else url
    resp = client.request(method, url, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert words in error, error
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    np.testing.assert_allclose(logits_of(client.post("/v2/models/cnn/infer", json=json_request(pool[:1]))), want[:1],
                               rtol=1e-5, atol=1e-5)


def test_chunked_body_over_the_limit_is_413(server):
    client, _ = server
    resp = client.post("/v2/models/cnn/infer", content=iter([b" " * (512 << 10)] * 3))  # no Content-Length
    assert resp.status_code == 413 and "over the limit" in resp.json()["error"]


def test_onnxruntime_failure_is_500_and_others_in_its_batch_still_succeed(server, cnn):
    client, _ = server
    _, pool, want = cnn
    poisoned = pool[:1].copy()
    poisoned[0, 0, 0, 0] = POISON

    def ask(x):
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            return c.post("/v2/models/cnn/infer", content=binary_request(x)[0], headers=binary_request(x)[1])

    with ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(ask, poisoned if i == 3 else pool[i:i + 1]) for i in range(8)]
        results = [f.result() for f in futures]
    for i, resp in enumerate(results):
        if i == 3:
            assert resp.status_code == 500 and "inference failed in ONNX Runtime" in resp.json()["error"]
            assert "Traceback" not in resp.text
        else:
            np.testing.assert_allclose(logits_of(resp)[0], want[i], rtol=1e-5, atol=1e-5)


def test_metrics_and_access_log(server, caplog):
    client, _ = server
    with caplog.at_level("INFO", logger="onnxpipe.access"):
        client.post("/v2/models/cnn/infer", json={"inputs": "nope"})
        client.post("/v2/models/cnn/infer", json=json_request(GOOD))
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if r.name == "onnxpipe.access"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "onnxpipe.access"]
    bad, good = lines[-2], lines[-1]
    assert bad["status"] == 400 and "non-empty list" in bad["error"] and bad["path"] == "/v2/models/cnn/infer"
    assert good["status"] == 200 and good["rows"] == 1 and good["ms"] > 0 and good["method"] == "POST"
    text = client.get("/metrics").text
    assert re.search(r'^onnxpipe_requests_total\{route="infer",code="400"\} \d+$', text, re.M)
    assert re.search(r'^onnxpipe_requests_total\{route="infer",code="200"\} \d+$', text, re.M)
    assert re.search(r'^onnxpipe_batch_size_bucket\{le="\+Inf"\} [1-9]\d*$', text, re.M)
    assert re.search(r"^onnxpipe_queue_depth 0$", text, re.M)
    assert re.search(r"^onnxpipe_requests_in_flight 1$", text, re.M)  # this /metrics request itself
    assert re.search(r'^onnxpipe_request_duration_seconds_count\{route="infer"\} [1-9]', text, re.M)


def test_batcher_merges_waiting_requests_and_keeps_a_lone_one_fast():
    """The batching policy, deterministically: requests queued behind a running call become one call."""
    import asyncio

    calls = []
    gate = threading.Event()

    def run(arrays):
        calls.append(len(arrays[0]))
        if len(calls) == 1:
            gate.wait(5)  # hold the first call so that the others queue up behind it
        return [arrays[0] * 2]

    batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.002)

    async def main():
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.full((1, 3), 0.0)]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit([np.full((1, 3), float(i))])) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(first, *rest)
        t0 = time.perf_counter()
        await batcher.submit([np.ones((1, 3))])  # alone: no waiting for company
        lone = time.perf_counter() - t0
        await batcher.stop()
        return outs, lone

    outs, lone = asyncio.run(main())
    assert calls[:3] == [1, 4, 2] and calls[3] == 1   # 6 waiting requests -> batches of 4 and 2 (max_batch 4)
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out[0], np.full((1, 3), 2.0 * i))
    assert lone < 0.5


def _server_for(root, **kw):
    return serve_in_thread(ServedModel.prepare(Run.open(root), device="cpu", threads=1), ServeConfig(port=0), **kw)


def test_not_ready_until_the_self_test_passed(tiny_run):
    gate = threading.Event()
    holder = {}

    def slow_load():
        gate.wait(10)
        holder["model"].load()

    model = ServedModel.prepare(Run.open(tiny_run("cnn")), device="cpu", threads=1)
    holder["model"] = model
    with serve_in_thread(model, ServeConfig(port=0), load=slow_load) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/v2/health/live").status_code == 200
            r = client.get("/v2/health/ready")
            assert r.status_code == 400 and r.json()["ready"] is False and "still loading" in r.json()["error"]
            assert client.get("/v2/models/cnn/ready").json()["ready"] is False
            r = client.post("/v2/models/cnn/infer", json=json_request(GOOD))
            assert r.status_code == 503 and "still loading" in r.json()["error"]
            gate.set()
            wait_ready(client)
            assert client.post("/v2/models/cnn/infer", json=json_request(GOOD)).status_code == 200


def test_tampered_artifact_never_becomes_ready(copy_of):
    root = copy_of("cnn")
    data = bytearray((root / "model.onnx").read_bytes())
    data[-20] ^= 0xFF  # one flipped byte in the weights
    (root / "model.onnx").write_bytes(bytes(data))
    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0)) as (url, _):
        assert model.wait_loaded(30)
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.get("/v2/health/ready")
            assert r.status_code == 400 and "changed since it was recorded" in r.json()["error"]
            assert client.get("/v2/models/cnn").json()["parameters"]["state"] == "failed"
            assert client.post("/v2/models/cnn/infer", json=json_request(GOOD)).status_code == 503


def test_self_test_failure_keeps_the_model_unready(copy_of, edit):
    """A model that does not reproduce the recorded reference outputs is not served."""
    from onnxpipe.atomic import sha256_file

    root = copy_of("cnn")
    z = dict(np.load(root / "reference.npz"))
    z["outputs"] = z["outputs"] + 0.01  # the recorded answers no longer match the model
    np.savez(root / "reference.npz", **z)
    edit(root, lambda m: m["reference"].__setitem__("sha256", sha256_file(root / "reference.npz")))
    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    model.load()
    assert model.state == "failed" and "self-test failed" in model.error and "max abs 0.01" in model.error


def test_cli_serve_exits_cleanly_on_sigterm_after_finishing_in_flight_work(tiny_run, cnn):
    root = tiny_run("cnn")
    _, pool, want = cnn
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", str(root), "--port", "0", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if m := re.search(r"on (http://127\.0\.0\.1:\d+)/", line):
                url = m.group(1)
        assert url, "the server did not print its address"
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_ready(client)
            big = np.tile(pool, (40, 1, 1, 1))  # 2,560 rows: a request that takes a while
            body, headers = binary_request(big)
            result = {}
            t = threading.Thread(target=lambda: result.update(r=client.post("/v2/models/cnn/infer", content=body,
                                                                              headers=headers)))
            t.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until the big request is being handled (this poll is the other)
                m = re.search(r"^onnxpipe_requests_in_flight (\S+)$", httpx.get(url + "/metrics").text, re.M)
                if float(m.group(1)) >= 2:
                    break
                time.sleep(0.005)
            signalled = time.time()
            proc.send_signal(signal.SIGTERM)
            t.join(60)
        np.testing.assert_allclose(logits_of(result["r"]), np.tile(want, (40, 1)), rtol=1e-5, atol=1e-5)
        assert proc.wait(30) == 0
        rest = proc.stderr.read()
        assert "shut down cleanly" in rest and "Traceback" not in rest
        access = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        big_done = [a for a in access if a.get("rows") == len(big)]
        assert big_done and big_done[0]["ts"] > signalled, "the request should have been in flight at SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_serve_cuda_without_provider_is_a_clear_error(tiny_run):
    import onnxruntime as ort
    from typer.testing import CliRunner

    from onnxpipe.cli import app

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    result = CliRunner().invoke(app, ["serve", str(tiny_run("cnn")), "--device", "cuda", "--port", "0"])
    assert result.exit_code == 1
    assert "--device cuda was requested but ONNX Runtime has no CUDA provider" in result.output


def test_standard_triton_client_with_default_settings(server, cnn):
    """tritonclient's defaults: binary inputs, binary outputs (Triton's extension)."""
    httpclient = pytest.importorskip("tritonclient.http")
    client, _ = server
    _, pool, want = cnn
    tc = httpclient.InferenceServerClient(str(client.base_url).replace("http://", ""))
    assert tc.is_server_live() and tc.is_server_ready() and tc.is_model_ready("cnn")
    meta = tc.get_model_metadata("cnn")
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    inp = httpclient.InferInput("image", list(pool[:5].shape), "FP32")
    inp.set_data_from_numpy(pool[:5])
    np.testing.assert_allclose(tc.infer("cnn", [inp]).as_numpy("logits"), want[:5], rtol=1e-6, atol=1e-6)
    inp.set_data_from_numpy(pool[:5], binary_data=False)
    out = httpclient.InferRequestedOutput("logits", binary_data=False)
    np.testing.assert_allclose(tc.infer("cnn", [inp], outputs=[out]).as_numpy("logits"), want[:5], rtol=1e-6, atol=1e-6)
    tc.close()


@pytest.mark.gpu
def test_serve_on_cuda_reports_the_cuda_provider_and_passes_the_self_test(tiny_run, cnn):
    _, pool, want = cnn
    model = ServedModel.prepare(Run.open(tiny_run("cnn")), device="cuda")
    with serve_in_thread(model, ServeConfig(port=0)) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_ready(client, 120)
            params = client.get("/v2/models/cnn").json()["parameters"]
            assert params["providers"][0] == "CUDAExecutionProvider" and params["device"] == "cuda"
            assert params["self_test"]["passed"]
            np.testing.assert_allclose(logits_of(client.post("/v2/models/cnn/infer", json=json_request(pool[:4]))),
                                       want[:4], rtol=1e-3, atol=1e-4)


def test_protocol_datatypes_beyond_fp32():
    """FP16 and INT64 in JSON and binary; integers are not silently truncated; token ids are range-checked."""
    from onnxpipe.serving.model import TensorMeta
    from onnxpipe.serving.protocol import RequestError, encode_infer_response, parse_infer_request

    half = np.array([[0.5, -2.0, 65504.0]], np.float16)
    head = json.dumps({"inputs": [{"name": "h", "shape": [1, 3], "datatype": "FP16",
                                   "parameters": {"binary_data_size": 6}},
                                  {"name": "t", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 99]]}],
                       "outputs": [{"name": "h", "parameters": {"binary_data": True}}, {"name": "t"}]}).encode()
    req = parse_infer_request(head + half.tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs[0].array, half)
    assert req.inputs[1].array.dtype == np.int64 and req.inputs[1].array.tolist() == [[1, 2, 99]]
    body, headers = encode_infer_response("m", "1", req, [("h", "FP16", half), ("t", "INT64", req.inputs[1].array)])
    n = int(headers["inference-header-content-length"])
    doc = json.loads(body[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 6 and doc["outputs"][1]["data"] == [1, 2, 99]
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f2").reshape(1, 3), half)
    for data, words in (([[1.5, 2, 3]], "non-integer"), ([[2 ** 70, 0, 0]], "out-of-range")):
        with pytest.raises(RequestError, match=words):
            parse_infer_request(json.dumps({"inputs": [{"name": "t", "shape": [1, 3], "datatype": "INT64",
                                                        "data": data}]}).encode())
    with pytest.raises(RequestError, match=r"outside the INT8 range"):
        parse_infer_request(json.dumps({"inputs": [{"name": "b", "shape": [1], "datatype": "INT8",
                                                    "data": [300]}]}).encode())

    model = ServedModel(run=None, variant="v", name="tok", vocab_size=100, state="ready",
                        inputs=[TensorMeta("t", "INT64", (-1, -1))], outputs=[TensorMeta("logits", "FP32", (-1, 10))])
    ok = parse_infer_request(json.dumps({"inputs": [{"name": "t", "shape": [2, 5], "datatype": "INT64",
                                                     "data": list(range(10))}]}).encode())
    assert model.feeds(ok)[0].shape == (2, 5)
    for shape, data, words in (([1, 3], [1, 2, 100], "outside \\[0, 99\\]"), ([1, 0], [], "zero-length")):
        bad = parse_infer_request(json.dumps({"inputs": [{"name": "t", "shape": shape, "datatype": "INT64",
                                                          "data": data}]}).encode())
        with pytest.raises(RequestError, match=words):
            model.feeds(bad)
