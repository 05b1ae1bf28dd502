"""FLOP / integer-op counts on hand-built graphs whose work is known in closed form."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.core.flops import count_flops, count_variant_flops
from onnxpipe.runfolder import Run


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 9
    return m


def vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def rand(*shape, dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def test_conv_counts_output_elements_times_kernel_volume_per_row():
    # (N,3,8,8) * W(4,3,3,3) -> (N,4,6,6): 4*6*6 outputs x 3*3*3 MACs each, 2 FLOPs per MAC
    m = model([helper.make_node("Conv", ["x", "w"], ["y"])], [vi("x", ["batch", 3, 8, 8])], [vi("y", None)],
              [("w", rand(4, 3, 3, 3))])
    c = count_flops(m, [rand(2, 3, 8, 8)])
    assert c.float_flops == 2 * 4 * 36 * 27 and c.int_ops == 0 and c.kind == "fp32"
    assert c.by_op == {"Conv": 2 * 4 * 36 * 27}


def test_grouped_conv_divides_by_groups():
    m = model([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], [vi("x", [1, 4, 5, 5])], [vi("y", None)],
              [("w", rand(6, 2, 3, 3))])
    assert count_flops(m).float_flops == 2 * 6 * 9 * (2 * 9)


def test_gemm_with_transposed_weight():
    # (N,5) x (7,5)^T + b -> (N,7): 35 MACs per row
    m = model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1)], [vi("a", ["batch", 5])], [vi("y", None)],
              [("b", rand(7, 5)), ("c", rand(7))])
    assert count_flops(m, dims={"batch": 3}).float_flops == 70


def test_lstm_counts_every_gate_every_step():
    # T=4, I=3, H=5: per step 4 gates x (3 + 5) x 5 MACs
    T, I, H = 4, 3, 5
    m = model([helper.make_node("LSTM", ["x", "w", "r"], ["y", "yh"], hidden_size=H)],
              [vi("x", [T, "batch", I])], [vi("yh", None)], [("w", rand(1, 4 * H, I)), ("r", rand(1, 4 * H, H))])
    c = count_flops(m, dims={"batch": 2})
    assert c.float_flops == 2 * T * 4 * H * (I + H) and c.rows == 2


def test_bidirectional_gru_counts_both_directions():
    T, I, H = 6, 2, 3
    m = model([helper.make_node("GRU", ["x", "w", "r"], ["y"], hidden_size=H, direction="bidirectional")],
              [vi("x", [T, "batch", I])], [vi("y", None)], [("w", rand(2, 3 * H, I)), ("r", rand(2, 3 * H, H))], opset=14)
    assert count_flops(m).float_flops == 2 * 2 * T * 3 * H * (I + H)


def test_integer_and_qdq_matmuls_count_as_integer_ops():
    k, n = 8, 4
    mi = model([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], [vi("a", [2, k], TensorProto.UINT8)],
               [vi("y", None, TensorProto.INT32)], [("b", np.ones((k, n), np.int8))])
    c = count_flops(mi)
    assert c.int_ops == 2 * k * n and c.float_flops == 0 and c.kind == "int8"

    scale, zp = np.array(0.1, np.float32), np.array(0, np.int8)
    qdq = model([
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
        helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["adq"]),
        helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bdq"]),
        helper.make_node("MatMul", ["adq", "bdq"], ["y"]),
    ], [vi("a", [1, k])], [vi("y", None)], [("s", scale), ("z", zp), ("bq", np.ones((k, n), np.int8))])
    c = count_flops(qdq)
    assert c.int_ops == 2 * k * n and c.float_flops == 0 and c.by_op == {"MatMul (int)": 2 * k * n}


def test_onnx_attention_counts_scores_and_weighted_sum():
    B, h, S, d = 1, 2, 4, 8
    m = model([helper.make_node("Attention", ["q", "k", "v"], ["y"])],
              [vi("q", [B, h, S, d]), vi("k", [B, h, S, d]), vi("v", [B, h, S, d])], [vi("y", None)], opset=23)
    c = count_flops(m)
    assert c.float_flops == 2 * h * S * S * (d + d)


def test_symbolic_dimension_without_size_is_a_config_error():
    from onnxpipe.errors import ConfigError

    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["batch", "seq_len"])], [vi("y", None)])
    with pytest.raises(ConfigError, match="seq_len"):
        count_flops(m)


def test_tiny_cnn_run_matches_the_architecture(tiny_run):
    run = Run.open(tiny_run("cnn"))
    cfg = run.model_config()
    s1, s2, s3 = 26, 11, 3                                    # 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5 -> conv 3
    macs = (s1 * s1 * cfg.channels1 * 9 * cfg.in_channels + s2 * s2 * cfg.channels2 * 9 * cfg.channels1
            + s3 * s3 * cfg.channels3 * 9 * cfg.channels2 + s3 * s3 * cfg.channels3 * cfg.hidden
            + cfg.hidden * cfg.num_classes)
    onnx_count = count_variant_flops(run, "onnx")
    assert onnx_count.float_flops == 2 * macs
    assert count_variant_flops(run, "torch").float_flops == 2 * macs  # counted through its export
