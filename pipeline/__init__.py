"""onnxpipe: stages that carry a PyTorch model to verified, compressed ONNX Runtime deployments.

Kept import-light on purpose: `onnxpipe --help` must not import torch or onnxruntime."""
__version__ = "0.1.0"
