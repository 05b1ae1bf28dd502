"""Model registry: every model is a ModelSpec registered by name.

Tests loop over `list_models()`, so a model is tested the moment it is
registered. A spec is pure data plus a builder; the exporter, trainer and
runtime stay generic and read everything model-specific from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..errors import ConfigError

Family = Literal["image", "sequence"]


class UnknownModelError(ConfigError, KeyError):
    """A model name that is not in the registry (a user error: one line from the CLI)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


DTYPES = ("float32", "float16", "int64", "int32", "bool")
ROLES = ("data", "tokens", "mask", "constant")


@dataclass(frozen=True)
class InputSpec:
    """One ONNX input: its name, per-sample shape, dtype, which axes are dynamic, and what feeds it.

    `shape` is the per-sample shape (without batch). `dynamic` maps axis index (0 = batch) to the
    symbolic name used in the ONNX graph; axes with the same name vary together. `role` says where its
    values come from: "data" (float samples: images, feature sequences), "tokens" (integer ids below
    `high`), "mask" (1/True where a token is real, consistent with the tokens' lengths) or "constant"
    (zeros, e.g. token_type_ids). `layout` is "nchw" or "nhwc" for image inputs. `optional` inputs may be
    left out of a request (the model has a default for them)."""

    name: str
    shape: tuple[int, ...]
    dynamic: dict[int, str]
    dtype: str = "float32"
    role: str = "data"
    high: int | None = None          # tokens: ids are in [0, high)
    layout: str | None = None        # images: "nchw" or "nhwc"
    optional: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"input {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.role not in ROLES:
            raise ValueError(f"input {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float16")

    @property
    def kind(self) -> str:
        """How data is shaped for it: image (C,H,W / H,W,C floats), sequence (T,F floats), tokens, mask, other."""
        if self.role in ("tokens", "mask"):
            return self.role
        if self.is_float and len(self.shape) == 3:
            return "image"
        if self.is_float and len(self.shape) == 2:
            return "sequence"
        return "other"

    def image_hwc(self) -> tuple[int, int, int]:
        """(height, width, channels) of an image input, whatever its layout."""
        if self.layout == "nhwc":
            h, w, c = self.shape
        else:
            c, h, w = self.shape
        return h, w, c

    def to_json(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dynamic": {str(a): n for a, n in self.dynamic.items()},
             "dtype": self.dtype, "role": self.role}
        for k in ("high", "layout"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.optional:
            d["optional"] = True
        return d

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        return cls(d["name"], tuple(d["shape"]), {int(a): n for a, n in d["dynamic"].items()}, d.get("dtype", "float32"),
                   d.get("role", "data"), d.get("high"), d.get("layout"), bool(d.get("optional", False)))


def guess_role(name: str, dtype: str) -> str:
    """What feeds an input, read from its name and dtype: a mask (name holds "mask", or bool), float data,
    constant zeros (token_type_ids, position or segment ids) or token ids (any other integer input)."""
    low = name.lower()
    if "mask" in low or dtype == "bool":
        return "mask"
    if dtype in ("float32", "float16"):
        return "data"
    if "type" in low or "position" in low or "segment" in low:
        return "constant"
    return "tokens"


def guess_layout(shape: tuple[int, ...]) -> str:
    """Channels-last (H, W, C) when the last axis looks like channels and the first does not."""
    return "nhwc" if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] not in (1, 3, 4) else "nchw"


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
                "bool": torch.bool}


def takes_names(module: nn.Module, names) -> bool:
    """Whether forward takes these inputs by keyword: it names every one of them, or takes **kwargs."""
    target = getattr(module, "module", module)   # DistributedDataParallel wraps the real module
    key = (type(target), tuple(names))
    if key not in _CALL_STYLE:
        import inspect

        try:
            params = inspect.signature(target.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _CALL_STYLE[key] = any(p.kind == p.VAR_KEYWORD for p in params.values()) or set(names) <= set(params)
    return _CALL_STYLE[key]


def call_model(module: nn.Module, inputs: dict):
    """module(**inputs) when forward names its parameters like the inputs, else module(*inputs.values()).

    Inputs are named (the ONNX names); a user's forward(input_ids, attention_mask) takes them by keyword,
    so their order never matters, while an nn.Sequential (forward(input)) takes the one input by position."""
    return module(**inputs) if takes_names(module, inputs) else module(*inputs.values())


_CALL_STYLE: dict[tuple, bool] = {}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    config_cls: type
    build: Callable[[Any], nn.Module]
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...] = ("logits",)
    # Config fields that take their values from the data's per-sample shape.
    data_fields: tuple[str, ...] = ()
    # Overrides applied to the default config to make the distillation student.
    student: dict[str, Any] = field(default_factory=dict)
    # Named size presets (e.g. "base" for compression experiments).
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Training settings that reach this model's accuracy target on digits (epochs, lr, ...).
    train_defaults: dict[str, Any] = field(default_factory=dict)
    # Distillation settings measured best for this model's student (temperature, alpha, mixup).
    distill_defaults: dict[str, Any] = field(default_factory=dict)
    opset: int = 18
    description: str = ""
    # Where a model from outside the registry comes from (a user factory, an imported ONNX graph);
    # recorded in the manifest as "model_source" so later stages rebuild the same spec. None: built-in.
    source: dict | None = None
    # This model's own parity settings over the policy's (pipeline/core/policy.py): atol, rtol,
    # max_accuracy_drop, min_agreement, student_max_accuracy_drop.
    parity: dict[str, float] = field(default_factory=dict)
    # The inputs as a function of the config (built-in models whose shapes follow their config); None:
    # `inputs` as declared.
    input_fn: Callable[[Any], tuple[InputSpec, ...]] | None = None

    def make_config(self, overrides: dict[str, Any] | None = None, size: str | None = None):
        """Default config, then the size preset, then explicit overrides."""
        values: dict[str, Any] = {}
        if size and size != "default":
            if size not in self.sizes:
                known = ", ".join(["default", *self.sizes]) or "default"
                raise ValueError(f"model {self.name!r} has no size {size!r}; known sizes: {known}")
            values.update(self.sizes[size])
        values.update(overrides or {})
        return replace_config(self.config_cls(), values)

    def config_fields(self) -> tuple[str, ...]:
        """The names of the config's fields."""
        return tuple(f.name for f in dataclasses.fields(self.config_cls))

    def config_from(self, values: dict[str, Any]):
        """The config dataclass from recorded values (a manifest's model_config, a checkpoint's config)."""
        return replace_config(self.config_cls(), values)

    def student_config(self, teacher_cfg):
        return replace_config(teacher_cfg, self.student)

    def example_inputs(self, cfg, batch: int = 2, seq_len: int | None = None,
                       sizes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Random inputs of the declared shapes, by name. `sizes` sets dynamic axes by name ({"seq_len": 16});
        `seq_len` sets axis 1 of every input whose axis 1 is dynamic. Token ids are below the input's
        `high`; a mask marks a seeded prefix of each row real (one row full length), tokens past it are 0."""
        g = torch.Generator().manual_seed(0)
        out: dict[str, torch.Tensor] = {}
        specs = self.input_specs(cfg)
        lengths = None
        for spec in specs:
            shape = list(spec.shape)
            for axis, name in spec.dynamic.items():
                if axis == 0:
                    continue
                if sizes and name in sizes:
                    shape[axis - 1] = sizes[name]
                elif seq_len is not None and axis == 1:
                    shape[axis - 1] = seq_len
            full = (batch, *shape)
            dtype = TORCH_DTYPES[spec.dtype]
            if spec.role == "tokens" or (not spec.is_float and spec.role == "data"):
                out[spec.name] = torch.randint(0, max(1, spec.high or 2), full, generator=g).to(dtype)
            elif spec.role == "mask":
                t = full[1] if len(full) > 1 else 1
                if lengths is None or len(lengths) != batch:
                    lengths = torch.randint(1, t + 1, (batch,), generator=g)
                    lengths[0] = t
                mask = torch.arange(t)[None, :] < lengths[:, None]
                out[spec.name] = mask.reshape(full).to(dtype)
            elif spec.role == "constant":
                out[spec.name] = torch.zeros(full, dtype=dtype)
            else:
                out[spec.name] = torch.randn(full, generator=g).to(dtype)
        if lengths is not None:  # tokens past each row's length are padding
            for spec in specs:
                if spec.role == "tokens" and out[spec.name].ndim == 2:
                    pad = torch.arange(out[spec.name].shape[1])[None, :] >= lengths[:, None]
                    out[spec.name] = out[spec.name].masked_fill(pad, 0)
        return out

    def adapt_to_data(self, cfg, sample_shapes: dict[str, tuple[int, ...]] | tuple[int, ...]):
        """Set the config's data-dependent fields from the data's per-sample shapes ({input name: shape}).

        Built-in models name those fields (`data_fields`, aligned from the left with the first input's
        shape: tokens (T,) set only the sequence length); a user's model has fixed inputs that the data
        must fit, dynamic axes aside."""
        specs = self.input_specs(cfg)
        if not isinstance(sample_shapes, dict):  # one shape: the first input's
            sample_shapes = {specs[0].name: tuple(sample_shapes)}
        if not self.data_fields:
            for want in specs:
                got = sample_shapes.get(want.name)
                if got is None:
                    continue
                fits = len(got) == len(want.shape) and all(
                    g == size or axis + 1 in want.dynamic for axis, (g, size) in enumerate(zip(got, want.shape)))
                if not fits:
                    raise ValueError(f"model {self.name!r} takes {want.name!r} samples shaped {tuple(want.shape)}, "
                                     f"the data has shape {tuple(got)}")
            return cfg
        sample_shape = tuple(sample_shapes[specs[0].name])
        if len(sample_shape) > len(self.data_fields):
            expected = " x ".join(self.data_fields)
            raise ValueError(
                f"model {self.name!r} takes samples shaped ({expected}), the data has shape {sample_shape}"
            )
        values: dict[str, Any] = {}
        for field_name, size in zip(self.data_fields, sample_shape):
            if values.get(field_name, size) != size:
                raise ValueError(f"model {self.name!r} needs {field_name} to match on every axis, data has {sample_shape}")
            values[field_name] = int(size)
        return replace_config(cfg, values)

    def input_specs(self, cfg) -> tuple[InputSpec, ...]:
        """Inputs resolved against a config (built-in models read their shapes from it: `input_fn`)."""
        return tuple(self.input_fn(cfg)) if self.input_fn is not None else self.inputs

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}"
        ) from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Coerce a string override (from --set) to the type of the current value."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ValueError(f"bad value {value!r} for {key!r}: expected {type(current).__name__}") from None
    return value


def replace_config(cfg, values: dict[str, Any]):
    """dataclasses.replace with a clear error for unknown keys and string coercion."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)} for {type(cfg).__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    coerced = {k: _coerce(v, getattr(cfg, k), k) for k, v in values.items()}
    return dataclasses.replace(cfg, **coerced)
