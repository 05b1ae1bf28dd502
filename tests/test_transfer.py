"""Transfer: a new run folder whose lineage names the source run and its sha256, frozen layers that stay
bit-identical, a scratch twin, new-class data with the source's normalization, and every stage after it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from onnxpipe.core.predictors import load_checkpoint_file
from onnxpipe.errors import ConfigError
from onnxpipe.orchestrate import Context, run_model, transfer_run
from onnxpipe.runfolder import Run

FIRST = (0, 1, 2, 3, 4)
SECOND = (5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny cnn trained on digits 0-4 only (5 classes)."""
    ctx = Context(limit=400, classes=FIRST, progress=False, sections={"train": {"epochs": 3, "lr": 3e-3}})
    return run_model("cnn", tmp_path_factory.mktemp("src") / "cnn04", ctx, stages=["train"])


def weights(root) -> dict:
    return load_checkpoint_file(root / "model.pt")["state_dict"]


def transfer_ctx(**sections) -> Context:
    return Context(classes=SECOND, per_class=10, progress=False, sections={"transfer": {"epochs": 3, **sections}})


def test_source_run_keeps_only_its_classes(source):
    info = source.dataset_info
    assert info["classes"] == list(FIRST) and info["num_classes"] == 5 and source.model_config().num_classes == 5
    assert source.metrics("torch")["accuracy"] > 0.5


def test_transfer_writes_lineage_freezes_the_backbone_and_trains_a_scratch_twin(source, tmp_path):
    run = transfer_run(source.root, tmp_path / "t", transfer_ctx())
    t = run.section("transfer")
    assert t["source"]["run"] == str(source.root.resolve()) and t["source"]["sha256"] == source.artifact("torch").sha256
    assert run.artifact("torch").extra["transferred_from"]["sha256"] == source.artifact("torch").sha256
    assert run.artifact("torch").stage == "transfer" and run.artifact("torch").parent is None
    info = run.dataset_info
    assert info["classes"] == list(SECOND) and info["per_class"] == 10 and info["split"]["train"] == 50
    assert info["normalization"] == source.dataset_info["normalization"]     # the backbone's scaling
    assert t["frozen_layers"] == ["features.0", "features.3", "features.6", "head.1"] and t["head_layer"] == "head.4"
    before, after = weights(source.root), weights(run.root)
    for k in before:
        if k.startswith("head.4"):
            assert not torch.equal(before[k], after[k])       # the head trained (and the new one has 5 classes)
        else:
            assert torch.equal(before[k], after[k]), k        # bit-identical after training
    assert t["trainable_params"] == 64 * 5 + 5
    assert 0 <= t["scratch_accuracy"] <= 1 and t["gain_vs_scratch"]["rows"] == info["split"]["test"]
    g = t["gain_vs_scratch"]
    assert g["delta_pt"] == pytest.approx(100 * (t["transferred_accuracy"] - t["scratch_accuracy"]))
    assert run.metrics("torch")["accuracy"] == t["transferred_accuracy"]


def test_freeze_n_and_none_and_head_keep(source, tmp_path):
    run = transfer_run(source.root, tmp_path / "n2", transfer_ctx(freeze="2", scratch_baseline=False))
    before, after = weights(source.root), weights(run.root)
    assert run.section("transfer")["frozen_layers"] == ["features.0", "features.3"]
    for k in ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"):
        assert torch.equal(before[k], after[k])
    assert not torch.equal(before["features.6.weight"], after["features.6.weight"])
    assert "scratch_accuracy" not in run.section("transfer")

    run = transfer_run(source.root, tmp_path / "keep", transfer_ctx(freeze="none", head="keep", scratch_baseline=False))
    after = weights(run.root)
    assert run.section("transfer")["frozen_layers"] == [] and all(not torch.equal(before[k], after[k]) for k in before
                                                                   if k.endswith("weight"))
    with pytest.raises(ConfigError, match="--head keep: the source's classifier has 5 classes but the new data has 10"):
        transfer_run(source.root, tmp_path / "bad", Context(progress=False, sections={"transfer": {"head": "keep"}}))
    with pytest.raises(ConfigError, match="has 5 layers with weights"):
        transfer_run(source.root, tmp_path / "bad2", transfer_ctx(freeze="9"))


BN_FACTORY = """
import torch
from torch import nn

def build(num_classes: int = 10) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 16, num_classes))
    model.example_inputs = {"image": torch.zeros(2, 1, 8, 8)}
    return model
"""


def test_frozen_batchnorm_keeps_its_running_statistics(tmp_path):
    path = tmp_path / "bnnet.py"
    path.write_text(textwrap.dedent(BN_FACTORY))
    src = run_model(f"{path}:build", tmp_path / "src", Context(limit=300, classes=FIRST, progress=False,
                                                               sections={"train": {"epochs": 2}}), stages=["train"])
    run = transfer_run(src.root, tmp_path / "t", transfer_ctx(scratch_baseline=False))
    before, after = weights(src.root), weights(run.root)
    for k in ("1.running_mean", "1.running_var", "1.weight", "0.weight"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["5.weight"], after["5.weight"]) and after["5.weight"].shape == (5, 96)


def test_a_two_input_model_transfers_with_each_inputs_own_normalization(two_inputs, tmp_path):
    from onnxpipe.core.data import load_dataset, recorded_inputs, reload_dataset

    factories, data = two_inputs
    src = run_model(f"{factories}:two_dense_inputs", tmp_path / "src",
                    Context(data=data, limit=300, classes=FIRST, progress=False,
                            sections={"train": {"epochs": 2, "lr": 1e-2}}), stages=["train"])
    ctx = Context(data=data, classes=SECOND, per_class=10, progress=False,
                  sections={"transfer": {"epochs": 2, "scratch_baseline": False}})
    run = transfer_run(src.root, tmp_path / "t", ctx)
    norms = {r["name"]: r["normalization"] for r in run.dataset_info["inputs"]}
    assert norms == {r["name"]: r["normalization"] for r in src.dataset_info["inputs"]}   # by input name
    own = load_dataset(data, recorded_inputs(src.dataset_info), num_classes=None, classes=SECOND, per_class=10)
    assert own.info["inputs"][1]["normalization"]["std"] != norms["aux"]["std"]   # not the new data's own
    ds = reload_dataset(run.dataset_info)                                          # replayed by later stages
    assert ds.x_train.names == ["rows", "aux"] and len(ds.y_train) == 50 and len(ds.y_test) == 180
    before, after = weights(src.root), weights(run.root)
    assert all(torch.equal(before[k], after[k]) for k in ("rows.1.weight", "aux.weight", "aux.bias"))
    assert after["head.weight"].shape == (5, 32)


def test_transfer_command_from_another_directory_then_stages_apply(source, tmp_path):
    """As users type it: relative paths, the default RUN-transfer folder, --stages after it, a second process,
    and a later `onnxpipe export` of the new run that reloads its class subset and per-class data."""
    import shutil

    shutil.copytree(source.root, tmp_path / "cnn04")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "onnxpipe.cli", "transfer", "cnn04", "--data", "digits", "--classes", "5-9",
           "--per-class", "5", "--epochs", "2", "--freeze", "backbone", "--stages", "export", "--quiet"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "cnn04-transfer"
    m = json.loads((root / "manifest.json").read_text())
    assert m["transfer"]["source"]["sha256"] == source.artifact("torch").sha256 and "onnx" in m["artifacts"]
    assert m["dataset"]["split"]["train"] == 25 and "transferred - scratch" in done.stdout
    again = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "optimize", "cnn04-transfer"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    bad = subprocess.run(cmd[:4] + ["cnn04", "--data", "digits", "--freeze", "sideways"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: freeze must be backbone")
