"""Peer: Hugging Face optimum's ORTQuantizer on the ONNX file with AutoQuantizationConfig.avx512_vnni
(this CPU has AVX-512 VNNI): dynamic (is_static=False), or static (is_static=True, QDQ) with
AutoCalibrationConfig.minmax over the calibration rows as a `datasets.Dataset`; its defaults otherwise
(per-channel, symmetric int8 weights, uint8 activations).

optimum's ONNX Runtime support (optimum-onnx) pins transformers < 4.58, which the project's own venv
(transformers 5) cannot hold: it runs from benchmarks/peers-venv/optimum:

    python3 -m venv benchmarks/peers-venv/optimum
    benchmarks/peers-venv/optimum/bin/pip install torch==2.13.0
    benchmarks/peers-venv/optimum/bin/pip install "optimum-onnx[onnxruntime]" datasets "huggingface-hub<1" \
        onnxruntime==<the project's>

(`datasets`: the static calibration takes a datasets.Dataset; huggingface-hub < 1: transformers 4.57 needs it.)"""
from __future__ import annotations

import shutil
from pathlib import Path


def quantize(src: Path, out: Path, calib: dict, workdir: Path, *, static: bool = False) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig

    model_dir = workdir / "fp32"
    model_dir.mkdir(exist_ok=True)
    shutil.copyfile(src, model_dir / "model.onnx")
    quantizer = ORTQuantizer.from_pretrained(model_dir, file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=static)
    save_dir = workdir / "optimum_out"
    ranges = None
    if static:
        from datasets import Dataset

        ds = Dataset.from_dict({k: [row for row in v] for k, v in calib.items()})
        ranges = quantizer.fit(dataset=ds, calibration_config=AutoCalibrationConfig.minmax(ds),
                               operators_to_quantize=qconfig.operators_to_quantize, batch_size=32)
    quantizer.quantize(save_dir=save_dir, quantization_config=qconfig, calibration_tensors_range=ranges)
    (written,) = [p for p in save_dir.glob("*.onnx")]
    import onnx

    onnx.save(onnx.load(str(written)), str(out))
    return {"pre_process": "none (optimum quantizes the file as given)",
            "settings": f"avx512_vnni(is_static={static}) defaults (per-channel, symmetric weights)"
                        + (", format QDQ, minmax calibration" if static else "")}
