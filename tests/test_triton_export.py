"""`onnxpipe export-triton`: the config.pbtxt parses as Triton's own ModelConfig and names the right tensors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnxpipe.atomic import sha256_file
from onnxpipe.cli import app
from onnxpipe.errors import ConfigError
from onnxpipe.runfolder import Run
from onnxpipe.serving.triton import TritonConfig, config_pbtxt, export_triton


def triton_model_config():
    """Triton's ModelConfig message, from the model_config_pb2 that tritonclient ships (protobuf only)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse(text: str):
    from google.protobuf import text_format

    pb = triton_model_config()
    return text_format.Parse(text, pb.ModelConfig()), pb


def test_repository_parses_and_names_the_right_tensors(tiny_run, tmp_path):
    model, input_name, dims = "cnn", "image", [1, 28, 28]
    root = tiny_run(model)
    entry = export_triton(Run.open(root), tmp_path / "repo", cfg=TritonConfig(max_batch=16, max_delay_ms=1.5, device="cpu"))
    assert entry == tmp_path / "repo" / model
    assert sha256_file(entry / "1" / "model.onnx") == Run.open(root).artifact("onnx").sha256
    cfg, pb = parse((entry / "config.pbtxt").read_text())
    assert cfg.name == model and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [(input_name, pb.TYPE_FP32, dims)]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("logits", pb.TYPE_FP32, [10])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 1500
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU and cfg.instance_group[0].count == 1


def test_cli_export_triton_and_refusal_to_overwrite(tiny_run, tmp_path):
    root = tiny_run("cnn")
    out = tmp_path / "models"
    result = CliRunner().invoke(app, ["export-triton", str(root), str(out), "--name", "digits", "--max-batch", "0"])
    assert result.exit_code == 0, result.output
    cfg, _ = parse((out / "digits" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [-1, 1, 28, 28]  # no batching: full dims
    assert not cfg.HasField("dynamic_batching")
    again = CliRunner().invoke(app, ["export-triton", str(root), str(out), "--name", "digits"])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    with pytest.raises(ConfigError, match="is a torch model"):
        export_triton(Run.open(root), out, "torch")


def test_sequence_model_keeps_its_dynamic_length():
    """A (batch, T, F) input: batch leaves the dims, the dynamic T stays as -1."""
    text = config_pbtxt("lstm", [("sequence", "FP32", [-1, -1, 8])], [("logits", "FP32", [-1, 10])],
                        TritonConfig(max_batch=8, device="cuda", instances=2), ["test"])
    cfg, pb = parse(text)
    assert list(cfg.input[0].dims) == [-1, 8] and list(cfg.output[0].dims) == [10] and cfg.max_batch_size == 8
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2


ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
                 "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
                 "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL"}


@pytest.mark.parametrize("model", ["cnn", "lstm", "gru", "transformer"])
def test_every_input_and_output_of_the_onnx_file_is_in_the_config_with_its_datatype_and_dims(tiny_run, tmp_path, model):
    """Checked against the ONNX file as ONNX Runtime reads it (not against triton.py's own reading of it), for
    every built-in model, with batching on and off."""
    from onnxpipe.core.runtime import make_session

    root = tiny_run(model)
    session = make_session(root / "model.onnx", device="cpu").inner
    for max_batch in (8, 0):
        entry = export_triton(Run.open(root), tmp_path / f"repo{max_batch}", cfg=TritonConfig(max_batch=max_batch))
        cfg, pb = parse((entry / "config.pbtxt").read_text())
        assert cfg.max_batch_size == max_batch
        for ours, theirs in ((session.get_inputs(), cfg.input), (session.get_outputs(), cfg.output)):
            dims = [[d if isinstance(d, int) else -1 for d in t.shape] for t in ours]
            want = [(t.name, pb.DataType.Value(ORT_TO_TRITON[t.type]), d[1:] if max_batch else d) for t, d in zip(ours, dims)]
            assert [(t.name, t.data_type, list(t.dims)) for t in theirs] == want


def test_preferred_batch_sizes_and_threads_from_the_command_line(tiny_run, tmp_path):
    r = CliRunner().invoke(app, ["export-triton", str(tiny_run("cnn")), str(tmp_path), "--max-batch", "8",
                                 "--preferred-batch", "4,8", "--threads", "2", "--instances", "2"])
    assert r.exit_code == 0, r.output
    cfg, _ = parse((tmp_path / "cnn" / "config.pbtxt").read_text())
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8] and cfg.instance_group[0].count == 2
    assert cfg.parameters["intra_op_thread_count"].string_value == "2"
    bad = CliRunner().invoke(app, ["export-triton", str(tiny_run("cnn")), str(tmp_path / "x"), "--max-batch", "8",
                                   "--preferred-batch", "16"])
    assert bad.exit_code == 1 and "must be in 1..max_batch (8)" in bad.output
