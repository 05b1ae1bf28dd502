"""Static INT8's layout choice: the input conv block kept in float (with its Relu after the MaxPool) or all
INT8, chosen by timing both on this machine; the graph rewrite is exact; the choice is a pure function."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.core.data import reload_dataset
from onnxpipe.core.onnxgraph import input_conv_block, pool_before_relu
from onnxpipe.core.runtime import make_session
from onnxpipe.runfolder import Run
from onnxpipe.stages import int8_layout
from onnxpipe.stages.int8_layout import ALL_INT8, INPUT_BLOCK_FLOAT, choose_layout
from onnxpipe.stages.quantize import QuantizeConfig, count_int8_nodes, quantize


def conv_relu_pool(pads=(1, 1, 1, 1)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              pads=list(pads)),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 5, 5])], [w, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_pool_before_relu_is_exact_and_keeps_the_graph_topological(tmp_path):
    model = conv_relu_pool()
    assert input_conv_block(model.graph) == ["conv", "relu", "pool"]   # conv2 is not part of the block
    before = tmp_path / "before.onnx"
    onnx.save(model, str(before))
    assert pool_before_relu(model.graph, ["conv", "relu", "pool"]) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Conv", "MaxPool", "Relu", "Conv"]
    after = tmp_path / "after.onnx"
    onnx.save(model, str(after))
    x = np.random.default_rng(1).normal(size=(3, 1, 9, 9)).astype(np.float32)
    a = make_session(before, device="cpu", opt_level="disable")(x)
    b = make_session(after, device="cpu", opt_level="disable")(x)
    assert a.shape == b.shape == (3, 2, 5, 5) and np.array_equal(a, b)
    assert pool_before_relu(model.graph, ["conv", "relu", "pool"]) == 0   # nothing left to swap


def test_input_conv_block_stops_at_a_shared_tensor():
    model = conv_relu_pool()
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, 4, 9, 9]))  # relu output read twice
    assert input_conv_block(model.graph) == ["conv", "relu"]


@pytest.mark.parametrize("timed, chosen", [
    ({ALL_INT8: {"1t/b64": 3.0, "2t/b64": 2.8}, INPUT_BLOCK_FLOAT: {"1t/b64": 1.5, "2t/b64": 1.4}}, INPUT_BLOCK_FLOAT),
    ({ALL_INT8: {"1t/b64": 1.0, "2t/b64": 1.0}, INPUT_BLOCK_FLOAT: {"1t/b64": 0.99, "2t/b64": 0.99}}, ALL_INT8),  # tie
    ({ALL_INT8: {"1t/b64": 1.0}, INPUT_BLOCK_FLOAT: {"1t/b64": 2.0}}, ALL_INT8),
    ({ALL_INT8: {"1t/b64": 1.0}}, ALL_INT8),
])
def test_choose_layout_is_a_pure_function_of_the_timings(timed, chosen):
    got, why = choose_layout(timed)
    assert got == chosen and why


def first_conv_reads_float(path) -> bool:
    g = onnx.load(str(path)).graph
    dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    conv = next(n for n in g.node if n.op_type == "Conv")
    return conv.input[0] in {i.name for i in g.input} and conv.input[1] not in dq


@pytest.mark.parametrize("faster", [INPUT_BLOCK_FLOAT, ALL_INT8])
def test_quantize_builds_the_layout_the_timings_favour(copy_of, monkeypatch, faster):
    def fake_timings(paths, rows, **kw):
        assert set(paths) == {ALL_INT8, INPUT_BLOCK_FLOAT} and all(p.exists() for p in paths.values())
        return {name: {"1t/b64": 1.0 if name == faster else 2.0} for name in paths}

    monkeypatch.setattr(int8_layout, "time_layouts", fake_timings)
    run = Run.open(copy_of("cnn"))
    (res,) = quantize(run, QuantizeConfig(mode="static", max_accuracy_drop=100.0, min_agreement=0.0),
                      reload_dataset(run.manifest["dataset"]))
    layout = res.artifact.extra["layout"]
    assert layout["chosen"] == faster and layout["input_block"][0] and len(layout["input_block"]) >= 2
    path = run.path("int8_static")
    assert first_conv_reads_float(path) == (faster == INPUT_BLOCK_FLOAT)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert count_int8_nodes(path) >= 2   # the later convs and the head are still INT8
    if faster == INPUT_BLOCK_FLOAT:   # the block's Relu now follows its MaxPool, so ORT keeps the Q after it
        assert ops.index("MaxPool") < ops.index("Relu") < ops.index("QuantizeLinear")


def test_quantize_times_both_layouts_and_records_them(copy_of):
    run = Run.open(copy_of("cnn"))
    (res,) = quantize(run, QuantizeConfig(mode="static"), reload_dataset(run.manifest["dataset"]))
    assert res.artifact is not None, res.reason
    layout = res.artifact.extra["layout"]
    timed = layout["timed_p50_ms"]
    assert set(timed) == {ALL_INT8, INPUT_BLOCK_FLOAT}
    assert all(v > 0 for cells in timed.values() for v in cells.values()) and "1t/b64" in timed[ALL_INT8]
    assert layout["chosen"] == choose_layout(timed)[0]
    assert first_conv_reads_float(run.path("int8_static")) == (layout["chosen"] == INPUT_BLOCK_FLOAT)
    off = quantize(run, QuantizeConfig(mode="static", layout_search=False), reload_dataset(run.manifest["dataset"]))
    assert "layout" not in off[0].artifact.extra and not first_conv_reads_float(run.path("int8_static"))
