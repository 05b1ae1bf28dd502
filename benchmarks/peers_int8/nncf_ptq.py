"""Peer: NNCF post-training quantization of the ONNX model (`nncf.quantize` on an onnx.ModelProto with an
`nncf.Dataset`), its defaults (preset performance: symmetric int8 activations and weights, MinMax-style
statistics with its bias correction), every calibration row as one sample (subset_size = all of them),
`model_type=TRANSFORMER` for the Transformer as NNCF's documentation recommends."""
from __future__ import annotations

from pathlib import Path


def quantize(src: Path, out: Path, calib: dict, workdir: Path, *, transformer: bool = False) -> dict:
    import nncf
    import onnx

    n = len(next(iter(calib.values())))
    rows = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    q = nncf.quantize(onnx.load(str(src)), nncf.Dataset(rows), subset_size=n, **extra)
    onnx.save(q, str(out))
    return {"pre_process": "none (NNCF takes the model as exported)",
            "settings": f"nncf.quantize defaults, {n} samples" + (", model_type=TRANSFORMER" if transformer else "")}
