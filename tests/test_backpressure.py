"""Backpressure, deadlines and slow clients: refused at once with 503 + Retry-After when the queue or the bytes in
flight are full, 504 when a deadline passes (and the queued work is never run), a disconnected client's queued work
dropped, read timeouts for slow headers and slow bodies, and a batcher that waits only for complete bodies.

The model call is held by a gate (the real ONNX Runtime call runs once the gate opens), so that what is queued
behind it is known exactly; every assertion is on status codes, counts of rows run and metrics, not on a clock."""
from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from onnxpipe.runfolder import Run
from onnxpipe.serving.app import ServeConfig, serve_in_thread
from onnxpipe.serving.model import ServedModel


def binary(x: np.ndarray) -> dict:
    blob = np.ascontiguousarray(x, "<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return {"content": head + blob, "headers": {"Inference-Header-Content-Length": str(len(head))}}


@pytest.fixture
def gated(hold_model_calls):
    """gated(root, **settings): the real server for the tiny CNN whose model calls wait for `gate`; `calls`
    lists the rows of each call."""
    @contextlib.contextmanager
    def serve_gated(root, **settings):
        model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
        cfg = ServeConfig(port=0, **settings)
        with serve_in_thread(model, cfg) as (url, app):
            assert model.wait_loaded(60) and model.ready, model.error
            with hold_model_calls(app.state.batcher) as (gate, calls):
                yield url, app, gate, calls

    return serve_gated


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def metric(url: str, pattern: str) -> float:
    m = re.search("^" + pattern + r" (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def x(tiny_run):
    return np.load(tiny_run("cnn") / "reference.npz")["inputs"][:4].astype(np.float32)


def test_a_full_queue_is_503_with_retry_after_at_once(tiny_run, x, gated):
    with gated(tiny_run("cnn"), max_queue=2, max_batch=1) as (url, app, gate, calls):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, url + "/v2/models/cnn/infer", timeout=30, **binary(x[:1]))
            assert wait_for(lambda: len(calls) == 1)           # running, held by the gate
            second = pool.submit(httpx.post, url + "/v2/models/cnn/infer", timeout=30, **binary(x[1:2]))
            assert wait_for(lambda: app.state.batcher.queued == 1)   # queued behind it: the queue is full
            t0 = time.monotonic()
            keep = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
            refused = keep.post("/v2/models/cnn/infer", **binary(x[2:3]))
            assert time.monotonic() - t0 < 5  # not queued behind the gate
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "--max-queue" in refused.json()["error"] and refused.headers.get("connection") != "close"
            assert httpx.get(url + "/v2/health/live").status_code == 200   # probes are not queued
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert calls == [1, 1]  # the refused request never ran
        assert metric(url, r'onnxpipe_rejected_total\{model="cnn",reason="queue_full"\}') == 1
        assert metric(url, r'onnxpipe_requests_total\{route="infer",code="503"\}') == 1
        assert keep.post("/v2/models/cnn/infer", **binary(x[:1])).status_code == 200   # the same connection goes on
        keep.close()


def test_bytes_in_flight_over_the_bound_is_503(tiny_run, x, gated):
    with gated(tiny_run("cnn"), max_inflight_mb=0.02) as (url, app, gate, calls):  # 20 KiB
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v2/models/cnn/infer", timeout=30, **binary(x[:1]))  # 3.2 KB
            assert wait_for(lambda: len(calls) == 1)
            small = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                 "data": x[1].ravel().tolist()}]}   # ~16 KB of JSON, charged 4x
            r = httpx.post(url + "/v2/models/cnn/infer", json=small, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-inflight-mb" in r.json()["error"]
            gate.set()
            assert first.result().status_code == 200
        # alone, the same request passes (a request always passes when nothing else is in flight)
        assert httpx.post(url + "/v2/models/cnn/infer", json=small, timeout=30).status_code == 200
        assert metric(url, r'onnxpipe_rejected_total\{model="cnn",reason="inflight_bytes"\}') == 1
        assert metric(url, r"onnxpipe_inflight_bytes") == 0


def test_a_deadline_is_504_and_the_queued_work_is_never_run(tiny_run, x, gated):
    with gated(tiny_run("cnn"), timeout_ms=300, max_batch=1) as (url, app, gate, calls):
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/v2/models/cnn/infer", timeout=30, **binary(x[:1]))
            assert wait_for(lambda: len(calls) == 1)
            queued = pool.submit(httpx.post, url + "/v2/models/cnn/infer", timeout=30, **binary(x[1:3]))
            r1, r2 = running.result(), queued.result()   # both past their 300 ms deadline while the gate is shut
        assert r1.status_code == 504 and "queued or running" in r1.json()["error"] and "--timeout-ms 300" in r1.json()["error"]
        assert r2.status_code == 504
        gate.set()
        assert wait_for(lambda: app.state.batcher.queued == 0 and not app.state.batcher._busy)
        assert calls == [1]   # the 2-row request was dropped from the queue, never run
        assert metric(url, r'onnxpipe_dropped_total\{model="cnn",reason="deadline"\}') == 2
        ok = httpx.post(url + "/v2/models/cnn/infer", timeout=30, **binary(x[:2]))
        assert ok.status_code == 200 and calls == [1, 1, 1]   # 2 rows with --max-batch 1: two calls


def test_a_client_that_disconnects_has_its_queued_work_dropped(tiny_run, x, gated):
    with gated(tiny_run("cnn"), max_batch=1) as (url, app, gate, calls):
        host, port = url.removeprefix("http://").split(":")
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v2/models/cnn/infer", timeout=30, **binary(x[:1]))
            assert wait_for(lambda: len(calls) == 1)
            req = binary(x[1:4])
            head = (f"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: "
                    f"{req['headers']['Inference-Header-Content-Length']}\r\nContent-Length: {len(req['content'])}\r\n\r\n")
            with socket.create_connection((host, int(port))) as s:
                s.sendall(head.encode() + req["content"])
                assert wait_for(lambda: app.state.batcher.queued == 1)
            assert wait_for(lambda: metric(url, r'onnxpipe_dropped_total\{model="cnn",reason="disconnect"\}') == 1)
            gate.set()
            assert first.result().status_code == 200
        assert wait_for(lambda: app.state.batcher.queued == 0 and not app.state.batcher._busy)
        assert calls == [1]   # the 3 rows of the client that left were never run


def test_slow_headers_and_slow_bodies_are_timed_out(tiny_run, x, caplog, gated):
    with gated(tiny_run("cnn"), header_timeout_s=0.5, body_timeout_s=0.5) as (url, app, gate, calls):
        gate.set()
        host, port = url.removeprefix("http://").split(":")

        def answer_to(first_bytes: bytes) -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(first_bytes)
                data = b""
                while chunk := s.recv(4096):  # the server answers and closes: recv returns b""
                    data += chunk
                return data

        t0 = time.monotonic()
        assert answer_to(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408")
        assert answer_to(b"").startswith(b"HTTP/1.1 408")       # a connection that never sends anything
        with caplog.at_level("INFO", logger="onnxpipe.access"):
            body = answer_to(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5000\r\n\r\n{\"inputs\": [")
            assert body.startswith(b"HTTP/1.1 408")
            assert wait_for(lambda: any('"status":408' in r.getMessage() for r in caplog.records), 5)
        assert time.monotonic() - t0 < 20  # closed by the server, not by the client's 10 s socket timeout
        assert calls == []
        assert httpx.post(url + "/v2/models/cnn/infer", timeout=30, **binary(x[:1])).status_code == 200


def test_the_batcher_does_not_wait_for_a_half_sent_request(tiny_run, x, gated):
    """A client that sent its headers and half its body delays nobody (before: every batch waited --max-delay-ms)."""
    with gated(tiny_run("cnn"), max_delay_ms=1000) as (url, app, gate, calls):
        gate.set()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"inputs\": [")
            assert wait_for(lambda: metric(url, r"onnxpipe_requests_in_flight") >= 2)   # it is being received
            assert app.state.batcher._arriving == 0   # ... but it is no arrival the batcher may wait for
            t0 = time.monotonic()
            r = httpx.post(url + "/v2/models/cnn/infer", timeout=30, **binary(x[:1]))
            lone = time.monotonic() - t0
        assert r.status_code == 200 and calls == [1]
        assert lone < 0.9, f"a lone request waited {lone:.3f} s: the batcher waited for the half-sent one"


def test_a_request_larger_than_max_batch_runs_in_max_batch_row_calls():
    """The model's working memory is that of max_batch rows whatever a request holds; a batch-dependent model
    (merge_callers False) still runs a request in one call, as its answer must be its solo answer."""
    import asyncio

    from onnxpipe.serving.batcher import DynamicBatcher

    for merge, want_calls in ((True, [4, 4, 2]), (False, [10])):
        calls = []

        def run(arrays):
            calls.append(len(arrays[0]))
            return [arrays[0] * 2, arrays[0].sum(1, keepdims=True)]

        batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.0)
        batcher.merge_callers = merge
        x = np.arange(30, dtype=np.float32).reshape(10, 3)

        async def main():
            batcher.start()
            out = await batcher.submit([x])
            await batcher.stop()
            return out

        doubled, sums = asyncio.run(main())
        assert calls == want_calls
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_array_equal(sums, x.sum(1, keepdims=True))


def test_the_server_never_imports_torch(tiny_run):
    """torch's few hundred thousand objects would make every full garbage collection of the server take ~0.1 s
    (a stall every request on the event loop waits out, health probes included)."""
    import subprocess
    import sys

    code = ("import sys\nfrom onnxpipe.serving.launch import plan\n"
            f"p = plan([{str(tiny_run('cnn'))!r}], None, variant=None, name=None, device='cpu', flags={{}})\n"
            "m = p.models()[0]\nimport onnxpipe.serving.app, onnxpipe.serving.grpc_server\nm.load()\n"
            "assert m.ready, m.error\nprint(sorted(k for k in ('torch', 'sklearn', 'matplotlib') if k in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
