"""PyTorch model definitions and the registry. Importing this package registers the built-in models."""
from .registry import (
    InputSpec,
    ModelSpec,
    UnknownModelError,
    get_model,
    list_models,
    register_model,
    replace_config,
)
from . import cnn, rnn, transformer  # noqa: F401  (registers the built-in models)

__all__ = [
    "InputSpec", "ModelSpec", "UnknownModelError",
    "get_model", "list_models", "register_model", "replace_config",
]
