"""Manifest contract, sha256 checks, atomic writes, corrupt artifacts."""
import json

import pytest

from onnxpipe.atomic import atomic_path, sha256_file
from onnxpipe.errors import ArtifactError, DeviceError, RunFolderError
from onnxpipe.runfolder import Run
from onnxpipe.core.runtime import make_session, resolve_providers
from onnxpipe.core.predictors import load_predictor


def test_manifest_matches_files(tiny_run):
    run = Run.open(tiny_run("cnn"))
    m = run.manifest
    assert m["schema"] == 1 and m["model"] == "cnn" and m["selected"] == "onnx"
    assert {"python", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["dataset"]["source"] == "digits" and m["dataset"]["split"]["train"] > 0
    for variant, art in m["artifacts"].items():
        f = run.root / art["path"]
        assert sha256_file(f) == art["sha256"] and f.stat().st_size == art["bytes"]
    assert m["artifacts"]["onnx"]["parent"] == "torch" and m["artifacts"]["onnx"]["stage"] == "export"
    assert m["artifacts"]["torch"]["config"]["epochs"] == 3
    ref = m["reference"]
    assert sha256_file(run.root / ref["path"]) == ref["sha256"]


def test_weights_load_with_weights_only(tiny_run):
    import torch

    ck = torch.load(Run.open(tiny_run("gru")).path("torch"), weights_only=True)
    assert ck["model"] == "gru" and ck["config"]["cell"] == "gru" and "rnn.weight_ih_l0" in ck["state_dict"]


def test_tampered_artifact_is_detected(copy_of):
    root = copy_of("cnn")
    data = bytearray((root / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (root / "model.onnx").write_bytes(bytes(data))
    run = Run.open(root)
    with pytest.raises(ArtifactError, match="'onnx' .* changed since it was recorded: sha256"):
        run.path("onnx")
    with pytest.raises(ArtifactError):
        load_predictor(run, "onnx")


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load .*bad.onnx"):
        make_session(bad, device="cpu")


def test_missing_and_foreign_run_folders(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        Run.open(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(RunFolderError, match="no manifest.json"):
        Run.open(tmp_path / "foreign")
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(RunFolderError, match="not an onnxpipe manifest"):
        Run.open(tmp_path / "foreign")
    (tmp_path / "foreign" / "manifest.json").write_text("{broken")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        Run.open(tmp_path / "foreign")


def test_existing_run_is_not_overwritten_without_force(tiny_run, tmp_path):
    run = Run.create(tmp_path / "r", "cnn", {}, {})
    (tmp_path / "r" / "keep.txt").write_text("x")
    with pytest.raises(RunFolderError, match="--resume .* --force"):
        Run.create(tmp_path / "r", "cnn", {}, {})
    assert (tmp_path / "r" / "keep.txt").exists()
    Run.create(tmp_path / "r", "cnn", {}, {}, force=True)
    assert not (tmp_path / "r" / "keep.txt").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("x")
    with pytest.raises(RunFolderError, match="not an onnxpipe run folder"):
        Run.create(tmp_path / "other", "cnn", {}, {}, force=True)
    assert run.root.exists()


def test_a_stage_cannot_overwrite_another_stages_variant(copy_of):
    run = Run.open(copy_of("cnn"))
    with pytest.raises(ArtifactError, match="belongs to stage 'export'"):
        run.add_artifact("onnx", "model.pt", stage="quantize")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_cuda_request_without_cuda_is_an_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the gpu-marked tests cover it")
    with pytest.raises(DeviceError, match="no CUDA provider"):
        resolve_providers("cuda")
    assert resolve_providers("auto") == ["CPUExecutionProvider"]


def test_session_reports_real_providers(tiny_run):
    run = Run.open(tiny_run("cnn"))
    sess = make_session(run.path("onnx"), device="auto", threads=1)
    assert sess.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider") and sess.threads == 1
    assert sess.device == ("cuda" if sess.providers[0] == "CUDAExecutionProvider" else "cpu")


@pytest.mark.gpu
def test_cuda_session_matches_cpu(tiny_run):
    import numpy as np

    run = Run.open(tiny_run("cnn"))
    cpu = make_session(run.path("onnx"), device="cpu")
    gpu = make_session(run.path("onnx"), device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).standard_normal((7, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(gpu(x), cpu(x), atol=1e-4, rtol=1e-3)
