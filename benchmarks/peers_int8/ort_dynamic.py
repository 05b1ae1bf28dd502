"""Peer: ONNX Runtime's quantize_dynamic after quant_pre_process, with its defaults (int8 weights, every
op type it quantizes: MatMul/Gemm, Conv, LSTM/GRU where it has a kernel, Attention, ...)."""
from __future__ import annotations

from pathlib import Path

from common import pre_process


def quantize(src: Path, out: Path, calib: dict, workdir: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, pre = pre_process(src, workdir)
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    return {"pre_process": pre, "settings": "dynamic, int8 weights, ORT's default op types"}
