"""Torch-Pruning (`torch-pruning` on PyPI) for a user's own model: the dependency graph that finds what
must shrink together (a conv's output channels, the BatchNorm after it, the next layer's inputs) and the
one place its pruning history is replayed.

A pruned factory model cannot be rebuilt from the factory's keyword arguments alone, so its checkpoint
records Torch-Pruning's pruning history (plain data: [module name, output-channel pruning?, indices], in
order) and `replay` applies it to a freshly built model before the weights are loaded (load_torch_variant).
The library is an optional extra (`pip install "onnxpipe[prune]"`); the built-in models are pruned by
onnxpipe itself (pipeline/stages/prune.py) and do not need it."""
from __future__ import annotations

from ..errors import ArtifactError, ConfigError


def torch_pruning():
    """The torch_pruning module, or a ConfigError saying how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("pruning a model of your own (a factory) needs Torch-Pruning: "
                          "pip install \"onnxpipe[prune]\" (or pip install torch-pruning)") from None
    return tp


def version() -> str:
    import importlib.metadata as md

    try:
        return md.version("torch-pruning")
    except md.PackageNotFoundError:
        return "unknown"


def forward(model, inputs: dict):
    """Torch-Pruning's `forward_fn`: the model called with its named inputs the way every stage calls it
    (models.call_model: by keyword where forward names them, else by position)."""
    from ..models import call_model

    return call_model(model, inputs)


def replay(model, example_inputs: dict, history: list) -> None:
    """Apply a recorded pruning history to `model` (freshly built, unpruned) in place."""
    tp = torch_pruning()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=forward)
    try:
        graph.load_pruning_history([[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in history])
    except (AttributeError, IndexError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"the recorded pruning history does not fit the model the factory builds now "
                          f"({type(e).__name__}: {str(e)[:200]}); prune the run again") from None
