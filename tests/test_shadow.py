"""Live parity (--shadow-rate): sampled requests also run on the served variant's FP32 parent, off the request path;
agreement and max-abs appear in /metrics; a deliberately perturbed variant drops them below the budget recorded along
its lineage, which the metadata and the log report while readiness stays as it was."""
from __future__ import annotations

import json
import re
import time

import httpx
import numpy as np
import pytest

from onnxpipe.core.data import reload_dataset
from onnxpipe.runfolder import Run
from onnxpipe.serving.app import ServeConfig, serve_in_thread
from onnxpipe.serving.model import ServedModel


@pytest.fixture(scope="module")
def int8_static(tiny_run, copy_run_to, tmp_path_factory):
    """A tiny CNN run whose selected variant is static INT8, built with a 0.9 agreement budget."""
    from onnxpipe.stages.configs import QuantizeConfig
    from onnxpipe.stages.quantize import quantize

    run = Run.open(copy_run_to(tiny_run("cnn"), tmp_path_factory.mktemp("shadow")))
    quantize(run, QuantizeConfig(mode="static", calib_samples=32, max_accuracy_drop=100.0, min_agreement=0.9),
             reload_dataset(run.dataset_info))
    run.set_selected("int8_static")
    return run.root


def ask(client: httpx.Client, x: np.ndarray) -> None:
    r = client.post("/v2/models/cnn/infer", json={"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                                              "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text


def gauge(text: str, name: str) -> float | None:
    m = re.search(rf'^{name}\{{model="cnn",version="1"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_shadow_metrics_appear_and_drop_when_a_perturbed_variant_disagrees(int8_static, caplog):
    root = int8_static
    x = np.load(root / "reference.npz")["inputs"].astype(np.float32)
    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    with caplog.at_level("INFO", logger="onnxpipe.serve"), \
            serve_in_thread(model, ServeConfig(port=0, shadow_rate=1.0, shadow_window=40, access_log=False)) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as c:
            assert model.wait_loaded(60) and model.ready, model.error
            shadow = c.get("/v2/models/cnn").json()["parameters"]["shadow"]
            assert shadow["parent"] == "onnx" and shadow["rule"] == "top-1 agreement" and shadow["budget"] == 0.9

            def wait_rows(n):
                deadline = time.monotonic() + 30
                while True:
                    text = c.get("/metrics").text
                    if (gauge(text, "onnxpipe_shadow_rows_total") or 0) >= n:
                        return text
                    assert time.monotonic() < deadline, text[-2000:]
                    time.sleep(0.02)

            for i in range(40):
                ask(c, x[i:i + 1])
            text = wait_rows(40)
            assert gauge(text, "onnxpipe_shadow_agreement") >= 0.9
            assert 0 < gauge(text, "onnxpipe_shadow_max_abs") < 5          # INT8 moves the logits a little
            assert gauge(text, "onnxpipe_shadow_budget") == 0.9 and gauge(text, "onnxpipe_shadow_within_budget") == 1
            assert c.get("/v2/models/cnn").json()["parameters"]["shadow"]["status"] == "within budget"

            real = app.state.batcher.run_batch
            app.state.batcher.run_batch = lambda arrays: [np.roll(o, 3, axis=1) for o in real(arrays)]  # perturbed
            for i in range(40, 80):
                ask(c, x[i:i + 1])
            text = wait_rows(80)
            assert gauge(text, "onnxpipe_shadow_agreement") < 0.5       # the last 40 rows: nearly all disagree
            assert gauge(text, "onnxpipe_shadow_within_budget") == 0
            assert gauge(text, "onnxpipe_shadow_max_abs") > gauge(text, "onnxpipe_shadow_budget")
            shadow = c.get("/v2/models/cnn").json()["parameters"]["shadow"]
            assert shadow["status"] == "below budget" and shadow["rows"] == 40 and shadow["rows_total"] == 80
            assert c.get("/v2/health/ready").status_code == 200        # readiness is not changed by it
            assert c.get("/v2/models/cnn/ready").json()["ready"] is True
    warned = [r.getMessage() for r in caplog.records if "below its budget 0.9" in r.getMessage()]
    assert len(warned) == 1 and "int8_static" in warned[0] and "stays ready" in warned[0]


def test_a_variant_without_an_fp32_parent_is_served_and_says_why_there_is_no_shadow(tiny_run):
    model = ServedModel.prepare(Run.open(tiny_run("cnn")), device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0, shadow_rate=0.5, access_log=False)) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as c:
            assert model.wait_loaded(60) and model.ready
            shadow = c.get("/v2/models/cnn").json()["parameters"]["shadow"]
            assert shadow["status"] == "off" and "no FP32 ONNX ancestor" in shadow["error"]
            ask(c, np.zeros((1, 1, 28, 28), np.float32))
