"""Work per row of an ONNX graph: floating-point FLOPs and integer ops of the heavy operators.

Counted (2 ops per multiply-accumulate; element-wise ops, pooling and normalization are left out
because they are a few percent of the work and never the matmul-bound part):

  Conv, FusedConv, ConvInteger, QLinearConv                 out_elems * Cin/group * kh * kw
  Gemm, FusedGemm, QGemm, MatMul, FusedMatMul, MatMulInteger,
  QLinearMatMul, MatMulIntegerToFloat, DynamicQuantizeMatMul  out_elems * K
  LSTM, GRU, RNN, DynamicQuantizeLSTM                        T * N * (|W| + |R|)  (all gates, directions)
  Attention (ONNX), MultiHeadAttention, Attention (com.microsoft)  QK^T + AV (+ the fused projection)

A float Conv / MatMul / Gemm whose data and weight inputs both come from DequantizeLinear (a QDQ
graph) counts as integer work: ONNX Runtime fuses it into its integer kernel.

Shapes come from running the graph once in ONNX Runtime with every intermediate tensor exposed as
an output, so contrib operators (whose shapes onnx's shape inference does not know) count too.
Nodes inside subgraphs (If / Loop / Scan bodies) are not counted."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ArtifactError, ConfigError
from .onnxgraph import INTEGER_KERNELS, GraphIndex

CONV = {"Conv", "FusedConv", "ConvInteger", "QLinearConv"}
GEMM = {"Gemm", "FusedGemm", "QGemm"}
MATMUL = {"MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
ATTENTION = {"Attention", "MultiHeadAttention"}
INTEGER_OPS = INTEGER_KERNELS
# Index of the weight input of each quantized op (QLinear* carry scale / zero point inputs in between).
WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}


@dataclass
class FlopCount:
    """Work per row (one sample) of a graph, split by arithmetic kind."""

    float_flops: float = 0.0
    int_ops: float = 0.0
    by_op: dict[str, float] = field(default_factory=dict)
    rows: int = 1                       # batch the graph was run at to read its shapes

    @property
    def total(self) -> float:
        return self.float_flops + self.int_ops

    @property
    def kind(self) -> str:
        """'int8' when most of the work is integer, else 'fp32': which machine peak the variant is held to."""
        return "int8" if self.int_ops > self.float_flops else "fp32"

    def add(self, op: str, ops: float, integer: bool) -> None:
        if integer:
            self.int_ops += ops
        else:
            self.float_flops += ops
        key = f"{op} (int)" if integer and op not in INTEGER_OPS else op
        self.by_op[key] = self.by_op.get(key, 0.0) + ops

    def to_json(self) -> dict:
        return {"float_flops": self.float_flops, "int_ops": self.int_ops, "total": self.total, "kind": self.kind,
                "by_op": dict(sorted(self.by_op.items()))}


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _synthesize_inputs(model, dims: dict[str, int]) -> list[np.ndarray]:
    """Random inputs of the graph's declared types; symbolic dims come from `dims`."""
    from onnx import helper

    initializers = {i.name for i in model.graph.initializer}
    out = []
    rng = np.random.default_rng(0)
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        shape = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                raise ConfigError(f"input {inp.name!r} has a symbolic dimension {d.dim_param!r}: pass its size "
                                  f"(known: {', '.join(dims) or 'none'})")
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.integer):
            out.append(np.zeros(shape, dtype=dtype))  # token id 0 always exists
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def _rows(model, inputs: Sequence[np.ndarray]) -> int:
    """Batch size of the inputs: the axis the graph names 'batch', else axis 0."""
    initializers = {i.name for i in model.graph.initializer}
    first = next((i for i in model.graph.input if i.name not in initializers), None)
    if first is None or not len(inputs) or not np.ndim(inputs[0]):
        return 1
    dims = [d.dim_param for d in first.type.tensor_type.shape.dim]
    axis = dims.index("batch") if "batch" in dims else 0
    return int(np.shape(inputs[0])[axis])


def tensor_shapes(model, inputs: Sequence[np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the main graph, read from one unoptimized ONNX Runtime run."""
    import onnx

    from .runtime import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in declared:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                declared.add(name)
    shapes = {i.name: tuple(int(d) for d in i.dims) for i in probe.graph.initializer}
    # Feed each input in its declared type (uint8 for integer graphs, float16 for fp16 ones).
    declared = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in probe.graph.input}
    with tempfile.TemporaryDirectory(prefix="onnxpipe-flops-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(probe, path)
        session = make_session(path, device="cpu", threads=1, opt_level="disable")
        feeds = {name: np.ascontiguousarray(x, dtype=declared[name]) for name, x in zip(session.input_names, inputs)}
        outputs = session.inner.run(session.output_names, feeds)
    for name, value in zip(session.output_names, outputs):
        shapes[name] = tuple(np.shape(value))
    for name, x in feeds.items():
        shapes[name] = tuple(np.shape(x))
    return shapes


def count_flops(model_or_path, inputs: Sequence[np.ndarray] | None = None, *, dims: dict[str, int] | None = None) -> FlopCount:
    """FLOPs and integer ops per row of an ONNX model (a path or a ModelProto).

    `inputs` are example inputs of any batch size; without them, inputs are synthesized from the declared
    shapes with `dims` giving the symbolic ones (default batch 1). The count is divided by the batch."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        try:
            model = onnx.load(str(model_or_path))
        except Exception as e:  # onnx raises DecodeError / OSError variants
            raise ArtifactError(f"cannot read ONNX model {model_or_path}: {e}") from None
    else:
        model = model_or_path
    if inputs is None:
        inputs = _synthesize_inputs(model, {"batch": 1, **(dims or {})})
    rows = _rows(model, inputs)
    shapes = tensor_shapes(model, inputs)
    producers = GraphIndex.of(model.graph).producer

    def from_dq(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    count = FlopCount(rows=rows)
    for node in model.graph.node:
        op = node.op_type
        if op in CONV | GEMM | MATMUL:
            integer = op in INTEGER_OPS or (len(node.input) > 1 and from_dq(node.input[0]) and from_dq(node.input[1]))
            count.add(op, 2.0 * _matmul_like_macs(node, shapes), integer)
        elif op in RECURRENT:
            count.add(op, 2.0 * _recurrent_macs(node, shapes), op in INTEGER_OPS)
        elif op in ATTENTION:
            count.add(op, 2.0 * _attention_macs(node, shapes), False)
    count.float_flops /= rows
    count.int_ops /= rows
    count.by_op = {k: v / rows for k, v in count.by_op.items()}
    return count


def _matmul_like_macs(node, shapes) -> float:
    op = node.op_type
    out = shapes[node.output[0]]
    if op in CONV:
        w = shapes[node.input[WEIGHT_INPUT.get(op, 1)]]
        return float(np.prod(out)) * float(np.prod(w[1:]))       # every output element: Cin/group * kh * kw MACs
    a = shapes[node.input[0]]
    if op in GEMM:
        k = a[0] if _attr(node, "transA", 0) else a[1]
    elif op == "FusedMatMul" and _attr(node, "transA", 0):
        k = a[-2]
    else:
        k = a[-1]
    return float(np.prod(out)) * float(k)


def _recurrent_macs(node, shapes) -> float:
    x, w, r = (shapes[node.input[i]] for i in range(3))
    layout = _attr(node, "layout", 0)
    steps, batch = (x[1], x[0]) if layout == 1 else (x[0], x[1])
    # |W| = directions * gates*H * I and |R| = directions * gates*H * H: every gate of every direction, every step.
    return float(steps) * float(batch) * (float(np.prod(w)) + float(np.prod(r)))


def _attention_macs(node, shapes) -> float:
    """QK^T and AV of (multi-head) attention; com.microsoft Attention also fuses the QKV projection."""
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        x, w = shapes[node.input[0]], shapes[node.input[1]]          # (B, S, Din), (Din, 3D)
        b, s, d_in = x
        hidden = w[1] // 3
        return float(b * s * d_in * w[1]) + 2.0 * b * s * s * hidden
    q, k, v = (shapes[node.input[i]] for i in range(3))
    if len(q) == 4:                                                   # (B, heads, S, d)
        b, heads, sq, d = q
        skv, dv = k[2], v[3]
        return float(b * heads * sq * skv) * (d + dv)
    b, sq, q_hidden = q                                              # (B, S, heads*d)
    skv, v_hidden = k[1], v[2]
    q_heads = _attr(node, "q_num_heads", None) or _attr(node, "num_heads", 1)
    kv_heads = _attr(node, "kv_num_heads", None) or q_heads
    return float(b * sq * skv) * (q_hidden + v_hidden * q_heads / kv_heads)


def count_variant_flops(run, variant: str) -> FlopCount | None:
    """Work per row of a run's variant, at the model's trained sequence length.

    A torch variant is counted through the ONNX variant exported from it (the same network);
    None when there is no such variant."""
    art = run.artifact(variant)
    if art.format != "onnx":
        exported = [v for v in run.variants()
                    if run.artifact(v).parent == variant and run.artifact(v).format == "onnx" and not run.artifact(v).lossy]
        if not exported:
            return None
        variant = exported[0]
    spec, cfg = run.spec_of(variant), run.model_config_of(variant)
    return count_flops(run.path(variant), [t.numpy() for t in spec.example_inputs(cfg, batch=1).values()])


def torch_flops(module, inputs) -> float:
    """FLOPs per row of a torch module (2 per multiply-accumulate), counted the way `count_flops` counts the
    exported graph: a copy of the module runs on the meta device (no arithmetic, no memory) under torch's
    FlopCounterMode, where RNNs and scaled_dot_product_attention decompose into the matmuls it counts (on the
    CPU they are single kernels it does not see). `inputs`: example tensors of any batch size by input name
    (ModelSpec.example_inputs), passed as every stage passes them (models.call_model).

    A forward that reads values from its inputs (`.item()`, as Hugging Face's attention masks do) cannot run
    on the meta device; it is counted running on the CPU instead (its fused kernels, if any, then count as
    what FlopCounterMode sees of them)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import call_model

    rows = max(int(next(iter(inputs.values())).shape[0]), 1)
    try:
        meta = copy.deepcopy(module).to("meta").eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(meta, {k: t.to("meta") for k, t in inputs.items()})
    except (RuntimeError, NotImplementedError):   # data-dependent: "cannot be called on meta tensors"
        cpu = copy.deepcopy(module).to("cpu").eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(cpu, {k: t.to("cpu") for k, t in inputs.items()})
    return float(counter.get_total_flops()) / rows
