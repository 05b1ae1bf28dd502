"""Where the time goes: the profile summary adds up, names the graph's real ops, and reads thread use."""
from __future__ import annotations

import numpy as np
import pytest

from onnxpipe.core.profile import BETWEEN, profile_session, summarize_events
from onnxpipe.runfolder import Run


def _node(name, op, ts, dur, sub_runs=0):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "thread_scheduling_stats": {"sub_threads": {"t1": {"num_run": sub_runs}}}}}


def test_summary_of_hand_made_events():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},          # warm-up, left out
        _node("c", "Conv", 10, 900),
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 1000},
        _node("c", "Conv", 2010, 600, sub_runs=1), _node("q", "QuantizeLinear", 2700, 100),
        _node("t", "Transpose", 2850, 100),
        {"cat": "Session", "name": "model_run", "ts": 4000, "dur": 1000},
        _node("c", "Conv", 4010, 600, sub_runs=1), _node("q", "QuantizeLinear", 4700, 100),
        _node("t", "Transpose", 4850, 100),
    ]
    s = summarize_events(events, skip_runs=1)
    assert s["runs"] == 2 and s["run_ms"] == pytest.approx(1.0)
    assert s["by_op"] == pytest.approx({"Conv": 0.6, "QuantizeLinear": 0.1, "Transpose": 0.1, BETWEEN: 0.2})
    assert sum(s["by_op"].values()) == pytest.approx(s["run_ms"])
    assert s["shares"]["qdq"] == pytest.approx(0.125) and s["shares"]["reorder_transpose"] == pytest.approx(0.125)
    assert s["parallel_share"] == pytest.approx(0.75)   # only the convolutions split their work
    assert s["top_nodes"][0] == {"node": "c", "op": "Conv", "ms": pytest.approx(0.6)}
    with pytest.raises(ValueError, match="warm-up"):
        summarize_events(events[:2], skip_runs=1)


def test_a_real_profile_adds_up_and_names_the_graphs_ops(tiny_run, tmp_path):
    import onnx

    from onnxpipe.core.runtime import make_session
    from onnxpipe.core.timing import time_interleaved

    run = Run.open(tiny_run("cnn"))
    x = np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)
    prof = profile_session(run.path("onnx"), [x], threads=1, runs=15)
    assert sum(prof["by_op"].values()) == pytest.approx(prof["run_ms"], rel=1e-6)
    optimized = tmp_path / "as_run.onnx"   # the graph ORT builds at level all: what the profile times
    make_session(run.path("onnx"), device="cpu", threads=1, opt_level="all", optimized_model_path=optimized)
    graph_ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert set(prof["by_op"]) - {BETWEEN} <= graph_ops and "Conv" in prof["by_op"]
    assert prof["parallel_share"] == 0.0   # one thread: no sub-thread ever runs
    session = make_session(run.path("onnx"), device="cpu", threads=1, spinning=False)
    measured = time_interleaved({"onnx": lambda: session(x)}, batch=16, warmup=3, runs=15)["onnx"].p50
    assert 0.33 < prof["run_ms"] / measured < 3.0, (prof["run_ms"], measured)


def test_torch_profiles_leave_no_kineto_chatter_on_stderr_and_keep_real_messages(capfd):
    import os
    import sys

    import torch

    from onnxpipe.core.profile import _without_kineto_chatter, profile_torch

    net = torch.nn.Linear(4, 3)
    prof = profile_torch(lambda x: net(torch.from_numpy(x)), [np.ones((2, 4), np.float32)], runs=2, warmup=1)
    assert prof["total_ms"] > 0 and any("linear" in op or "addmm" in op for op in prof["by_op"])
    with _without_kineto_chatter():
        os.write(2, b"USDT:2026 x.cpp:1] profiler_start\nreal native warning\n")
        print("python warning", file=sys.stderr)
    err = capfd.readouterr().err
    assert "USDT:" not in err and "profiler_start" not in err
    assert "real native warning" in err and "python warning" in err
