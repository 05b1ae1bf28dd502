"""`onnxpipe serve --workers 2`: two processes share the REST and gRPC ports, both answer, /metrics on either adds up
both, a repository call made through one of them applies to both, and SIGTERM stops all of them cleanly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import pytest

from onnxpipe.core.runtime import make_session


def fresh(url: str, method: str, path: str, **kw) -> httpx.Response:
    """One request on a new connection (the kernel picks the worker for each new connection)."""
    with httpx.Client(base_url=url, timeout=60) as c:
        return c.request(method, path, **kw)


def test_two_workers_share_the_ports_and_their_metrics(tiny_run):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    root = tiny_run("cnn")
    x = np.load(root / "reference.npz")["inputs"][:2].astype(np.float32)
    want = make_session(root / "model.onnx", device="cpu")(x)
    body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", str(root), "--port", "0", "--grpc-port", "0",
                             "--workers", "2", "--device", "cpu"], stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = grpc_target = None
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, open(log.name).read()[-3000:]
            text = open(log.name).read()
            url = url or ((m := re.search(r"on (http://127\.0\.0\.1:\d+)/", text)) and m.group(1))
            grpc_target = grpc_target or ((m := re.search(r"gRPC \S+ on (127\.0\.0\.1:\d+)", text)) and m.group(1))
            if url:
                metrics = fresh(url, "GET", "/metrics").text if "self-test passed" in text else ""
                if re.search(r"^onnxpipe_workers 2$", metrics, re.M) and re.search(r"^onnxpipe_model_ready 1$", metrics, re.M):
                    break
            time.sleep(0.2)
        for _ in range(40):   # each on its own connection
            r = fresh(url, "POST", "/v2/models/cnn/infer", json=body)
            assert r.status_code == 200
            np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 10), want,
                                       rtol=1e-5, atol=1e-5)
        c = grpcclient.InferenceServerClient(grpc_target)
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(c.infer("cnn", [inp]).as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
        c.close()
        time.sleep(0.5)  # the access log lines are written
        workers = {json.loads(line).get("worker") for line in open(log.name) if line.startswith("{")}
        assert workers == {0, 1}, "both workers should have answered some of the 40 connections"
        text = fresh(url, "GET", "/metrics").text   # whichever worker answers, it counts both
        assert re.search(r'^onnxpipe_model_requests_total\{model="cnn",version="1",protocol="rest",code="200"\} 40$',
                         text, re.M), text
        assert re.search(r'^onnxpipe_model_requests_total\{model="cnn",version="1",protocol="grpc",code="OK"\} 1$', text, re.M)
        assert re.search(r'^onnxpipe_model_rows_total\{model="cnn",version="1"\} 82$', text, re.M)

        assert fresh(url, "POST", "/v2/repository/models/cnn/unload").status_code == 200
        assert {fresh(url, "POST", "/v2/models/cnn/infer", json=body).status_code for _ in range(12)} == {404}
        r = fresh(url, "POST", "/v2/repository/models/cnn/load")
        assert r.status_code == 200, r.text
        assert {fresh(url, "POST", "/v2/models/cnn/infer", json=body).status_code for _ in range(12)} == {200}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "Traceback" not in open(log.name).read()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.unlink(log.name)
