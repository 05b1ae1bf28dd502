"""Run one peer's runner in this interpreter and say, as one JSON line on stdout, what came of it.

    python benchmarks/peers_int8/run_peer.py RUNNER SRC OUT CALIB.npz WORKDIR [OPTIONS_JSON]

RUNNER is a module of this folder (ort_static, ort_dynamic, nncf_ptq, olive_passes, optimum_ort) whose
`quantize(src, out, calib, workdir, **options)` writes the INT8 model to OUT. The result is then opened
with ONNX Runtime's CPU provider and run on one calibration batch, so a model that was written but does
not load or run is reported here (and a native crash ends this process, not the benchmark). The JSON
holds `ok`, the runner's notes, the versions of its libraries and, on failure, `stage` (import, quantize,
load) and the exact `error`."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import batches, load_calibration  # noqa: E402

DISTS = ("onnxruntime", "onnx", "numpy", "nncf", "olive-ai", "optimum", "optimum-onnx", "transformers", "torch")


def versions() -> dict:
    out = {}
    for d in DISTS:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    return out


def error_text(e: BaseException) -> str:
    """The exception as a user would quote it: type and first line of its message, and its cause's."""
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        text += f" (caused by {type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    return text[:600]


def main(argv: list[str]) -> int:
    runner, src, out, calib_path, workdir = argv[:5]
    options = json.loads(argv[5]) if len(argv) > 5 else {}
    result = {"runner": runner, "options": options, "versions": versions(), "ok": False}
    stage = "import"
    try:
        mod = importlib.import_module(runner)
        calib = load_calibration(Path(calib_path))
        stage = "quantize"
        result.update(mod.quantize(Path(src), Path(out), calib, Path(workdir), **options))
        stage = "load"
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(out), sess_options=so, providers=["CPUExecutionProvider"])
        sess.run(None, batches(calib)[0])
        result["ok"] = True
    except BaseException as e:  # report every failure (ImportError, the peer's own errors, ORT's) exactly
        result.update(stage=stage, error=error_text(e))
        traceback.print_exc(file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
