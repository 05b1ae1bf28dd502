"""Structured pruning: a genuinely smaller dense model per family, shapes that follow the plan, the
pruned network equal to the original with the pruned units' weights zeroed, targets, Torch-Pruning for a
user's model, and the stage chain (export / optimize / quantize / verify / select) as for a student."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from onnxpipe.core.data import reload_dataset
from onnxpipe.core.predictors import load_torch_variant
from onnxpipe.errors import ConfigError
from onnxpipe.models import get_model
from onnxpipe.runfolder import Run
from onnxpipe.stages.configs import ExportConfig, PruneConfig
from onnxpipe.stages.export import export
from onnxpipe.stages.train import evaluate
from onnxpipe.stages.prune import (apply_plan, equivalence_report, importance, plan_keep, prune, structure_of,
                                   zeroed)


def pruned_dims(model, family_name: str, cfg) -> dict[str, int]:
    """What the rebuilt network's tensors say each group kept (read from the weights, not the config)."""
    sd = model.state_dict()
    if family_name == "cnn":
        return {"features.0": sd["features.0.weight"].shape[0], "features.3": sd["features.3.weight"].shape[0],
                "features.6": sd["features.6.weight"].shape[0], "head.1": sd["head.1.weight"].shape[0]}
    if family_name in ("lstm", "gru"):
        gates = 4 if family_name == "lstm" else 3
        return {"rnn.layer0": sd["rnn.weight_hh_l0"].shape[0] // gates}
    hd = cfg.d_model // cfg.heads
    out = {}
    for i in range(cfg.layers):
        out[f"blocks.{i}.heads"] = sd[f"blocks.{i}.qkv.weight"].shape[0] // (3 * hd)
        out[f"blocks.{i}.ff"] = sd[f"blocks.{i}.ff.0.weight"].shape[0]
    return out


@pytest.mark.parametrize("model, scope, ratio", [("cnn", "layer", 0.5), ("lstm", "layer", 0.5), ("gru", "layer", 0.5),
                                                 ("transformer", "global", 0.4)])  # global: heads differ per block
def test_each_family_prunes_into_a_smaller_model_that_exports_with_parity(copy_of, model, scope, ratio):
    run = Run.open(copy_of(model))
    ds = reload_dataset(run.dataset_info)
    prune(run, PruneConfig(ratio=ratio, scope=scope, epochs=1), ds, progress=False)
    p = run.section("pruning")
    assert p["params_after"] < 0.7 * p["params_before"] and p["flops_after"] < 0.7 * p["flops_before"]
    assert p["zeroed_check"]["passed"] and p["zeroed_check"]["max_abs"] < 1e-5
    net, spec, cfg = load_torch_variant(run, "pruned")            # rebuilt from the recorded config alone
    assert sum(t.numel() for t in net.parameters()) == p["params_after"] == run.artifact("pruned").extra["params"]
    assert pruned_dims(net, model, run.model_config()) == {r["group"]: r["kept"] for r in p["plan"]}
    for r in p["plan"]:
        assert r["kept"] == r["size"] - len(r["pruned_units"]) >= 1
        if scope == "layer":
            assert r["kept"] == r["size"] - round(ratio * r["size"])
    for kind in {r["kind"] for r in p["plan"]}:
        rows = [r for r in p["plan"] if r["kind"] == kind]
        assert sum(r["size"] - r["kept"] for r in rows) == (round(ratio * sum(r["size"] for r in rows)) if scope == "global"
                                                             else sum(round(ratio * r["size"]) for r in rows))
    assert run.artifact("pruned").bytes < run.artifact("torch").bytes
    export(run, ExportConfig(), source="pruned", target="pruned_onnx")
    saved = run.artifact("onnx").bytes - run.artifact("pruned_onnx").bytes
    assert saved >= 0.9 * 4 * (p["params_before"] - p["params_after"])   # the removed float32 weights are gone
    check = run.parity(reference="pruned", candidate="pruned_onnx")[0]
    assert check["passed"] and check["rule"] == "tensor" and check["max_abs"] < 1e-4
    assert len(check["shapes"]) == (3 if model == "cnn" else 9)      # batches 1/7/64 (x lengths 1, T, 2T)
    if model == "transformer":
        from onnxpipe.stages.attention import fold_file

        heads = [r["kept"] for r in p["plan"] if r["kind"] == "heads"]
        assert sum(heads) == 8 - round(0.4 * 8) and len(set(heads)) == 2       # 5 heads left over 2 blocks
        assert net.cfg.layer_heads == tuple(heads)
        assert fold_file(run.path("pruned_onnx"), run.root / "folded.onnx") == 2   # one Attention op per block
    assert run.budget_for("pruned_onnx", "torch") == {"max_accuracy_drop": 1.5, "min_agreement": 0.0, "gate": True}
    assert p["pruned_accuracy"] == run.metrics("pruned")["accuracy"] and p["fine_tune"]["epochs_run"] == 1
    assert -100 <= p["drop_vs_teacher"]["ci_pt"][0] <= p["drop_vs_teacher"]["ci_pt"][1] <= 100
    if model == "cnn":   # pruning again replaces `pruned` and drops what was made from the old one
        prune(run, PruneConfig(ratio=0.25, epochs=0), ds, progress=False)
        assert not run.has("pruned_onnx") and not (run.root / "pruned_onnx.onnx").exists()
        assert run.section("pruning")["ratio"] == 0.25


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_pruned_rnn_keeps_its_gate_structure_and_equals_the_zeroed_original(cell):
    """Two stacked layers pruned to different widths: the pruned weights are the original's rows of every
    gate and columns of the recurrence for the kept units, and the pruned network computes exactly what the
    original computes with those units' weights zeroed (before any fine-tuning)."""
    spec = get_model(cell)
    cfg = spec.make_config({"layers": 2, "hidden": 12})
    torch.manual_seed(0)
    model = spec.build(cfg).eval()
    st = structure_of(spec, cfg)
    keep = {"rnn.layer0": [0, 2, 3, 5, 8, 11], "rnn.layer1": [1, 2, 4, 6, 7, 9, 10, 11]}
    pruned, new_cfg = apply_plan(model, spec, st, keep)
    assert new_cfg.layer_hidden == tuple(len(keep[f"rnn.layer{i}"]) for i in range(2))
    gates, h = (4 if cell == "lstm" else 3), 12
    k0, k1 = keep["rnn.layer0"], keep["rnn.layer1"]
    rows0 = [g * h + j for g in range(gates) for j in k0]
    src, dst = model.state_dict(), pruned.state_dict()
    assert torch.equal(dst["rnn.layers.0.weight_hh_l0"], src["rnn.weight_hh_l0"][rows0][:, k0])
    assert torch.equal(dst["rnn.layers.0.bias_ih_l0"], src["rnn.bias_ih_l0"][rows0])
    assert torch.equal(dst["rnn.layers.1.weight_ih_l0"], src["rnn.weight_ih_l1"][[g * h + j for g in range(gates) for j in k1]][:, k0])
    assert torch.equal(dst["head.weight"], src["head.weight"][:, k1 + [h + j for j in k1]])

    x = torch.randn(16, 11, cfg.input_size)
    with torch.no_grad():
        got, same, original = pruned(x), zeroed(model, st, keep)(x), model(x)
    assert torch.allclose(got, same, atol=1e-6), (got - same).abs().max()
    assert (got - original).abs().max() > 1e-3          # the pruned units did matter: the check is not vacuous
    rep = equivalence_report(model, pruned, st, keep, spec, cfg, new_cfg)
    assert rep and rep.max_abs < 1e-5 and len(rep.checks) == 9

    wrong = {**keep, "rnn.layer0": [j for j in range(h) if j not in set(k0)][: len(k0)]}  # zero other units
    with torch.no_grad():
        assert (zeroed(model, st, wrong)(x) - got).abs().max() > 1e-3


def test_transformer_heads_and_ffn_are_pruned_per_block():
    spec = get_model("transformer")
    cfg = spec.make_config({"layers": 3})
    torch.manual_seed(0)
    model = spec.build(cfg).eval()
    st = structure_of(spec, cfg)
    keep = plan_keep(st.groups, importance(model, st.groups), 0.4, "global")
    pruned, new_cfg = apply_plan(model, spec, st, keep)
    hd = cfg.d_model // cfg.heads
    for i in range(3):
        heads = len(keep[f"blocks.{i}.heads"])
        assert new_cfg.layer_heads[i] == heads and pruned.blocks[i].qkv.out_features == 3 * heads * hd
        assert pruned.blocks[i].proj.in_features == heads * hd and new_cfg.layer_ff[i] == len(keep[f"blocks.{i}.ff"])
        kept_rows = [p * cfg.d_model + h * hd + t for p in range(3) for h in keep[f"blocks.{i}.heads"] for t in range(hd)]
        assert torch.equal(pruned.blocks[i].qkv.weight, model.blocks[i].qkv.weight[sorted(kept_rows)])
    assert sum(new_cfg.layer_heads) == 12 - round(0.4 * 12)      # global: 40% of all heads, wherever weakest
    rep = equivalence_report(model, pruned, st, keep, spec, cfg, new_cfg)
    assert rep and rep.max_abs < 1e-5


def test_targets_scopes_and_importance(copy_of):
    run = Run.open(copy_of("cnn"))
    ds = reload_dataset(run.dataset_info)
    prune(run, PruneConfig(target_params=0.3, epochs=0), ds, progress=False)
    p = run.section("pruning")
    assert p["goal"] == {"kind": "params", "value": 0.3} and p["fine_tune"] is None
    assert 0.25 * p["params_before"] < p["params_after"] <= 0.3 * p["params_before"]
    assert p["pruned_accuracy"] == p["pruned_accuracy_before_fine_tune"]
    flops_target = 0.5 * p["flops_before"]
    prune(run, PruneConfig(target_flops=flops_target, scope="global", importance="taylor", epochs=0), ds, progress=False)
    q = run.section("pruning")
    assert 0.45 * q["flops_before"] < q["flops_after"] <= flops_target and q["importance"] == "taylor"
    kept = [r["kept"] for r in q["plan"] if r["kind"] == "channels"]
    assert len(set(r["kept"] / r["size"] for r in q["plan"] if r["kind"] == "channels")) > 1 or kept  # global
    spec, cfg = run.spec_of("torch"), run.model_config()
    model = load_torch_variant(run, "torch")[0]
    st = structure_of(spec, cfg)
    l1 = importance(model, st.groups)
    assert all(np.all(v >= 0) for v in l1.values()) and set(l1) == {"features.0", "features.3", "features.6", "head.1"}
    with pytest.raises(ConfigError, match="out of reach"):
        prune(run, PruneConfig(target_params=10, epochs=0), ds, progress=False)
    with pytest.raises(ConfigError, match="one of --ratio, --target-params and --target-flops"):
        PruneConfig(ratio=0.5, target_flops=0.5)
    with pytest.raises(ConfigError, match="ratio must be in"):
        PruneConfig(ratio=1.0)


def test_global_scope_ranks_units_across_layers():
    from onnxpipe.stages.prune import Group

    groups = [Group("a", "channels", 4), Group("b", "channels", 4)]
    scores = {"a": np.array([1.0, 1.0, 1.0, 1.0]), "b": np.array([0.1, 2.0, 2.0, 3.9])}   # means 1 and 2
    # per layer: two of each; global: four of eight, weakest relative to its layer's mean first
    assert plan_keep(groups, scores, 0.5, "layer") == {"a": [2, 3], "b": [2, 3]}
    keep = plan_keep(groups, scores, 0.5, "global")
    assert keep["b"] == [1, 2, 3] and len(keep["a"]) == 1          # b's 0.05 goes first, then a's four 1.0s
    assert plan_keep(groups, scores, 0.99, "global") == {"a": [3], "b": [3]}   # min_keep holds


FACTORY = """
import torch
from torch import nn

def build(width: int = 8, num_classes: int = 10) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # (N, 2w, 4, 4)
        nn.Flatten(), nn.Linear(2 * width * 16, 32), nn.ReLU(), nn.Linear(32, num_classes))
    model.example_inputs = {"image": torch.zeros(2, 1, 8, 8)}
    return model
"""


def test_a_user_model_is_pruned_through_torch_pruning_and_rebuilt_from_its_history(tmp_path):
    from onnxpipe.orchestrate import Context, run_model

    path = tmp_path / "mynet.py"
    path.write_text(textwrap.dedent(FACTORY))
    run = run_model(f"{path}:build", tmp_path / "run", Context(limit=300, progress=False, sections={
        "train": {"epochs": 2}}), stages=["train"])
    ds = reload_dataset(run.dataset_info)
    prune(run, PruneConfig(ratio=0.5, epochs=1), ds, progress=False)
    p = run.section("pruning")
    assert p["library"].startswith("torch-pruning") and p["params_after"] < 0.5 * p["params_before"]
    changed = p["changed_parameters"]
    assert changed["0.weight"] == [[8, 1, 3, 3], [4, 1, 3, 3]] and changed["1.weight"] == [[8], [4]]  # BN follows
    assert changed["9.weight"][1] == [10, 16]                      # the classifier keeps its 10 classes
    history = run.artifact("pruned").model["pruning_history"]
    assert history and all(len(step) == 3 for step in history)
    net, _, _ = load_torch_variant(run, "pruned")                   # a fresh build + the replayed history
    assert sum(t.numel() for t in net.parameters()) == p["params_after"]
    acc, _ = evaluate(net, ds.x_test, ds.y_test)                   # the rebuilt network is the one scored
    assert acc == run.metrics("pruned")["accuracy"]
    export(run, ExportConfig(batches=(1, 7)), source="pruned", target="pruned_onnx")
    assert run.parity(reference="pruned", candidate="pruned_onnx")[0]["passed"]


def test_a_user_model_with_two_named_inputs_is_pruned_through_torch_pruning(two_inputs, tmp_path):
    """forward(rows, aux): Torch-Pruning traces it with the inputs by name (as every stage calls it); a GRU
    whose output is concatenated is beyond its graph: one clear error, no traceback."""
    from onnxpipe.orchestrate import Context, run_model

    factories, data = two_inputs
    ctx = Context(data=data, limit=300, progress=False, sections={"train": {"epochs": 2, "lr": 1e-2}})
    run = run_model(f"{factories}:two_dense_inputs", tmp_path / "run", ctx, stages=["train"])
    ds = reload_dataset(run.dataset_info)
    prune(run, PruneConfig(ratio=0.5, epochs=1, importance="taylor", taylor_samples=32), ds, progress=False)
    changed = run.section("pruning")["changed_parameters"]
    assert changed["rows.1.weight"] == [[16, 64], [8, 64]] and changed["aux.weight"] == [[16, 8], [8, 8]]
    assert changed["head.weight"] == [[10, 32], [10, 16]]           # both branches shrink into the classifier
    net, _, _ = load_torch_variant(run, "pruned")
    assert evaluate(net, ds.x_test, ds.y_test)[0] == run.metrics("pruned")["accuracy"]
    export(run, ExportConfig(batches=(1, 7)), source="pruned", target="pruned_onnx")
    check = run.parity(reference="pruned", candidate="pruned_onnx")[0]
    assert check["passed"] and check["max_abs"] < 1e-4
    gru = run_model(f"{factories}:two_inputs", tmp_path / "gru", ctx, stages=["train"])
    with pytest.raises(ConfigError, match=r"Torch-Pruning cannot prune .*two_inputs: TypeError.*GRU"):
        prune(gru, PruneConfig(ratio=0.5, epochs=0), reload_dataset(gru.dataset_info), progress=False)


def test_prune_command_chains_export_quantize_verify_select_from_another_directory(tiny_run, copy_run_to, tmp_path):
    """`onnxpipe prune` as users type it: a relative run folder from its parent directory, a [prune]
    section of a config file overridden by a flag, in a second process."""
    root = copy_run_to(tiny_run("gru"), tmp_path)
    (tmp_path / "exp.toml").write_text("[prune]\nratio = 0.25\nepochs = 2\nscope = \"global\"\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "prune", root.name, "--config", "exp.toml",
                           "--epochs", "1", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((root / "manifest.json").read_text())
    p = m["pruning"]
    assert p["ratio"] == 0.25 and p["scope"] == "global" and p["fine_tune"]["epochs_run"] == 1  # flag over file
    arts = m["artifacts"]
    assert {"pruned", "pruned_onnx", "pruned_onnx_opt"} <= set(arts)
    assert any(v.startswith("pruned_int8") or v == "pruned_fp16" for v in arts)
    for v, a in arts.items():
        if v.startswith("pruned_"):
            assert a["parent"] in ("pruned", "pruned_onnx")
    gates = [e for e in m["parity"] if e["reference"] == "torch" and e["candidate"] == "pruned_onnx"]
    assert gates and gates[0]["max_accuracy_drop"] == 1.5 and "uncertainty" in gates[0]
    assert set(p["speedup"]) == {"1", "64"} and m["selected"] in arts
    assert "pruning plan" in done.stdout and "rnn.layer0" in done.stdout and "drop vs unpruned" in done.stdout


def test_run_has_the_prune_stage_after_distill():
    from onnxpipe.orchestrate import STAGE_NAMES, TORCH_STAGES, parse_stages

    assert STAGE_NAMES.index("prune") == STAGE_NAMES.index("distill") + 1
    assert "prune" in TORCH_STAGES
    assert parse_stages("train,export,verify") == ["train", "export", "verify"]   # --stages can leave it out
