"""PyTorch model definitions and the registry. Importing this package registers the built-in models."""
from .registry import (
    InputSpec,
    ModelSpec,
    call_model,
    takes_names,
    UnknownModelError,
    get_model,
    list_models,
    register_model,
    replace_config,
)
from . import cnn, rnn, transformer  # noqa: F401  (registers the built-in models)

__all__ = [
    "InputSpec", "ModelSpec", "UnknownModelError", "call_model", "takes_names",
    "get_model", "list_models", "register_model", "replace_config",
]
