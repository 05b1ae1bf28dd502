"""Native work that can crash, done in a child process first, so a crash is a refused variant, not the end.

ONNX Runtime sometimes dies by a signal rather than raising (FACTS: it segfaults opening the FP16 graph
of a small ViT at ORT_ENABLE_ALL). A crash in-process would take the whole `onnxpipe run` down, with no
message, and leave files no manifest lists. So before a stage opens a freshly built lossy graph itself,
`NativeProbe.check(path)` opens it and runs it once on generated inputs in a long-lived child process
(`python -m onnxpipe.core.isolation`, which imports only onnxruntime and numpy). A child that dies is
reported as `NativeCrash` (the signal and the step) and restarted for the next check.

The probe runs the graph at the level sessions use (`all`) on a batch of 2 with every symbolic dimension
set to 2 (integer inputs are zeros, floats are standard normal)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import OnnxpipeError


class NativeCrash(OnnxpipeError):
    """The child process died (by a signal or an abnormal exit) doing native work on a graph."""

    def __init__(self, step: str, how: str):
        self.step, self.how = step, how
        super().__init__(f"ONNX Runtime crashed ({how}) {step}")


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class NativeProbe:
    """A child process that opens and runs ONNX graphs on request; restarted after a crash."""

    def __init__(self, command: list[str] | None = None, timeout: float = 300.0):
        self.command = command or [sys.executable, "-m", "onnxpipe.core.isolation"]
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True, bufsize=1)
        return self._proc

    def check(self, path: Path, *, level: str = "all", step: str = "opening the built graph") -> None:
        """Open and run `path` in the child; NativeCrash if the child dies doing it."""
        proc = self._start()
        try:
            proc.stdin.write(json.dumps({"path": str(Path(path).resolve()), "level": level}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            try:
                code = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            self._proc = None
            raise NativeCrash(f"{step} ({Path(path).name}, optimization level {level})", _describe(code))
        reply = json.loads(line)
        if not reply.get("ok"):
            # An ordinary error in the child (not a crash): the parent's own session will raise it properly.
            return

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __enter__(self) -> "NativeProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_one(path: str, level: str) -> None:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in i.shape]
        dtype = types.get(i.type, np.float32)
        feeds[i.name] = (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                         else np.ones(shape, dtype) if dtype is np.bool_ else np.zeros(shape, dtype))
    sess.run(None, feeds)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        try:
            _run_one(req["path"], req.get("level", "all"))
            reply = {"ok": True}
        except Exception as e:  # an error ORT raises is not a crash: the parent reports it in its own session
            reply = {"ok": False, "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
