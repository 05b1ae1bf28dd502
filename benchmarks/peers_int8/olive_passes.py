"""Peer: Olive's ONNX quantization passes, run as passes on the ONNX file (no workflow search):
OnnxStaticQuantization (its defaults: QDQ, MinMax, U8S8, its own quant_pre_process) with a data config
whose dataset is the calibration rows, or OnnxDynamicQuantization (its defaults)."""
from __future__ import annotations

from pathlib import Path

_CALIB: dict = {}


def quantize(src: Path, out: Path, calib: dict, workdir: Path, *, mode: str = "static") -> dict:
    from olive.data.registry import Registry
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.quantization import OnnxDynamicQuantization, OnnxStaticQuantization

    _CALIB.clear()
    _CALIB.update(calib)

    @Registry.register_dataset("onnxpipe_calibration_rows")
    def rows(**_):  # (inputs by name, label) per row: Olive's default dataloader batches them
        n = len(next(iter(_CALIB.values())))
        return [({k: v[i] for k, v in _CALIB.items()}, 0) for i in range(n)]

    if mode == "static":
        config = {"data_config": {"name": "calibration", "load_dataset_config": {"type": "onnxpipe_calibration_rows"},
                                  "dataloader_config": {"batch_size": 32}}}
        cls = OnnxStaticQuantization
    else:
        config, cls = {}, OnnxDynamicQuantization
    p = create_pass_from_dict(cls, config, disable_search=True)
    result = p.run(ONNXModelHandler(model_path=str(src)), str(workdir / "olive_out" / "model.onnx"))
    import onnx

    onnx.save(onnx.load(str(result.model_path)), str(out))  # one file (Olive may write external data)
    return {"pre_process": "Olive's own (quant_preprocess=True, its default)",
            "settings": f"{cls.__name__} defaults" + (", 32-row calibration batches" if mode == "static" else "")}
