"""Layer 2: data, model sources, ONNX Runtime sessions, predictors, the parity policy, the one timing loop.

Importing this package registers the model sources (registry, user factory, imported graph) with the run
folder (pipeline/core/sources.py); it imports nothing heavy itself."""
from . import sources  # noqa: F401  (registers the model-source resolvers with runfolder)
