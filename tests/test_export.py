"""Export of every registered model: checker, dynamic axes, parity with torch over the shape grid."""
import numpy as np
import onnx
import pytest
import torch

from onnxpipe.models import get_model, list_models
from onnxpipe.errors import ExportError, ParityError
from onnxpipe.stages.export import ExportConfig, check_dynamic_dims, export, export_module
from onnxpipe.core.parity import shape_grid, tensor_parity
from onnxpipe.runfolder import Run
from onnxpipe.core.runtime import make_session

MODELS = list_models()


@pytest.mark.parametrize("name", MODELS)
def test_export_parity_on_shape_grid(tiny_run, name):
    run = Run.open(tiny_run(name))
    onnx_art = run.artifact("onnx")
    assert onnx_art.parent == "torch" and onnx_art.opset == run.spec.opset
    report = next(p for p in run.manifest["parity"] if (p["reference"], p["candidate"]) == ("torch", "onnx"))
    assert report["passed"] and report["max_abs"] < 1e-4
    batches = {s[0] for s in report["shapes"]}
    assert batches == {1, 7, 64}
    if run.spec.family == "sequence":
        t = run.model_config().seq_len
        assert {s[1] for s in report["shapes"]} == {1, t, 2 * t}
    # the dynamic dims are symbolic in the file
    model = onnx.load(str(run.path("onnx")))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    if run.spec.family == "sequence":
        assert dims[1].dim_param == "seq_len"


def test_transformer_uses_native_attention_op(tiny_run):
    run = Run.open(tiny_run("transformer"))
    ops = [n.op_type for n in onnx.load(str(run.path("onnx"))).graph.node]
    assert ops.count("Attention") == run.model_config().layers


def test_second_rnn_export_keeps_sequence_axis_dynamic(tmp_path):
    """FACTS.md trap: a second dynamo export of an RNN in one process fixed T silently."""
    spec = get_model("gru")
    cfg = spec.make_config({"hidden": 8})
    model = spec.build(cfg).eval()
    for i in range(2):
        export_module(model, spec, cfg, tmp_path / f"m{i}.onnx", 18)
        sess = make_session(tmp_path / f"m{i}.onnx", device="cpu")
        (x,) = spec.example_inputs(cfg, batch=3, seq_len=13).values()
        with torch.no_grad():
            np.testing.assert_allclose(sess(x.numpy()), model(x).numpy(), atol=1e-5)


def test_fixed_dynamic_axis_is_detected(tiny_run):
    run = Run.open(tiny_run("lstm"))
    model = onnx.load(str(run.path("onnx")))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_param")
    dim.dim_value = 8
    with pytest.raises(ExportError, match=r"axis 1 \(seq_len\) is fixed to 8"):
        check_dynamic_dims(model, run.spec)


def test_parity_failure_lists_outputs_and_shapes(copy_of):
    run = Run.open(copy_of("cnn"))
    with pytest.raises(ParityError) as err:
        export(run, ExportConfig(atol=0.0, rtol=0.0, batches=(1, 7)))
    report = err.value.report
    assert not report and len(report.checks) == 2
    assert "FAIL output 'logits' at input shape [7, 1, 28, 28]" in report.summary()
    assert not (run.root / "model.onnx").exists()  # a failed export leaves no artifact behind


def test_tensor_parity_catches_a_real_difference():
    spec = get_model("cnn")
    cfg = spec.make_config()
    grid = shape_grid(spec, cfg, batches=(2,))
    same = tensor_parity("a", "b", lambda x: x, lambda x: x, grid, atol=1e-6, rtol=0)
    off = tensor_parity("a", "b", lambda x: x, lambda x: x + 1e-3, grid, atol=1e-4, rtol=0)
    assert same and same.max_abs == 0
    assert not off and off.max_abs == pytest.approx(1e-3, rel=1e-3)


def test_export_config_validation():
    from onnxpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="opset must be between 13 and 23"):
        ExportConfig(opset=9)
