"""Per-node divergence of every lossy ONNX variant from its ONNX parent, for the report's chart.

The measurement is node_errors of pipeline/stages/sensitivity.py (the quantizer's own sensitivity
ranking: relative error of each compute node's output, and the error it adds over its input), run on a
few training samples, never test data. It is stored as metrics[v]["node_divergence"] and computed only where missing."""
from __future__ import annotations

from ..core.data import Dataset
from ..core.onnxgraph import QUANTIZED_OPS, op_types
from ..runfolder import Run

SAMPLES = 64
BATCH = 32
KEEP = 50          # the worst nodes are what a reader needs; the manifest stays small


def quantized_children(run: Run) -> list[str]:
    """Quantized ONNX variants whose parent is a float ONNX variant (so both graphs run side by side)."""
    out = []
    for v in run.variants():
        art = run.artifact(v)
        if not (art.lossy and art.format == "onnx" and art.parent and run.has(art.parent)
                and run.artifact(art.parent).format == "onnx"):
            continue
        if op_types(run.path(v)) & QUANTIZED_OPS:
            out.append(v)
    return out


def record_node_divergence(run: Run, ds: Dataset, *, samples: int = SAMPLES, force: bool = False) -> list[str]:
    """Fill metrics[v]["node_divergence"] for the lossy ONNX variants that lack it; return those measured."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph

    from .sensitivity import node_errors

    x = ds.x_train[:samples]
    batches = [x[i:i + BATCH].arrays for i in range(0, len(x), BATCH)]
    measured = []
    for v in quantized_children(run):
        if not force and (run.metrics(v).get("node_divergence") is not None
                          or run.metrics(v).get("node_divergence_error")):
            continue
        try:
            rows = node_errors(run.path(run.artifact(v).parent), run.path(v), batches)
        except (Fail, InvalidArgument, InvalidGraph) as e:  # a graph ORT cannot run with its tensors exposed
            run.set_metrics(v, node_divergence_error=str(e).splitlines()[0][:300])
            continue
        run.set_metrics(v, node_divergence=rows[:KEEP],
                        node_divergence_source=f"onnxpipe report: {len(x)} training samples vs parent")
        measured.append(v)
    return measured
