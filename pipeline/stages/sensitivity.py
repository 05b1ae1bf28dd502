"""Fitting a lossy build into its accuracy budget by keeping its most sensitive nodes in FP32.

A lossy variant (INT8, FP16) is judged against its FP32 parent on the held-out test split by its
Budget (pipeline/core/policy.py). A variant over budget is rebuilt with the nodes that add the most
error kept in FP32. Per-node error is measured by running the float graph and the quantized graph
side by side on calibration (training) data with intermediate tensors exposed: a node's *added*
error is the relative error at its output minus the relative error already present at its input, so
a node is not blamed for what happened upstream of it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.onnxgraph import COMPUTE_OPS, GraphIndex
from ..core.parity import ParityReport


# --- per-node error between a float graph and its quantized graph ---------------------------------------

def _tensors(model) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def _with_outputs(model, names: list[str]):
    """A copy of `model` that also returns the tensors `names` (float32, any shape)."""
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def _float_tensors(model) -> set[str]:
    """Names of the tensors that ONNX shape inference types as float32 (only those can be compared)."""
    import onnx
    from onnx import TensorProto

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:
        inferred = model
    g = inferred.graph
    return {v.name for v in (*g.value_info, *g.input, *g.output) if v.type.tensor_type.elem_type == TensorProto.FLOAT}


def _rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64).ravel()
    got = np.asarray(got, np.float64).ravel()
    if ref.shape != got.shape:
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def node_errors(float_model: Path, quant_model: Path, inputs: list[tuple[np.ndarray, ...]],
                candidates: list[str] | None = None) -> list[dict]:
    """Per-node error added by quantization, most sensitive first.

    Each entry: {"node", "op", "output_error", "input_error", "added_error"}. `candidates` limits the
    float graph's nodes considered (default: every COMPUTE_OPS node). Tensors are matched by name:
    ORT's quantizers keep the float graph's tensor names for the float values they produce; where a node
    was fused with its activation (QDQ folds Relu into the quantized Conv) the match walks forward through
    that single consumer."""
    import onnx
    import onnxruntime as ort

    fm = onnx.load(str(float_model))
    qm = onnx.load(str(quant_model))
    f_index = GraphIndex.of(fm.graph)
    f_prod, f_cons = f_index.producer, f_index.consumers
    common = _tensors(fm) & _tensors(qm) & _float_tensors(fm)
    graph_inputs = {i.name for i in fm.graph.input}
    initializers = {i.name for i in fm.graph.initializer}

    def downstream(t: str) -> str | None:
        seen = 0
        while t not in common and seen < 4:
            nxt = f_cons.get(t, [])
            if len(nxt) != 1 or not nxt[0].output:
                return None
            t, seen = nxt[0].output[0], seen + 1
        return t if t in common else None

    def upstream(t: str) -> str | None:
        seen = 0
        while t not in common and t not in graph_inputs and seen < 8:
            p = f_prod.get(t)
            data = [i for i in (p.input if p else []) if i and i not in initializers]
            if len(data) != 1:
                return None
            t, seen = data[0], seen + 1
        return t

    nodes = [n for n in fm.graph.node if (n.name in candidates if candidates is not None else n.op_type in COMPUTE_OPS)]
    plan = []
    for n in nodes:
        data_in = next((i for i in n.input if i and i not in initializers), None)
        out_t = downstream(n.output[0]) if n.output else None
        in_t = upstream(data_in) if data_in else None
        if out_t is not None:
            plan.append((n, out_t, in_t))
    watch = sorted({t for _, o, i in plan for t in (o, i) if t and t not in graph_inputs})
    if not watch:
        return []

    def run(model) -> dict[str, list[np.ndarray]]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(_with_outputs(model, watch).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        got: dict[str, list[np.ndarray]] = {t: [] for t in watch}
        for batch in inputs:
            outs = sess.run(watch, dict(zip(names, batch)))
            for t, v in zip(watch, outs):
                got[t].append(np.asarray(v))
        return got

    ref, got = run(fm), run(qm)
    err = {t: _rel_error(np.concatenate([a.ravel() for a in ref[t]]), np.concatenate([b.ravel() for b in got[t]]))
           for t in watch}
    rows = []
    for n, out_t, in_t in plan:
        out_e = err[out_t]
        in_e = 0.0 if (in_t is None or in_t in graph_inputs) else err.get(in_t, 0.0)
        rows.append({"node": n.name, "op": n.op_type, "tensor": out_t, "output_error": round(out_e, 6),
                     "input_error": round(in_e, 6), "added_error": round(max(out_e - in_e, 0.0), 6)})
    rows.sort(key=lambda r: (-r["added_error"], -r["output_error"], r["node"]))
    return rows


# --- the exclusion search ------------------------------------------------------------------------------

@dataclass
class FitResult:
    """Outcome of fitting a lossy build into its budget."""

    path: Path | None                  # the last build (None if nothing was built)
    report: ParityReport | None        # its verdict
    excluded: list[dict] = field(default_factory=list)    # nodes kept in FP32, with their error and why
    attempts: list[dict] = field(default_factory=list)    # every build tried: how many excluded, verdict
    exhausted: bool = False            # every candidate excluded: nothing quantized is left

    @property
    def fits(self) -> bool:
        return bool(self.report) and not self.exhausted


def fit_budget(build: Callable[[list[str]], Path], judge: Callable[[Path], ParityReport],
               rank: Callable[[Path], list[dict]], *, max_rounds: int = 6) -> FitResult:
    """Build with nothing excluded; while over budget, keep the top-k most sensitive nodes in FP32
    (k = 1, 2, 4, ..., ranked once on the fully quantized build), until the build fits, every
    candidate is excluded, or `max_rounds` retries are spent."""
    path = build([])
    report = judge(path)
    result = FitResult(path, report)
    result.attempts.append(_attempt([], report))
    if report or max_rounds < 1:
        return result
    ranking = [r for r in rank(path) if r["added_error"] > 0 or r["output_error"] > 0]
    if not ranking:  # no node shows any error to remove: nothing to exclude
        return result
    k = 1
    for _ in range(max_rounds):
        k = min(k, len(ranking))
        chosen = ranking[:k]
        why = report.budget_line()
        path = build([r["node"] for r in chosen])
        report = judge(path)
        result.path, result.report = path, report
        result.attempts.append(_attempt([r["node"] for r in chosen], report))
        result.excluded = [{**r, "why": f"among the {k} most sensitive nodes after a build {why}"} for r in chosen]
        if k == len(ranking):
            result.exhausted = True
            break
        if report:
            break
        k *= 2
    return result


def _attempt(excluded: list[str], report: ParityReport) -> dict:
    return {"excluded": len(excluded), "passed": bool(report), "agreement": report.agreement,
            "accuracy_drop": report.accuracy_drop, "verdict": report.budget_line()}
