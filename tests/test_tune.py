"""`onnxpipe tune`: a measured sweep over serving settings, the best one within the p99 target written into the run,
used by `onnxpipe serve` (start-up log; flags still win) and by `onnxpipe export-triton` (config.pbtxt, parsed by
Triton's ModelConfig schema), plotted in the report."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from onnxpipe.cli import app
from onnxpipe.runfolder import Run
from onnxpipe.serving.config import TuneConfig
from onnxpipe.serving.tune import choose, confirmed, grid


def point(setting, rps, p99, errors=0, non_200=0, concurrency=8):
    return {"setting": setting, "rps": rps, "p50_ms": p99 / 3, "p99_ms": p99, "errors": errors, "non_200": non_200,
            "ok": int(rps), "concurrency": concurrency}


def test_grid_and_choice_are_pure_functions_of_the_settings_and_measurements():
    g = grid(TuneConfig(threads=(1,), workers=(1, 2), max_batch=(1, 8), max_delay_ms=(0, 2)))
    assert [(s["workers"], s["max_batch"], s["max_delay_ms"]) for s in g] == \
        [(1, 1, 0.0), (1, 8, 0.0), (1, 8, 2.0), (2, 1, 0.0), (2, 8, 0.0), (2, 8, 2.0)]  # no delay without batching
    a, b, c = ({"threads": 1, "workers": w, "max_batch": 8, "max_delay_ms": 2.0} for w in (1, 2, 3))
    points = [point(a, 1000, 4.0), point(b, 1900, 9.0), point(c, 3000, 30.0),       # c: fastest, over the target
              point(b, 2500, 5.0, errors=1), point(a, 2400, 5.0, non_200=3)]         # errors and refusals never win
    assert choose(points, 10.0)["rps"] == 1900
    assert choose(points, 3.0) is None
    tie = [point(b, 1000, 1.0), point(a, 1000, 1.0)]
    assert choose(tie, 10.0)["setting"]["workers"] == 1                              # a tie goes to fewer workers
    lucky = confirmed(point(c, 3000, 8.0), point(c, 1200, 12.0))    # measured again: slower, and over the target
    assert lucky["rps"] == 1200 and lucky["p99_ms"] == 12.0 and len(lucky["measurements"]) == 2
    steady = confirmed(point(b, 1900, 9.0), point(b, 1800, 9.5))
    assert choose([lucky, steady], 10.0) is steady and choose([lucky, steady], 20.0) is steady


def test_tune_writes_the_setting_that_serve_and_export_triton_start_from(copy_of, tmp_path):
    from test_triton_export import parse

    root = copy_of("cnn")
    r = CliRunner().invoke(app, ["tune", str(root), "--threads", "1", "--workers", "1", "--max-batch", "8",
                                 "--max-delay-ms", "1", "--concurrency", "1,4", "--seconds", "0.4", "--warmup-s", "0.1",
                                 "--p99-ms", "500", "--device", "cpu", "--confirm", "1"])
    assert r.exit_code == 0, r.output
    rec = Run.open(root).section("serving")
    sweep = rec["sweep"]
    assert len(sweep) == 2 and all(p["ok"] > 0 and p["errors"] == 0 and p["rps"] > 0 for p in sweep)
    assert [p["concurrency"] for p in sweep] == [1, 4] and all(
        p["setting"] == {"threads": 1, "workers": 1, "max_batch": 8, "max_delay_ms": 1.0} for p in sweep)
    assert sweep[1]["rows_per_call"] >= 1
    best = max(sweep, key=lambda p: p["rps"])   # both are within the generous target: the faster wins
    (again,) = rec["confirmation"]               # ... and is measured once more on a fresh server
    assert again["concurrency"] == best["concurrency"] and again["measurements"][0]["rps"] == best["rps"]
    assert rec["settings"] == best["setting"] and rec["chosen"]["rps"] == min(m["rps"] for m in again["measurements"])
    assert "confirmed: threads 1, workers 1" in r.output
    assert "chosen: threads 1, workers 1" in r.output
    assert "serving_sweep.png" in (root / "report.md").read_text() and (root / "report_files" / "serving_sweep.png").is_file()

    out = tmp_path / "models"
    r = CliRunner().invoke(app, ["export-triton", str(root), str(out)])
    assert r.exit_code == 0, r.output
    cfg, pb = parse((out / "cnn" / "config.pbtxt").read_text())
    s = rec["settings"]
    assert cfg.instance_group[0].count == s["workers"]
    assert cfg.parameters["intra_op_thread_count"].string_value == str(s["threads"])
    if s["max_batch"] > 1:
        assert cfg.max_batch_size == s["max_batch"] and list(cfg.dynamic_batching.preferred_batch_size) == [s["max_batch"]]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == int(s["max_delay_ms"] * 1000)
    r = CliRunner().invoke(app, ["export-triton", str(root), str(out), "--force", "--max-batch", "16", "--instances", "3"])
    cfg, _ = parse((out / "cnn" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 16 and cfg.instance_group[0].count == 3   # flags win over the tuned settings

    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", str(root), "--port", "0", "--device", "cpu",
                             "--max-delay-ms", "3"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "settings:" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert f"max batch {s['max_batch']}, max delay 3 ms, threads {s['threads']}" in line, line
        assert "from `onnxpipe tune`" in line and "max_batch" in line and "max_delay_ms" not in line  # the flag won
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_target_no_setting_meets_is_one_error_line_and_changes_nothing(copy_of):
    root = copy_of("cnn")
    r = CliRunner().invoke(app, ["tune", str(root), "--threads", "1", "--workers", "1", "--max-batch", "1",
                                 "--concurrency", "2", "--seconds", "0.3", "--warmup-s", "0", "--p99-ms", "0.001"])
    assert r.exit_code == 1
    assert re.search(r"error: no setting kept p99 <= 0.001 ms without errors; the lowest p99 measured was", r.output)
    rec = Run.open(root).section("serving")
    assert "settings" not in rec and len(rec["last_sweep"]["sweep"]) == 1


@pytest.mark.parametrize("binary", [True, False])
def test_the_load_generator_reads_every_answer_whole(tiny_run, binary):
    """Each closed-loop client's answers are framed right (binary answers carry two length headers) and correct."""
    import numpy as np

    from onnxpipe.core.runtime import make_session
    from onnxpipe.serving import loadgen
    from onnxpipe.serving.app import ServeConfig, serve_in_thread
    from onnxpipe.serving.model import ServedModel

    root = tiny_run("cnn")
    x = np.load(root / "reference.npz")["inputs"][:1].astype(np.float32)
    want = make_session(root / "model.onnx", device="cpu")(x)
    seen = []

    def check(head, body):
        doc, blob = loadgen.split_answer(head, body)
        out = doc["outputs"][0]
        seen.append(np.asarray(out["data"], np.float32) if "data" in out else np.frombuffer(blob, "<f4"))

    model = ServedModel.prepare(Run.open(root), device="cpu", threads=1)
    with serve_in_thread(model, ServeConfig(port=0, access_log=False)) as (url, _):
        assert model.wait_loaded(60)
        port = int(url.rsplit(":", 1)[1])
        r = loadgen.run_load("127.0.0.1", port, loadgen.infer_request("cnn", "image", x, binary=binary), 4, 0.5, check=check)
    assert r.errors == 0 and r.ok == len(seen) == len(r.latencies_ms) > 10 and set(r.statuses) == {200}
    for got in seen:
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
