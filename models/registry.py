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


@dataclass(frozen=True)
class InputSpec:
    """One ONNX input: its name, layout, and which axes are dynamic.

    `shape` is the per-sample shape (without batch). `dynamic` maps axis
    index (0 = batch) to the symbolic name used in the ONNX graph.
    """

    name: str
    shape: tuple[int, ...]
    dynamic: dict[int, str]
    dtype: str = "float32"


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

    def example_inputs(self, cfg, batch: int = 2, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs of the declared shapes; `seq_len` replaces axis 1 of sequence inputs."""
        g = torch.Generator().manual_seed(0)
        out = []
        for spec in self.input_specs(cfg):
            shape = list(spec.shape)
            if seq_len is not None and 1 in spec.dynamic:
                shape[0] = seq_len
            if spec.dtype == "int64":
                out.append(torch.randint(0, cfg.vocab_size, (batch, *shape), generator=g))
            else:
                out.append(torch.randn(batch, *shape, generator=g))
        return tuple(out)

    def adapt_to_data(self, cfg, sample_shape: tuple[int, ...]):
        """Set the config's data-dependent fields (image size, sequence length, features) from the data."""
        if not self.data_fields:  # fixed inputs (a user's model): the data must fit them, dynamic axes aside
            want = self.inputs[0]
            fits = len(sample_shape) == len(want.shape) and all(
                got == size or axis + 1 in want.dynamic for axis, (got, size) in enumerate(zip(sample_shape, want.shape)))
            if not fits:
                raise ValueError(f"model {self.name!r} takes samples shaped {tuple(want.shape)}, "
                                 f"the data has shape {tuple(sample_shape)}")
            return cfg
        if len(sample_shape) != len(self.data_fields):
            expected = " x ".join(self.data_fields)
            raise ValueError(
                f"model {self.name!r} takes samples shaped ({expected}), the data has shape {tuple(sample_shape)}"
            )
        values: dict[str, Any] = {}
        for field_name, size in zip(self.data_fields, sample_shape):
            if values.get(field_name, size) != size:
                raise ValueError(f"model {self.name!r} needs {field_name} to match on every axis, data has {tuple(sample_shape)}")
            values[field_name] = int(size)
        return replace_config(cfg, values)

    def input_specs(self, cfg) -> tuple[InputSpec, ...]:
        """Inputs resolved against a config (sequence models read their length and width from it)."""
        shape_fn = getattr(cfg, "input_shape", None)
        if shape_fn is None:
            return self.inputs
        shape = tuple(shape_fn())
        dtype = "int64" if getattr(cfg, "vocab_size", 0) else "float32"
        return tuple(dataclasses.replace(s, shape=shape, dtype=dtype) for s in self.inputs)


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
