"""Static INT8 for image models: all of the graph in INT8, or its input conv block kept in float (layer 3).

Profiled on the default CNN (onnxpipe bench --profile, batch 64, 1 thread): in the all-INT8 build the
first QLinearConv, on the 1-channel input (K = 1 x 3 x 3), took 1.7-1.9 ms of a 3.1 ms call, six times
the float Conv's 0.31 ms, while the second conv ran 3x faster in INT8 than in float. Keeping the first
block in float alone was slower still (0.55x FP32): ONNX Runtime moved the Q above the float MaxPool,
which then ran on uint8 in NCHW (4.9 ms). With the block's Relu after its MaxPool
(core/onnxgraph.pool_before_relu, exact) the Q stays put and the build ran 2.36x FP32 at 1 thread and
2.13x at 2, against 1.56x and 1.11x all-INT8.

Which build is faster depends on the model and the machine, so it is measured, never assumed: both are
built from the same calibration, timed interleaved (core/timing) at every thread count select will try
and at batch 1 and LAYOUT_BATCH, and the lower geometric mean of the p50s wins (all-INT8 on a near tie:
it has fewer float nodes). The quantizer records both timings, the block and why."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.data import Rows
from ..core.onnxgraph import input_conv_block, pool_before_relu
from ..core.runtime import make_session
from ..core.timing import NEAR_TIE, thread_candidates, time_interleaved
from .select import score

ALL_INT8 = "all_int8"
INPUT_BLOCK_FLOAT = "input_block_float"
LAYOUT_BATCH = 64        # the batch where INT8's speed-up counts most; batch 1 is timed too
RUNS, WARMUP, BLOCK = 12, 2, 3


def input_block_float_model(pre: Path, out: Path) -> list[str]:
    """Write `pre` with its input conv block arranged to stay float (Relu after MaxPool) to `out`;
    returns the block's node names ([] and nothing written when the graph does not start with a Conv)."""
    import onnx

    model = onnx.load(str(pre))
    block = input_conv_block(model.graph)
    if not block:
        return []
    pool_before_relu(model.graph, block)
    onnx.save(model, str(out))
    return block


def _batch_of(rows: Rows, batch: int) -> tuple:
    """`batch` rows (repeating the given ones where there are fewer)."""
    reps = -(-batch // len(rows))
    idx = np.tile(np.arange(len(rows)), reps)[:batch]
    return rows[idx].arrays


def time_layouts(paths: dict[str, Path], rows: Rows, *, threads: tuple[int, ...] | None = None,
                 batches: tuple[int, ...] = (1, LAYOUT_BATCH)) -> dict[str, dict[str, float]]:
    """{build: {"<threads>t/b<batch>": p50 ms}}: every build timed interleaved per cell."""
    out: dict[str, dict[str, float]] = {name: {} for name in paths}
    for t in threads or thread_candidates():
        sessions = {name: make_session(p, device="cpu", threads=t, spinning=False) for name, p in paths.items()}
        for b in batches:
            x = _batch_of(rows, b)
            lat = time_interleaved({name: (lambda s=s: s(*x)) for name, s in sessions.items()}, batch=b,
                                   warmup=WARMUP, runs=RUNS, block=BLOCK)
            for name, l in lat.items():
                out[name][f"{t}t/b{b}"] = l.p50
    return out


def choose_layout(timed: dict[str, dict[str, float]], margin: float = NEAR_TIE) -> tuple[str, str]:
    """(build, why) from recorded timings: the lower geometric mean of p50 over the shared cells; the
    all-INT8 build unless the other is more than `margin` faster. Pure: tested without a clock."""
    cells = sorted(set.intersection(*(set(v) for v in timed.values())))
    if not cells or ALL_INT8 not in timed or len(timed) == 1:
        return ALL_INT8, "only the all-INT8 build was timed"
    gm = {name: score({c: v[c] for c in cells}, "geomean") for name, v in timed.items()}
    speedup = gm[ALL_INT8] / gm[INPUT_BLOCK_FLOAT]
    if speedup > 1 + margin:
        return INPUT_BLOCK_FLOAT, (f"the input conv block in float is {speedup:.2f}x faster (geometric mean of "
                                   f"p50 over {', '.join(cells)})")
    return ALL_INT8, (f"all-INT8 kept: the input block in float is {speedup:.2f}x of its speed (geometric mean "
                      f"of p50 over {', '.join(cells)}; it must be > {1 + margin:.2f}x)")
