"""What every graph pass needs to know about an ONNX graph: one index of producers and consumers, and
the one list of operator families (fused, attention, quantized, integer kernels, compute ops).

Used by the attention fold, the quantizer's per-node sensitivity, the FLOP counter, the optimizer's
fusion summary and the report's divergence chart."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Ops that only exist after ORT's fusions (com.microsoft contrib ops and fused forms).
FUSED_OPS = frozenset({
    "FusedConv", "FusedGemm", "FusedMatMul", "BiasGelu", "FastGelu", "Gelu", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "BiasSoftmax", "QuickGelu", "EmbedLayerNormalization",
    "MultiHeadAttention", "GroupQueryAttention", "Attention", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QLinearConv", "QLinearMatMul", "NhwcConv", "BiasAdd",
})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
# Integer kernels ONNX Runtime runs (dynamic and static INT8, with or without QDQ fusion).
INTEGER_KERNELS = frozenset({
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "QLinearMatMul",
    "QLinearConv", "MatMulIntegerToFloat", "QGemm", "QAttention",
})
# Every operator that only a quantized graph holds: the integer kernels and the (de)quantize nodes.
QUANTIZED_OPS = INTEGER_KERNELS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Ops whose quantization changes numerics (weights or a matmul-like kernel): the exclusion candidates.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "LSTM", "GRU", "Gather")


# Nodes whose kernel does most of a graph's work: what a parallel executor would run side by side.
HEAVY_OPS = frozenset({"Conv", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum"}) | INTEGER_KERNELS | ATTENTION_OPS | {
    "FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv", "DynamicQuantizeLSTM"}


def bare(op: str) -> str:
    """'com.microsoft.Attention' -> 'Attention'."""
    return op.rsplit(".", 1)[-1]


@dataclass
class GraphIndex:
    """Producers and consumers of every tensor of a graph, its initializers and graph outputs."""

    graph: object
    producer: dict = field(default_factory=dict)       # tensor -> node that writes it
    consumers: dict = field(default_factory=dict)      # tensor -> [nodes that read it]
    initializers: set = field(default_factory=set)
    outputs: set = field(default_factory=set)
    inputs: set = field(default_factory=set)

    @classmethod
    def of(cls, graph) -> "GraphIndex":
        idx = cls(graph)
        for n in graph.node:
            for o in n.output:
                idx.producer[o] = n
            for i in n.input:
                idx.consumers.setdefault(i, []).append(n)
        idx.initializers = {t.name for t in graph.initializer}
        idx.outputs = {o.name for o in graph.output}
        idx.inputs = {i.name for i in graph.input}
        return idx

    def used_once(self, tensor: str) -> bool:
        """Read by exactly one node and not a graph output."""
        return len(self.consumers.get(tensor, [])) == 1 and tensor not in self.outputs

    def constant(self, name: str):
        """The value of an initializer or Constant node output, as numpy; None if it is computed."""
        from onnx import numpy_helper

        for t in self.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute:
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def tensors(self) -> set[str]:
        return {o for n in self.graph.node for o in n.output} | self.inputs


def parallel_branches(graph) -> int:
    """The most compute nodes (HEAVY_OPS) at one depth of the graph, depth being the longest path from
    the inputs. Nodes at one depth never depend on each other (an ancestor is always shallower), so a
    value above 1 means ONNX Runtime's parallel executor has independent work to run at once."""
    idx = GraphIndex.of(graph)
    depth: dict[str, int] = {}
    per_depth: Counter = Counter()
    for n in graph.node:  # ONNX graphs are stored in topological order
        d = 1 + max((depth.get(i, 0) for i in n.input if i in idx.producer), default=0)
        for o in n.output:
            depth[o] = d
        if bare(n.op_type) in HEAVY_OPS:
            per_depth[d] += 1
    return max(per_depth.values(), default=0)


def op_counts(path: Path) -> dict[str, int]:
    """{op_type: count} over the main graph (domain-prefixed for non-standard domains)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node]
    return dict(sorted(Counter(names).items()))


def op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# Ops that may follow a graph's first Conv inside its float block: elementwise activations and pooling.
BLOCK_TAIL_OPS = frozenset({"Relu", "MaxPool", "Clip", "LeakyRelu"})


def input_conv_block(graph) -> list[str]:
    """The first Conv fed straight by a graph input and the single-consumer Relu / MaxPool / Clip nodes
    after it, by name; [] when the graph does not start with a Conv. ONNX Runtime's QLinearConv is slow
    for such a conv's few input channels (K = Cin x kh x kw is tiny), so the quantizer may keep it in float."""
    idx = GraphIndex.of(graph)
    first = next((n for n in graph.node if n.op_type == "Conv" and n.input and n.input[0] in idx.inputs), None)
    if first is None or not first.name:
        return []
    block, node = [first.name], first
    while idx.used_once(node.output[0]):
        nxt = idx.consumers[node.output[0]][0]
        if nxt.op_type not in BLOCK_TAIL_OPS or not nxt.name:
            break
        block.append(nxt.name)
        node = nxt
    return block


def pool_before_relu(graph, names: list[str]) -> int:
    """Rewrite each Relu -> MaxPool pair among the nodes `names` as MaxPool -> Relu, in place; returns
    how many. Exact: max commutes with a non-decreasing function, and MaxPool pads with -inf.

    Why: in a graph whose float block ends Relu -> MaxPool -> QuantizeLinear, ONNX Runtime's
    QDQPropagationTransformer moves the Q above the MaxPool, which then runs on uint8 in NCHW (a slow
    generic kernel: 4.9 ms of a 7.1 ms call measured on the default CNN). A Relu between MaxPool and Q
    stops the propagation (Relu is not an op it moves through), and ORT then folds the Relu into the Q."""
    idx = GraphIndex.of(graph)
    by_name = {n.name: n for n in graph.node}
    swapped = 0
    for name in names:
        relu = by_name.get(name)
        if relu is None or relu.op_type != "Relu" or not idx.used_once(relu.output[0]):
            continue
        pool = idx.consumers[relu.output[0]][0]
        if pool.op_type != "MaxPool" or pool.name not in names or len(pool.output) != 1:
            continue
        x, mid, y = relu.input[0], relu.output[0], pool.output[0]
        pool.input[0], pool.output[0] = x, mid
        relu.input[0], relu.output[0] = mid, y
        stale = [v for v in graph.value_info if v.name == mid]   # its shape was the un-pooled one
        for v in stale:
            graph.value_info.remove(v)
        nodes = list(graph.node)            # keep the stored order topological: the pool now runs first
        i, j = nodes.index(relu), nodes.index(pool)
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del graph.node[:]
        graph.node.extend(nodes)
        idx = GraphIndex.of(graph)
        swapped += 1
    return swapped
