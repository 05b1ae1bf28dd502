"""Lossless graph rewrite for the native ONNX Attention op (opset 23): fold the head split/merge
layout ops into the op itself.

`F.scaled_dot_product_attention` (onnxpipe's Transformer, and Hugging Face BERT / DistilBERT / GPT-2 /
ViT with their default "sdpa" attention) exports at opset 23 as

    x_q, x_k, x_v (B, T, C) -> Reshape (B, T, h, d) -> Transpose (B, h, T, d) -> Attention [+ mask]
        -> Transpose (B, T, h, d) -> Reshape (B, T, C) or (B*T, C)

The Attention op also accepts 3-D inputs and returns a 3-D output (B, T, h*d) when told the head
counts (q_num_heads, kv_num_heads), so the three input Reshape+Transpose pairs and the output Transpose
can go; the output Reshape stays (the 3-D output has the same element order, so any target shape
still holds). The head count comes from the Reshape's shape (entry 2), or, where that is -1 as in
`view(B, T, -1, head_dim)`, from the hidden size over the head size. An attention mask (the op's 4th
input) passes through unchanged. ORT runs the 3-D form on CPU with identical results; at small batches
the saved kernel launches are most of the gain (measured here: about 1.2x for the default Transformer).
The rewrite only fires on that pattern (tensors used once, all three heads equal); anything else is
left alone, and optimize checks parity over the shape grid afterwards."""
from __future__ import annotations

import numpy as np

from ..core.onnxgraph import GraphIndex

HEAD_PERM = [0, 2, 1, 3]


def _last_dims(model) -> dict[str, int]:
    """tensor -> its last dimension where shape inference knows it as a number."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # onnx raises InferenceError and others on graphs it cannot type: then no sizes
        return {}
    out = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[v.name] = int(dims[-1].dim_value)
    for t in inferred.graph.initializer:
        if t.dims:
            out[t.name] = int(t.dims[-1])
    return out


def _shape_entries(idx: GraphIndex, shape_tensor: str) -> list | None:
    """The 4 entries of a Reshape target (ints where constant, None where computed), or None if not 4-D."""
    value = idx.constant(shape_tensor)
    if value is not None:
        flat = np.asarray(value).ravel()
        return [int(v) for v in flat] if flat.size == 4 else None
    node = idx.producer.get(shape_tensor)
    if node is None or node.op_type != "Concat" or len(node.input) != 4:
        return None
    entries = []
    for part in node.input:
        c = idx.constant(part)
        entries.append(int(np.asarray(c).ravel()[0]) if c is not None and np.asarray(c).size == 1 else None)
    return entries


def fold_attention_layout(model) -> int:
    """Rewrite `model` (onnx.ModelProto) in place; returns how many Attention nodes were folded."""
    from onnx import helper

    g = model.graph
    idx = GraphIndex.of(g)
    producer, consumers, used_once = idx.producer, idx.consumers, idx.used_once
    last_dim: dict[str, int] | None = None

    def head_transpose(n) -> bool:
        return n.op_type == "Transpose" and next((list(a.ints) for a in n.attribute if a.name == "perm"), None) == HEAD_PERM

    def heads_of(reshape) -> int | None:
        nonlocal last_dim
        entries = _shape_entries(idx, reshape.input[1])
        if entries is None:
            return None
        if entries[2] is not None and entries[2] > 0:
            return entries[2]
        if entries[3] is not None and entries[3] > 0:        # view(B, T, -1, head_dim)
            if last_dim is None:
                last_dim = _last_dims(model)
            hidden = last_dim.get(reshape.input[0])
            if hidden and hidden % entries[3] == 0:
                return hidden // entries[3]
        return None

    drop: set[int] = set()
    folds = 0
    for att in list(g.node):
        if att.op_type != "Attention" or att.domain not in ("", "ai.onnx") or len(att.input) not in (3, 4):
            continue
        sources, heads, layout = [], None, []
        for t in att.input[:3]:
            tr = producer.get(t)
            rs = producer.get(tr.input[0]) if tr is not None else None
            if not (tr is not None and head_transpose(tr) and used_once(t) and rs is not None
                    and rs.op_type == "Reshape" and used_once(tr.input[0])):
                break
            h = heads_of(rs)
            if h is None or heads not in (None, h):
                break
            heads = h
            sources.append(rs.input[0])
            layout += [tr, rs]
        else:
            out = att.output[0]
            tr = consumers.get(out, [None])[0]
            if not (used_once(out) and len(att.output) == 1 and tr is not None and head_transpose(tr)):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in att.attribute}
            attrs.update(q_num_heads=heads, kv_num_heads=heads)
            inputs = sources + list(att.input[3:])             # the mask, if any, unchanged
            folded = helper.make_node("Attention", inputs, [tr.output[0]], name=f"{att.name}_3d", **attrs)
            g.node.insert(list(g.node).index(att), folded)
            drop.update(id(n) for n in (*layout, att, tr))
            folds += 1
    if folds:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        live = {o for n in g.node for o in n.output}
        # the folded output keeps its name with a new rank: drop recorded shapes that no longer hold
        stale = [v for v in g.value_info if v.name not in live or producer.get(v.name) is not None
                 and id(producer[v.name]) in drop]
        for v in stale:
            g.value_info.remove(v)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for init in [t for t in g.initializer if t.name not in used]:   # the removed reshapes' shape constants
            g.initializer.remove(init)
    return folds


def fold_file(src, dst) -> int:
    """Fold `src` into `dst` (written plainly: the caller owns atomicity). Returns the fold count."""
    import onnx

    model = onnx.load(str(src))
    folds = fold_attention_layout(model)
    onnx.save(model, str(dst))
    return folds
