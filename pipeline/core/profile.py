"""Where a variant's time goes: ONNX Runtime's profiler per node, torch.profiler for eager (layer 2).

`profile_session(path, inputs, threads=...)` runs an ONNX file with profiling on and summarizes it:

    run_ms          median wall time of one call (ORT's `model_run` event)
    by_op           {op type: ms per call}, the graph ORT really ran (after its fusions and layout passes),
                    plus "(between kernels)": the call's time no kernel accounts for (scheduling, copies)
    top_nodes       the slowest nodes: name, op type, ms per call
    shares          of the kernel time: Q/DQ nodes (quantize / dequantize), transposes and layout reorders,
                    and NCHWc layout reorders alone
    parallel_share  of the kernel time, the share spent in nodes where an intra-op sub-thread ran: near 0
                    means the extra threads sat idle (the node's kernel did not split its work)
    serial_by_op    {op type: ms per call} of the kernel time in which no sub-thread ran, slowest first:
                    with several threads, the kernels that held the others idle

The by_op entries sum to run_ms by construction, so a table of them adds up to the measured call.
`profile_torch(fn, inputs)` gives torch.profiler's table (self CPU ms per call by aten op) for eager."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})          # NCHWc blocking, inserted by ORT at level all
REORDER_OPS = LAYOUT_OPS | {"Transpose"}
BETWEEN = "(between kernels)"


def summarize_events(events: list[dict], *, skip_runs: int = 0, top: int = 10) -> dict:
    """The summary (see the module docstring) of an ORT profile's events; the first `skip_runs` calls are
    left out (warm-up)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) <= skip_runs:
        raise ValueError(f"the profile holds {len(runs)} call(s); {skip_runs} are warm-up")
    kept = runs[skip_runs:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in kept]
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[tuple[str, str], float] = defaultdict(float)
    serial: dict[str, float] = defaultdict(float)
    parallel = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(start <= e["ts"] <= end for start, end in windows):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"]
        by_node[(e["name"].removesuffix("_kernel_time"), op)] += e["dur"]
        subs = (e["args"].get("thread_scheduling_stats") or {}).get("sub_threads") or {}
        if any(int(s.get("num_run", 0)) > 0 for s in subs.values()):
            parallel += e["dur"]
        else:
            serial[op] += e["dur"]
    n = len(kept)
    run_ms = statistics.median(r["dur"] for r in kept) / 1000.0
    kernel_ms = sum(by_op.values()) / n / 1000.0
    table = {op: us / n / 1000.0 for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}
    total_kernel = sum(by_op.values()) or 1.0
    mean_run_ms = sum(r["dur"] for r in kept) / n / 1000.0
    table[BETWEEN] = max(0.0, mean_run_ms - kernel_ms)
    # scale to the median call so the table sums to run_ms (the kernels' mix is the mean call's)
    scale = run_ms / max(sum(table.values()), 1e-12)
    table = {k: v * scale for k, v in table.items()}
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1])[:top]
    return {
        "runs": n, "run_ms": run_ms, "kernel_ms": kernel_ms * scale, "by_op": table,
        "top_nodes": [{"node": name, "op": op, "ms": us / n / 1000.0 * scale} for (name, op), us in nodes],
        "shares": {"qdq": sum(v for k, v in by_op.items() if k in QDQ_OPS) / total_kernel,
                   "reorder_transpose": sum(v for k, v in by_op.items() if k in REORDER_OPS) / total_kernel,
                   "layout": sum(v for k, v in by_op.items() if k in LAYOUT_OPS) / total_kernel},
        "parallel_share": parallel / total_kernel,
        "serial_by_op": {op: us / n / 1000.0 * scale for op, us in sorted(serial.items(), key=lambda kv: -kv[1])[:top]},
    }


def profile_session(path: Path, inputs: Sequence[np.ndarray], *, threads: int, runs: int = 20, warmup: int = 3,
                    opt_level: str = "all") -> dict:
    """Profile `runs` calls of the ONNX file at `path` (after `warmup` untimed ones) at `threads` threads,
    on the CPU, with the session options every timing uses (core/runtime.make_session, not spinning)."""
    from .runtime import make_session

    with tempfile.TemporaryDirectory(prefix="onnxpipe-profile-") as tmp:
        session = make_session(path, device="cpu", threads=threads, opt_level=opt_level, spinning=False,
                               profile_prefix=Path(tmp) / "ort")
        for _ in range(warmup + runs):
            session.run(*inputs)
        events = json.loads(Path(session.inner.end_profiling()).read_text())
    out = summarize_events(events, skip_runs=warmup)
    out["threads"] = threads
    return out


def op_shares(prof: dict, top: int = 3) -> list[tuple[str, float]]:
    """[(op, share of the call)] of the `top` slowest op types of a profile (ONNX or torch)."""
    total = prof.get("run_ms") or prof.get("total_ms") or sum(prof["by_op"].values()) or 1.0
    ops = [(op, ms / total) for op, ms in prof["by_op"].items() if op != BETWEEN]
    return sorted(ops, key=lambda kv: -kv[1])[:top]


def profile_line(prof: dict, top: int = 3) -> str:
    """'Conv 62 %, ReorderInput 14 %, MaxPool 9 %; Q/DQ 0 %, reorder/transpose 14 %; on >1 thread 0 %'."""
    head = ", ".join(f"{op} {100 * share:.0f} %" for op, share in op_shares(prof, top))
    if "shares" not in prof:  # torch.profiler's table
        return head + " (torch.profiler, self CPU time)"
    sh = prof["shares"]
    line = f"{head}; Q/DQ {100 * sh['qdq']:.0f} %, reorder/transpose {100 * sh['reorder_transpose']:.0f} %"
    if prof.get("threads", 1) > 1:
        line += f"; on >1 thread {100 * prof['parallel_share']:.0f} %"
    return line


KINETO_CHATTER = ("USDT:", "STAGE:")   # libkineto's own start/stop lines, written to fd 2 on every profile


@contextlib.contextmanager
def _without_kineto_chatter():
    """Run the block with the process's stderr (fd 2) captured, then write back every captured line except
    libkineto's start/stop chatter: a real message from native code still reaches the user."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [ln for ln in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith(KINETO_CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))


def profile_torch(fn, inputs: Sequence[np.ndarray], *, runs: int = 10, warmup: int = 3, top: int = 10) -> dict:
    """torch.profiler's op table of a torch predictor: {op: self CPU ms per call}, the slowest `top`."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn(*inputs)
    with _without_kineto_chatter(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn(*inputs)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"runs": runs, "by_op": {e.key: e.self_cpu_time_total / runs / 1000.0 for e in rows[:top]},
            "total_ms": sum(e.self_cpu_time_total for e in rows) / runs / 1000.0}
