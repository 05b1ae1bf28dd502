"""Bring your own PyTorch model: a factory "my_pkg.my_module:build" or "path/to/file.py:build"
becomes a ModelSpec, so train, export, compression, verify, bench and serve take it unchanged.

What a user writes (the shortest working example):

    # mynet.py
    import torch
    from torch import nn

    def build(hidden: int = 32, num_classes: int = 10) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        model.example_inputs = {"image": torch.zeros(2, 1, 8, 8)}   # ONNX input name -> an example batch
        return model                                                # batch axis 0 is dynamic by default

    $ onnxpipe run --model mynet.py:build

- The config is a frozen dataclass made from build()'s keyword defaults (`--set hidden=64`).
- `model.dynamic_axes = {"tokens": {0: "batch", 1: "seq_len"}}` declares a dynamic sequence axis;
  `model.output_names = ("logits",)` names the outputs. The file may instead hold EXAMPLE_INPUTS,
  DYNAMIC_AXES and OUTPUT_NAMES beside the factory (for a factory that returns a stock module).
- The first output must be (batch, classes) scores: onnxpipe's data and parity budgets are for classifiers.
- The manifest records where the factory lives (module or file, and the file's sha256) so that later
  stages rebuild the same model; a factory file that changed since the run was made is an error.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ..atomic import sha256_file
from ..errors import ArtifactError, ConfigError

SCALARS = (bool, int, float, str, type(None))
ALLOWED_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.int64": "int64",
                  "torch.int32": "int32", "torch.bool": "bool"}
ROLES = ("data", "tokens", "mask", "constant")
_SPECS: dict[tuple, Any] = {}  # (file or module, factory, sha256) -> ModelSpec: Run.spec asks often


def is_factory_ref(name: str) -> bool:
    """Registered names never contain ':'; factories are 'module:function' or 'file.py:function'."""
    return ":" in name


def resolve_model(name: str):
    """A registered model by name, or a user factory by reference."""
    from ..models import UnknownModelError, get_model

    if is_factory_ref(name):
        return factory_spec(name)
    try:
        return get_model(name)
    except UnknownModelError as e:
        raise ConfigError(f"{e}; or bring your own model as my_pkg.my_module:build or path/to/file.py:build") from None


def model_folder(name: str) -> str:
    """The run-folder name for a model name or factory reference (exports/<this>)."""
    return resolve_model(name).name


# --- finding the factory --------------------------------------------------------------------------------

def _split_ref(ref: str) -> tuple[str, str]:
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"bad model factory {ref!r}: expected my_pkg.my_module:build or path/to/file.py:build")
    return where, attr


def _load_file_module(path: Path, digest: str):
    """Import a .py file under a name tied to its content, so an edited file is imported afresh."""
    name = f"onnxpipe_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code can raise anything; report it as a config problem
        del sys.modules[name]
        raise ConfigError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_factory(ref: str) -> tuple[Callable, Any, dict]:
    """(factory, its Python module, source record for the manifest)."""
    where, attr = _split_ref(ref)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model factory file {where} does not exist (from {ref!r})")
        digest = sha256_file(path)
        module = _load_file_module(path, digest)
        source = {"kind": "factory", "ref": ref, "module": None, "file": str(path), "sha256": digest}
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name and where.startswith(e.name):
                raise ConfigError(f"cannot import module {where!r} (from {ref!r}): install the package or add its "
                                  f"folder to PYTHONPATH; for a single file use path/to/file.py:{attr}") from None
            raise ConfigError(f"importing {where} failed: {e}") from e
        file = getattr(module, "__file__", None)
        source = {"kind": "factory", "ref": ref, "module": where, "file": file,
                  "sha256": sha256_file(file) if file else None}
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ConfigError(f"{where} has no factory {attr!r}; its callables: {', '.join(have) or 'none'}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{ref}: {attr!r} is a {type(factory).__name__}, not a function that builds a model")
    return factory, module, source


# --- the config, from the factory's keyword defaults -----------------------------------------------------

def config_class(factory: Callable, ref: str, name: str) -> type:
    """A frozen dataclass with one field per keyword of the factory, defaults included."""
    fields = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ConfigError(f"{ref}: parameter {p.name!r} has no default; give every parameter of the factory a "
                              "default (the run's config is made from them and changed with --set)")
        value = p.default
        if isinstance(value, (list, tuple)) and all(isinstance(v, SCALARS) for v in value):
            value = tuple(value)
        elif not isinstance(value, SCALARS):
            raise ConfigError(f"{ref}: parameter {p.name!r} defaults to a {type(value).__name__}; defaults must be "
                              "numbers, strings, booleans, None or tuples of them (they go into manifest.json)")
        fields.append((p.name, type(value) if value is not None else Any, dataclasses.field(default=value)))
    cls_name = "".join(w.capitalize() for w in re.split(r"[^0-9A-Za-z]", name) if w) + "Config"
    return dataclasses.make_dataclass(cls_name, fields, frozen=True)


# --- what the model declares about its inputs ------------------------------------------------------------

def _declared(model, module, attr: str):
    value = getattr(model, attr, None)
    return value if value is not None else getattr(module, attr.upper(), None)


def _example_inputs(model, module, ref: str) -> dict:
    import torch

    ex = _declared(model, module, "example_inputs")
    if ex is None:
        raise ConfigError(
            f"{ref} declares no example input: in the factory set model.example_inputs = "
            "{'image': torch.zeros(2, 1, 28, 28)} (input name -> an example batch), or define EXAMPLE_INPUTS beside it")
    if isinstance(ex, torch.Tensor):
        ex = {"input": ex}
    elif isinstance(ex, (tuple, list)):
        ex = {f"input_{i}": t for i, t in enumerate(ex)}
    if not isinstance(ex, dict) or not ex:
        raise ConfigError(f"{ref}: example_inputs must be a tensor, a tuple of tensors or a dict name -> tensor")
    for name, t in ex.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{ref}: input name {name!r} must be an identifier (it becomes the ONNX input name)")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{ref}: example input {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if str(t.dtype) not in ALLOWED_DTYPES:
            raise ConfigError(f"{ref}: example input {name!r} has dtype {t.dtype}; use one of "
                              f"{', '.join(ALLOWED_DTYPES)}")
        if t.ndim < 2:
            raise ConfigError(f"{ref}: example input {name!r} has shape {list(t.shape)}; it needs a batch axis "
                              "and at least one sample axis, e.g. (2, 1, 28, 28) or (2, 16) token ids")
    return ex


def _dynamic_axes(model, module, example: dict, ref: str) -> dict[str, dict[int, str]]:
    declared = _declared(model, module, "dynamic_axes") or {}
    if not isinstance(declared, dict):
        raise ConfigError(f"{ref}: dynamic_axes must be a dict, e.g. {{'image': {{0: 'batch'}}}}")
    unknown = sorted(set(declared) - set(example))
    if unknown:
        raise ConfigError(f"{ref}: dynamic_axes names input(s) {', '.join(map(repr, unknown))} that the example "
                          f"inputs do not have ({', '.join(example)})")
    out = {}
    for name, t in example.items():
        axes = declared.get(name, {0: "batch"})
        if isinstance(axes, (list, tuple)):  # ONNX-style list of axis indices
            axes = {a: "batch" if a == 0 else f"{name}_dim{a}" for a in axes}
        axes = {int(a): str(n) for a, n in axes.items()}
        for a, n in axes.items():
            if not 0 <= a < t.ndim:
                raise ConfigError(f"{ref}: dynamic axis {a} ({n}) of input {name!r} does not exist: the example "
                                  f"input has shape {list(t.shape)} (axes 0..{t.ndim - 1})")
            if not n.isidentifier():
                raise ConfigError(f"{ref}: dynamic axis name {n!r} of input {name!r} must be an identifier")
        if 0 not in axes:
            raise ConfigError(f"{ref}: axis 0 (batch) of input {name!r} must be dynamic; declare {{0: 'batch', ...}}")
        out[name] = dict(sorted(axes.items()))
    sizes: dict[str, int] = {}
    for name, axes in out.items():          # axes that share a name must share a size
        for a, n in axes.items():
            size = int(example[name].shape[a])
            if a and sizes.setdefault(n, size) != size:
                raise ConfigError(f"{ref}: dynamic axis {n!r} has size {sizes[n]} in one example input and {size} in "
                                  f"{name!r}; axes with one name must have one size")
    return out


def _role(name: str, t, declared: dict) -> str:
    """What feeds an input: declared (model.input_roles / INPUT_ROLES), else read from its name and dtype."""
    from ..models.registry import guess_role

    if name in declared:
        role = declared[name]
        if role not in ROLES:
            raise ConfigError(f"input_roles[{name!r}] is {role!r}; use one of {', '.join(ROLES)}")
        return role
    return guess_role(name, ALLOWED_DTYPES[str(t.dtype)])


def _vocab(model, cfg, module) -> int | None:
    """The token vocabulary: a declared VOCAB_SIZE / model.vocab_size, a `vocab_size` keyword, else the
    largest nn.Embedding in the model."""
    from torch import nn

    declared = _declared(model, module, "vocab_size")
    if isinstance(declared, int) and declared > 0:
        return declared
    value = getattr(cfg, "vocab_size", None)
    if isinstance(value, int) and value > 0 and "vocab_size" in {f.name for f in dataclasses.fields(cfg)}:
        return value
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def _layout(name: str, shape: tuple, declared: dict) -> str | None:
    from ..models.registry import guess_layout

    if len(shape) != 3:
        return None
    return declared.get(name) or guess_layout(shape)


def _has_attention(model) -> bool:
    """Modules that compute attention (nn.MultiheadAttention, or any class named *Attention*)."""
    from torch import nn

    return any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower() for m in model.modules())


def _probe(model, example: dict, dynamic: dict, specs, ref: str):
    """Run the model on its example and again with every dynamic axis one longer; returns the outputs."""
    import torch

    from ..models import call_model

    def run(inputs: dict, what: str):
        try:
            with torch.no_grad():
                out = call_model(model, inputs)
        except Exception as e:  # the user's forward can raise anything
            raise ConfigError(f"{ref}: the model fails on {what} (inputs {shapes(inputs)}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            raise ConfigError(f"{ref}: forward must return a tensor or a tuple of tensors, got {type(out).__name__} "
                              "(a Hugging Face model returns an output object: return its .logits)")
        return outs

    def shapes(inputs):
        return ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())

    model.eval()
    outs = run(example, "its example input")
    grown = {}
    g = torch.Generator().manual_seed(0)
    for spec in specs:
        t = example[spec.name]
        shape = [s + 1 if a in dynamic[spec.name] else s for a, s in enumerate(t.shape)]
        if spec.role == "tokens":
            grown[spec.name] = torch.randint(0, max(1, spec.high or 2), shape, generator=g).to(t.dtype)
        elif spec.role == "mask":
            grown[spec.name] = torch.ones(shape, dtype=t.dtype)
        elif spec.role == "constant" or not t.is_floating_point():
            grown[spec.name] = torch.zeros(shape, dtype=t.dtype)
        else:
            grown[spec.name] = torch.randn(*shape, generator=g).to(t.dtype)
    changed = ", ".join(f"{n} axis {a} ({d})" for n in dynamic for a, d in dynamic[n].items())
    outs2 = run(grown, f"inputs one longer on its dynamic axes ({changed}) — it hard-codes a size that "
                       "dynamic_axes declares dynamic")
    batch = next(iter(grown.values())).shape[0]
    if outs2[0].ndim < 1 or outs2[0].shape[0] != batch:
        raise ConfigError(f"{ref}: with a batch of {batch} the first output has shape {list(outs2[0].shape)}; "
                          "its axis 0 must follow the batch (does the model hard-code its batch size?)")
    return outs


def factory_spec(ref: str):
    """Load the factory behind `ref` and describe it as a ModelSpec (checked by running it once)."""
    from torch import nn

    from ..models import InputSpec, ModelSpec

    factory, module, source = load_factory(ref)
    where, attr = _split_ref(ref)
    key = (source["module"] or source["file"], attr, source["sha256"])
    if key in _SPECS:
        return _SPECS[key]
    stem = Path(where).stem if source["module"] is None else where.rsplit(".", 1)[-1]
    name = stem if attr == "build" else f"{stem}_{attr.replace('.', '_')}"
    cfg_cls = config_class(factory, ref, name)

    def build(cfg) -> nn.Module:
        model = factory(**dataclasses.asdict(cfg))
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{ref} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    try:
        model = build(cfg_cls())
    except ConfigError:
        raise
    except Exception as e:  # the user's factory can raise anything
        raise ConfigError(f"{ref}() failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    example = _example_inputs(model, module, ref)
    dynamic = _dynamic_axes(model, module, example, ref)
    roles = _declared(model, module, "input_roles") or {}
    layouts = _declared(model, module, "input_layout") or {}
    vocab = _vocab(model, cfg_cls(), module)
    inputs = []
    for n, t in example.items():
        role = _role(n, t, roles)
        shape = tuple(int(s) for s in t.shape[1:])
        inputs.append(InputSpec(n, shape, dynamic[n], ALLOWED_DTYPES[str(t.dtype)], role=role,
                                high=vocab if role == "tokens" else None,
                                layout=_layout(n, shape, layouts) if role == "data" and t.is_floating_point() else None))
    inputs = tuple(inputs)
    outs = _probe(model, example, dynamic, inputs, ref)
    first = outs[0]
    if first.ndim != 2:
        raise ConfigError(f"{ref}: the first output has shape {list(first.shape)}; onnxpipe needs (batch, classes) "
                          "scores (logits) from it")
    names = _declared(model, module, "output_names")
    names = tuple(names) if names else ("logits",) + tuple(f"output_{i}" for i in range(1, len(outs)))
    if len(names) != len(outs):
        raise ConfigError(f"{ref}: output_names has {len(names)} name(s) but forward returns {len(outs)} tensor(s)")
    primary = next((s for s in inputs if s.role in ("data", "tokens")), inputs[0])
    family = "image" if primary.kind == "image" else "sequence"
    # Settings that prepare_run reads from a config; the factory's own keywords win.
    if "num_classes" not in {f.name for f in dataclasses.fields(cfg_cls)}:
        cfg_cls.num_classes = int(first.shape[1])
    student = _declared(model, module, "student") or {}
    if not isinstance(student, dict):
        raise ConfigError(f"{ref}: STUDENT (or model.student) must be a dict of the factory's keywords, e.g. "
                          "{'hidden': 16}")
    opset = _declared(model, module, "opset") or (23 if _has_attention(model) else 18)
    spec = ModelSpec(name=name, family=family, config_cls=cfg_cls, build=build, inputs=inputs, output_names=names,
                     description=f"user factory {ref}", source=source, student=dict(student), opset=int(opset))
    _SPECS[key] = spec
    return spec


def spec_from_source(source: dict):
    """Rebuild a run's user model from the manifest's record; the factory file must be unchanged."""
    file = source.get("file")
    if file and not Path(file).is_file():
        raise ConfigError(f"this run's model comes from {source['ref']}, but {file} no longer exists; "
                          "restore it or run again with the factory where it is now")
    if file and source.get("sha256") and sha256_file(file) != source["sha256"]:
        raise ArtifactError(
            f"the model factory {file} changed since this run was made (sha256 {sha256_file(file)[:12]}... != "
            f"{source['sha256'][:12]}...); its weights may no longer fit: restore the file or make a new run")
    ref = source["ref"] if source.get("module") else f"{file}:{_split_ref(source['ref'])[1]}"
    return factory_spec(ref)
