"""KServe v2 gRPC: the messages are the protocol's (checked field by field against tritonclient's descriptor), and
`tritonclient.grpc` with its default settings infers against a real server and gets REST's numbers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from onnxpipe.core.runtime import make_session
from onnxpipe.runfolder import Run
from onnxpipe.serving.app import ServeConfig, serve_in_thread
from onnxpipe.serving.model import ServedModel
from onnxpipe.serving.oip import METHODS, MESSAGES, PACKAGE, SERVICE, messages

grpcclient = pytest.importorskip("tritonclient.grpc")
grpc = pytest.importorskip("grpc")


def test_every_message_and_field_is_the_protocols():
    """Name, number, type and label of every field, nested messages and map entries included, against Triton's
    grpc_service.proto as tritonclient ships it (a superset of the Open Inference Protocol's)."""
    from tritonclient.grpc import service_pb2

    theirs_pool = service_pb2.DESCRIPTOR.pool
    M = messages()

    def compare(ours, theirs, path):
        for f in ours.fields:
            t = theirs.fields_by_name.get(f.name)
            assert t is not None, f"{path}.{f.name} is not in Triton's proto"
            assert (f.number, f.type, f.label) == (t.number, t.type, t.label), f"{path}.{f.name}"
            if f.message_type is not None:
                assert f.message_type.full_name == t.message_type.full_name, f"{path}.{f.name}"
        for nested in ours.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name], f"{path}.{nested.name}")

    for name in MESSAGES:
        ours = M.pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
        compare(ours, theirs_pool.FindMessageTypeByName(f"inference.{name}"), name)
    service = theirs_pool.FindServiceByName(f"inference.{SERVICE}")
    for rpc, (req, resp) in METHODS.items():
        m = service.methods_by_name[rpc]
        assert (m.input_type.name, m.output_type.name) == (req, resp)


@pytest.fixture(scope="module")
def served(tiny_run):
    root = tiny_run("cnn")
    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0, grpc_port=0, max_batch=8)) as (url, app):
        assert model.wait_loaded(60) and model.ready
        x = np.load(root / "reference.npz")["inputs"][:5].astype(np.float32)
        yield url, f"127.0.0.1:{app.state.grpc_port}", app, x, make_session(root / "model.onnx", device="cpu")(x)


def rest_binary(url: str, x: np.ndarray) -> np.ndarray:
    blob = x.tobytes()
    head = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = httpx.post(url + "/v2/models/cnn/infer", content=head + blob, headers={"Inference-Header-Content-Length": str(len(head))})
    n = int(r.headers["inference-header-content-length"])
    return np.frombuffer(r.content[n:], "<f4").reshape(len(x), 10)


def test_tritonclient_grpc_defaults_infer_metadata_and_readiness(served):
    url, target, _, x, want = served
    c = grpcclient.InferenceServerClient(target)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("cnn") and c.is_model_ready("cnn", "1")
    meta = c.get_server_metadata()
    assert meta.name == "onnxpipe" and "binary_tensor_data" in meta.extensions
    mm = c.get_model_metadata("cnn")
    assert mm.platform == "onnxruntime_onnx" and list(mm.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in mm.inputs] == [("image", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, t.datatype, list(t.shape)) for t in mm.outputs] == [("logits", "FP32", [-1, 10])]
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = c.infer("cnn", [inp], request_id="r7")
    got = result.as_numpy("logits")
    assert result.get_response().id == "r7" and result.get_response().model_version == "1"
    np.testing.assert_array_equal(got, rest_binary(url, x))           # the same numbers as REST
    json_rest = httpx.post(url + "/v2/models/cnn/infer", json={"inputs": [{"name": "image", "shape": list(x.shape),
                                                                           "datatype": "FP32", "data": x.ravel().tolist()}]})
    np.testing.assert_array_equal(got, np.asarray(json_rest.json()["outputs"][0]["data"], np.float32).reshape(got.shape))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    c.close()


def test_typed_contents_and_errors_map_to_grpc_status_codes(served):
    url, target, _, x, want = served
    M = messages()
    channel = grpc.insecure_channel(target)
    infer = channel.unary_unary(f"/{PACKAGE}.{SERVICE}/ModelInfer", request_serializer=M.ModelInferRequest.SerializeToString,
                                response_deserializer=M.ModelInferResponse.FromString)
    req = M.ModelInferRequest(model_name="cnn")
    t = req.inputs.add(name="image", datatype="FP32", shape=[2, 1, 28, 28])
    t.contents.fp32_contents.extend(x[:2].ravel().tolist())
    resp = infer(req)
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 10), want[:2], rtol=1e-5, atol=1e-5)

    def code_of(r):
        with pytest.raises(grpc.RpcError) as e:
            infer(r)
        return e.value.code(), e.value.details()

    code, details = code_of(M.ModelInferRequest(model_name="resnet", inputs=[t]))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'resnet'" in details
    bad = M.ModelInferRequest(model_name="cnn")
    bad.inputs.add(name="image", datatype="FP32", shape=[1, 1, 27, 27]).contents.fp32_contents.extend([0.0] * 729)
    code, details = code_of(bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "takes [-1, 1, 28, 28]" in details
    short = M.ModelInferRequest(model_name="cnn", raw_input_contents=[b"\0" * 100])
    short.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
    code, details = code_of(short)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 3136 bytes" in details
    code, _ = code_of(M.ModelInferRequest(model_name="cnn", model_version="9", inputs=[t]))
    assert code == grpc.StatusCode.NOT_FOUND
    text = httpx.get(url + "/metrics").text
    assert re.search(r'^onnxpipe_grpc_requests_total\{method="ModelInfer",code="NOT_FOUND"\} [2-9]', text, re.M)
    assert re.search(r'^onnxpipe_model_requests_total\{model="cnn",version="1",protocol="grpc",code="OK"\} [1-9]', text, re.M)
    channel.close()


def test_a_grpc_deadline_drops_the_queued_work(served, hold_model_calls):
    url, target, app, x, _ = served
    with hold_model_calls(app.state.batcher) as (gate, calls):
        c = grpcclient.InferenceServerClient(target)
        inp = grpcclient.InferInput("image", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x[:1])
        first = threading.Thread(target=lambda: c.infer("cnn", [inp], client_timeout=30))
        first.start()
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        inp3 = grpcclient.InferInput("image", [3, 1, 28, 28], "FP32")
        inp3.set_data_from_numpy(x[:3])
        with pytest.raises(Exception, match="(?i)deadline"):   # the client's own deadline or our 504 first
            c.infer("cnn", [inp3], client_timeout=0.3)
        gate.set()
        first.join(30)
        deadline = time.monotonic() + 10
        while (app.state.batcher.queued or app.state.batcher._busy) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [1]   # the 3-row call whose deadline passed was never run
        c.close()


def test_cli_serves_grpc_from_another_directory(tiny_run, tmp_path):
    """`onnxpipe serve RUN --grpc-port 0` with a relative run path from another working directory."""
    root = tiny_run("cnn")
    rel = os.path.relpath(root, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", rel, "--port", "0", "--grpc-port", "0",
                             "--device", "cpu", "--no-access-log"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        target = None
        deadline = time.monotonic() + 60
        while target is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if m := re.search(r"gRPC \(inference.GRPCInferenceService\) on (127\.0\.0\.1:\d+)", line):
                target = m.group(1)
        assert target, "no gRPC address in the start-up log"
        c = grpcclient.InferenceServerClient(target)
        deadline = time.monotonic() + 60
        while not c.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        x = np.load(root / "reference.npz")["inputs"][:2].astype(np.float32)
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(c.infer("cnn", [inp]).as_numpy("logits"),
                                   make_session(root / "model.onnx", device="cpu")(x), rtol=1e-5, atol=1e-5)
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
