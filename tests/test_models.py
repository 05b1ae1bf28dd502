"""Every registered model: registry rules, forward shapes, configs, students, dynamic sequence length."""
import dataclasses

import pytest
import torch

from onnxpipe.models import ModelSpec, get_model, list_models, register_model
from onnxpipe.models.registry import UnknownModelError

MODELS = list_models()


def test_builtin_models_registered():
    assert {"cnn", "lstm", "gru", "transformer"} <= set(MODELS)


def test_duplicate_name_is_an_error():
    spec = get_model("cnn")
    with pytest.raises(ValueError, match="already registered"):
        register_model(dataclasses.replace(spec))


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError, match="registered models: .*cnn"):
        get_model("resnet9000")


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_batch(name):
    spec = get_model(name)
    cfg = spec.make_config()
    model = spec.build(cfg).eval()
    for batch in (1, 5):
        (x,) = spec.example_inputs(cfg, batch=batch).values()
        assert model(x).shape == (batch, cfg.num_classes)


@pytest.mark.parametrize("name", [n for n in MODELS if get_model(n).family == "sequence"])
def test_sequence_models_take_any_length(name):
    spec = get_model(name)
    cfg = spec.make_config()
    model = spec.build(cfg).eval()
    for t in (1, 3, 17):
        (x,) = spec.example_inputs(cfg, batch=2, seq_len=t).values()
        assert x.shape[1] == t
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_student_is_smaller(name):
    spec = get_model(name)
    cfg = spec.make_config()
    big = sum(p.numel() for p in spec.build(cfg).parameters())
    small = sum(p.numel() for p in spec.build(spec.student_config(cfg)).parameters())
    assert small < big / 2


@pytest.mark.parametrize("name", MODELS)
def test_base_size_is_bigger(name):
    spec = get_model(name)
    default = sum(p.numel() for p in spec.build(spec.make_config()).parameters())
    base = sum(p.numel() for p in spec.build(spec.make_config(size="base")).parameters())
    assert base > 4 * default


def test_config_overrides_are_typed_and_checked():
    spec = get_model("transformer")
    cfg = spec.make_config({"d_model": "128", "heads": "8"})
    assert cfg.d_model == 128 and cfg.heads == 8
    with pytest.raises(ValueError, match="unknown config key.*d_modle.*valid keys"):
        spec.make_config({"d_modle": "128"})
    with pytest.raises(ValueError, match="bad value 'big' for 'd_model'"):
        spec.make_config({"d_model": "big"})
    with pytest.raises(ValueError, match="divisible"):
        spec.make_config({"d_model": "65"})
    with pytest.raises(ValueError, match="no size 'huge'"):
        spec.make_config(size="huge")


def test_transformer_padding_mask_ignores_padded_steps():
    spec = get_model("transformer")
    cfg = spec.make_config({"dropout": 0.0})
    model = spec.build(cfg).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 6, cfg.input_size)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    x2 = x.clone()
    x2[0, 4:] = 99.0  # garbage in the padded steps
    with torch.no_grad():
        a, b = model(x, mask), model(x2, mask)
        short = model(x[:1, :4])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:1], short, atol=1e-5, rtol=1e-4)


def test_transformer_token_ids():
    spec = get_model("transformer")
    cfg = spec.make_config({"vocab_size": 50})
    ex = spec.example_inputs(cfg, batch=3)
    x, mask = ex["sequence"], ex["mask"]
    assert x.dtype == torch.int64 and spec.input_specs(cfg)[0].dtype == "int64" and int(x.max()) < 50
    assert mask.dtype == torch.bool and mask[0].all() and (mask.sum(1) >= 1).all()
    assert (x[~mask] == 0).all()  # padding past each row's length
    assert spec.build(cfg)(x).shape == (3, 10) and spec.build(cfg)(x, mask).shape == (3, 10)


def test_adapt_to_data_sets_shape_fields():
    spec = get_model("lstm")
    cfg = spec.adapt_to_data(spec.make_config(), (28, 28))
    assert (cfg.seq_len, cfg.input_size) == (28, 28)
    with pytest.raises(ValueError, match="takes samples shaped"):
        spec.adapt_to_data(spec.make_config(), (1, 28, 28))
