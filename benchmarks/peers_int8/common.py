"""What the peer runners share: the calibration batches as every peer's API wants them, ONNX Runtime's
pre-processing as its documentation says to run it, and the settings a runner reports.

Nothing here imports onnxpipe: a runner must run under any interpreter that has its peer installed
(optimum lives in a virtual environment of its own, benchmarks/peers-venv/optimum)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

CALIB_BATCH = 32


def load_calibration(path: Path) -> dict[str, np.ndarray]:
    """calib.npz written by int8_peers.py: one array per graph input, 'input:<name>', all with the same rows."""
    with np.load(path) as z:
        return {k.removeprefix("input:"): z[k] for k in z.files if k.startswith("input:")}


def batches(calib: dict[str, np.ndarray], size: int = CALIB_BATCH) -> list[dict[str, np.ndarray]]:
    """The calibration rows as feeds of `size` rows, every input by name."""
    n = len(next(iter(calib.values())))
    return [{k: v[i:i + size] for k, v in calib.items()} for i in range(0, n, size)]


def reader(calib: dict[str, np.ndarray]):
    """An onnxruntime.quantization CalibrationDataReader over the calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(batches(calib))

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


@contextlib.contextmanager
def working_dir(path: Path):
    """quant_pre_process leaves files in the working directory: run it in the runner's own folder."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def pre_process(src: Path, workdir: Path) -> tuple[Path, str]:
    """ONNX Runtime's quant_pre_process (symbolic shape inference, ORT basic optimization, ONNX shape
    inference), as its documentation asks before quantizing. Where symbolic shape inference fails (some
    Transformer graphs: "Incomplete symbolic shape inference") it is retried with skip_symbolic_shape=True,
    the option ORT provides for that. Returns (the model to quantize, what was done); raises when both fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(src).resolve(), (Path(workdir) / "preprocessed.onnx").resolve()
    try:
        with working_dir(workdir):
            quant_pre_process(str(src), str(out))
        return out, "quant_pre_process"
    except Exception as e:  # ORT raises a bare Exception for the symbolic-shape failure
        first = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    with working_dir(workdir):
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return out, f"quant_pre_process(skip_symbolic_shape=True) (the default failed: {first})"
