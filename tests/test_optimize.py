"""Optimize stage: portable saved level, fused-node counts, grid parity against the unoptimized graph."""
import numpy as np
import pytest

from onnxpipe.models import list_models
from onnxpipe.errors import ConfigError
from onnxpipe.stages.optimize import OptimizeConfig, fusion_summary, op_counts, optimize
from onnxpipe.core.parity import shape_grid
from onnxpipe.runfolder import Run
from onnxpipe.core.runtime import make_session


@pytest.mark.parametrize("model", list_models())
def test_optimize_writes_onnx_opt_with_grid_parity(copy_of, model):
    run = Run.open(copy_of(model))
    (art,) = optimize(run, OptimizeConfig())
    run = Run.open(run.root)  # what was saved
    rec = run.artifact("onnx_opt")
    assert rec.parent == "onnx" and not rec.lossy and rec.stage == "optimize"
    assert rec.extra["saved_level"] == "extended" and rec.extra["load_level"] == "all"
    assert rec.sha256 != run.artifact("onnx").sha256
    # Portable: no NCHWc layout ops in the saved file (those are chosen per CPU at load time).
    assert not any("nchwc" in op.lower() for op in op_counts(run.path("onnx_opt")))
    parity = next(p for p in run.manifest["parity"] if (p["reference"], p["candidate"]) == ("onnx", "onnx_opt"))
    grid = shape_grid(run.spec, run.model_config())
    assert parity["passed"] and parity["rule"] == "tensor" and len(parity["shapes"]) == len(grid)
    # Independent check on one grid shape: the optimized file computes what the export computes.
    x = grid[-1]
    a = make_session(run.path("onnx"), device="cpu", opt_level="disable")(*x)
    b = make_session(run.path("onnx_opt"), device="cpu")(*x)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3)
    assert art.extra["nodes_after"] <= art.extra["nodes_before"]


def test_transformer_keeps_native_attention_and_counts_fusions(copy_of):
    run = Run.open(copy_of("transformer"))
    (art,) = optimize(run, OptimizeConfig())
    layers = run.model_config().layers
    assert art.extra["attention_nodes"] == layers
    assert art.extra["ops_after"].get("Attention") == layers
    # The head split/merge layout ops are folded into the 3-D Attention op (pipeline.attention).
    assert art.extra["attention_layout_folds"] == layers
    assert "Transpose" not in art.extra["ops_after"] and art.extra["ops_before"]["Transpose"] == 4 * layers
    assert art.extra["fused_total"] >= 1 and sum(art.extra["fused_nodes"].values()) == art.extra["fused_total"]


def test_cnn_convs_fuse_with_their_relus(copy_of):
    (art,) = optimize(Run.open(copy_of("cnn")), OptimizeConfig())
    assert art.extra["fused_nodes"].get("com.microsoft.FusedConv") == 3
    assert "Relu" not in art.extra["ops_after"] or art.extra["ops_after"]["Relu"] < art.extra["ops_before"]["Relu"]


def test_attention_fold_leaves_other_graphs_alone(tiny_run):
    import onnx

    from onnxpipe.stages.attention import fold_attention_layout

    for model in ("cnn", "lstm"):
        graph = onnx.load(str(Run.open(tiny_run(model)).path("onnx")))
        before = [n.op_type for n in graph.graph.node]
        assert fold_attention_layout(graph) == 0 and [n.op_type for n in graph.graph.node] == before


def test_fusion_summary_counts_only_new_fused_ops():
    before = {"MatMul": 4, "Add": 4, "Attention": 2}
    after = {"MatMul": 4, "com.microsoft.BiasGelu": 2, "Attention": 2, "com.microsoft.SkipLayerNormalization": 1}
    s = fusion_summary(before, after)
    assert s["fused_nodes"] == {"com.microsoft.BiasGelu": 2, "com.microsoft.SkipLayerNormalization": 1}
    assert s["attention_nodes"] == 2 and s["nodes_before"] == 10 and s["nodes_after"] == 9


@pytest.mark.parametrize("level", ["all", "layout"])
def test_hardware_specific_levels_are_refused(level):
    with pytest.raises(ConfigError, match="this CPU only"):
        OptimizeConfig(level=level)


def test_bad_optimize_options_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown optimization level"):
        OptimizeConfig(level="max")
    with pytest.raises(ConfigError, match="load level"):
        OptimizeConfig(load_level="fast")
