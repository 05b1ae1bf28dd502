"""Peer: ONNX Runtime's quantize_static after quant_pre_process, as ORT's documentation describes it:
QDQ format, U8S8 (uint8 activations, int8 weights), MinMax calibration, every op type ORT quantizes,
per-tensor or per-channel weight scales."""
from __future__ import annotations

from pathlib import Path

from common import pre_process, reader


def quantize(src: Path, out: Path, calib: dict, workdir: Path, *, per_channel: bool = False) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model, pre = pre_process(src, workdir)
    quantize_static(str(model), str(out), reader(calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    calibrate_method=CalibrationMethod.MinMax)
    return {"pre_process": pre, "settings": f"QDQ U8S8 MinMax, {'per-channel' if per_channel else 'per-tensor'}"}
