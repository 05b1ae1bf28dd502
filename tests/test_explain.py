"""Explanations: exact attributions on known models, attention maps equal to the model's own attention,
and the explain stage on tiny runs of every family (PNG grids, disagreement groups, shown in the report)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from onnxpipe.stages.explain import (ExplainConfig, attention_maps, choose_samples, explain, integrated_gradients)
from onnxpipe.runfolder import Run


def assert_png(path):
    img = Image.open(io.BytesIO(path.read_bytes()))
    assert img.format == "PNG" and min(img.size) > 100
    img.verify()


def test_integrated_gradients_of_a_linear_model_is_exact():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, base = torch.randn(4, 6), torch.randn(4, 6)
    target = torch.tensor([0, 2, 1, 2])
    attr = integrated_gradients(model, x, target, base, steps=5, max_rows=8)  # several chunks
    expected = (x - base) * model.weight[target].detach()
    assert torch.allclose(attr, expected, atol=1e-6)


def test_integrated_gradients_completeness_on_a_nonlinear_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, base = torch.randn(3, 5), torch.zeros(3, 5)
    target = torch.tensor([0, 1, 2])
    attr = integrated_gradients(model, x, target, base, steps=128)
    with torch.no_grad():
        gap = model(x).gather(1, target[:, None])[:, 0] - model(base).gather(1, target[:, None])[:, 0]
    assert torch.allclose(attr.sum(1), gap, atol=1e-3)


def test_attention_maps_are_the_models_attention_and_leave_its_output_alone():
    from onnxpipe.models import get_model

    spec = get_model("transformer")
    cfg = spec.make_config({"d_model": 16, "heads": 2, "layers": 2, "ff": 32, "dropout": 0.0})
    torch.manual_seed(0)
    model = spec.build(cfg).eval()
    x = torch.randn(3, 5, cfg.input_size)
    with torch.inference_mode():
        before = model(x)
    maps = attention_maps(model, x)
    with torch.inference_mode():
        after = model(x)
        assert torch.equal(before, after)
        assert len(maps) == cfg.layers and maps[0].shape == (3, cfg.heads, 5, 5)
        assert torch.allclose(maps[0].sum(-1), torch.ones(3, cfg.heads, 5), atol=1e-6)
        block = model.blocks[0]
        h = block.ln1(model.embed(x) + model.pos[:5])
        q, k, v = (t.view(3, 5, cfg.heads, -1).transpose(1, 2) for t in block.qkv(h).split(cfg.d_model, dim=-1))
        assert torch.allclose(maps[0] @ v, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_samples_put_misclassified_first():
    labels = np.array([0, 1, 2, 3, 4, 5])
    pred = np.array([0, 9, 2, 9, 4, 5])
    chosen = choose_samples(labels, pred, 4, seed=0)
    assert chosen[:2] == [1, 3] and len(chosen) == 4 and all(pred[i] == labels[i] for i in chosen[2:])
    assert choose_samples(labels, labels, 3, seed=0) == sorted(choose_samples(labels, labels, 3, seed=0))


def test_explain_cnn_with_a_disagreeing_variant_shows_in_the_report(copy_of):
    from onnxpipe.stages.report import write_report
    from onnxpipe.core.predictors import load_torch_model, save_weights

    run = Run.open(copy_of("cnn"))
    model = load_torch_model(run)
    noisy = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
    save_weights(run.root / "student.pt", "cnn", run.model_config(), noisy)
    run.add_artifact("student", "student.pt", stage="distill", parent="torch", format="torch", lossy=True)
    info = explain(run, ExplainConfig(samples=4, steps=8))
    groups = {g["variant"]: g for g in info["groups"]}
    assert None in groups and "student" in groups
    assert len(groups[None]["indices"]) == 4
    disagree = groups["student"]
    assert all(s != t for s, t in zip(disagree["variant_pred"], disagree["torch_pred"]))
    for g in info["groups"]:
        assert_png(run.root / g["png"])
    page, md = write_report(Run.open(run.root))
    text = page.read_text()
    assert "student: where it disagrees with torch" in text and "explain/disagree_student.png" in md.read_text()


@pytest.mark.parametrize("model_name", ["lstm", "transformer"])
def test_explain_sequence_models(model_name, tmp_path):
    from onnxpipe.orchestrate import Context, run_model

    ctx = Context(limit=120, progress=False, sections={"train": {"epochs": 1}})
    run = run_model(model_name, tmp_path / model_name, ctx, stages=["train"])
    info = explain(run, ExplainConfig(samples=3, steps=4))
    assert "time step" in info["method"] and ("attention" in info["method"]) == (model_name == "transformer")
    assert len(info["groups"]) == 1 and len(info["groups"][0]["indices"]) == 3
    assert_png(run.root / info["groups"][0]["png"])


def test_bad_explain_settings_are_config_errors():
    from onnxpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="samples"):
        ExplainConfig(samples=0)
