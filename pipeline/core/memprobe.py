"""Peak resident memory of a fresh process that loads one variant and runs it: what a deployment pays.

Run as `python -m onnxpipe.core.memprobe RUN VARIANT INPUTS.npz --threads N --device D`, or for a model file
outside a run folder (a deployment package's .ort or .onnx) as `python -m onnxpipe.core.memprobe --model FILE
INPUTS.npz --threads N --opt-level L`; it prints one JSON line. Only the variant's own runtime is imported
(onnxruntime for ONNX variants and files, torch for torch ones), so the number includes the runtime a
deployment would have to load too. `import_rss_mb` is the peak after importing that runtime, before the
model, so a reader can split the two."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import ArtifactError


def _peak_rss_mb() -> float:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: on Linux ru_maxrss carries over the
    parent's peak through fork + exec, so a child of a big process would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass  # not Linux: fall back to getrusage
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere


def probe(run_dir: str, variant: str, inputs_file: str, *, threads: int, device: str, repeat: int = 3) -> dict:
    """In this process: import the runtime, load the variant, run it `repeat` times; peak RSS before / after."""
    from ..runfolder import Run

    run = Run.open(run_dir)
    if run.artifact(variant).format == "torch":
        import torch

        torch.set_num_threads(threads)
    else:
        import onnxruntime  # noqa: F401  (the runtime alone, for import_rss_mb)
    import_rss = _peak_rss_mb()
    from .predictors import load_predictor

    fn = load_predictor(run, variant, device=device, threads=threads)
    with np.load(inputs_file) as z:
        inputs = [z[k] for k in sorted(z.files)]
    for _ in range(repeat):
        fn(*inputs)
    return {"variant": variant, "rows": int(inputs[0].shape[0]), "threads": threads,
            "import_rss_mb": round(import_rss, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def probe_file(model_file: str, inputs_file: str, *, threads: int, opt_level: str = "all", repeat: int = 3) -> dict:
    """`probe` for an ONNX or ORT-format file outside a run folder (a package), on the CPU provider."""
    import onnxruntime  # noqa: F401  (the runtime alone, for import_rss_mb)

    import_rss = _peak_rss_mb()
    from .runtime import make_session

    fn = make_session(model_file, device="cpu", threads=threads, opt_level=opt_level)
    with np.load(inputs_file) as z:
        inputs = [z[k] for k in sorted(z.files)]
    for _ in range(repeat):
        fn(*inputs)
    return {"model": Path(model_file).name, "rows": int(inputs[0].shape[0]), "threads": threads,
            "opt_level": opt_level, "import_rss_mb": round(import_rss, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _in_fresh_process(positional: list[str], options: list[str], what: str, inputs: list[np.ndarray], tmp: Path,
                      timeout: float) -> dict:
    inputs_file = tmp / f"memprobe-inputs-{'x'.join(map(str, inputs[0].shape))}.npz"
    if not inputs_file.exists():
        np.savez(inputs_file, **{f"x{i:03d}": x for i, x in enumerate(inputs)})  # name order = input order
    cmd = [sys.executable, "-m", "onnxpipe.core.memprobe", *positional, str(inputs_file), *options]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"memory probe of {what} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArtifactError(f"memory probe of {what} failed in a fresh process: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_in_fresh_process(run_dir: Path, variant: str, inputs: list[np.ndarray], *, threads: int, device: str,
                             tmp: Path, timeout: float = 300.0) -> dict:
    """Run `probe` in a new Python process and return its result."""
    return _in_fresh_process([str(run_dir), variant], ["--threads", str(threads), "--device", device],
                             f"variant {variant!r}", inputs, tmp, timeout)


def measure_file_in_fresh_process(model_file: Path, inputs: list[np.ndarray], *, threads: int, tmp: Path,
                                  opt_level: str = "all", timeout: float = 300.0) -> dict:
    """Run `probe_file` in a new Python process and return its result."""
    return _in_fresh_process([], ["--model", str(Path(model_file).resolve()), "--threads", str(threads),
                                  "--opt-level", opt_level], str(model_file), inputs, tmp, timeout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m onnxpipe.core.memprobe", description=__doc__.splitlines()[0])
    p.add_argument("args", nargs="+", metavar="RUN VARIANT INPUTS | INPUTS",
                   help="a run folder, a variant and an .npz whose arrays, in name order, are the model's inputs "
                        "(with --model: the .npz alone)")
    p.add_argument("--model", help="an .onnx or .ort file to probe instead of a run's variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--opt-level", default="all", help="with --model: the session's graph optimization level")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    if a.model:
        if len(a.args) != 1:
            p.error("with --model give only INPUTS")
        print(json.dumps(probe_file(a.model, a.args[0], threads=a.threads, opt_level=a.opt_level, repeat=a.repeat)))
        return
    if len(a.args) != 3:
        p.error("give RUN VARIANT INPUTS")
    run, variant, inputs = a.args
    print(json.dumps(probe(run, variant, inputs, threads=a.threads, device=a.device, repeat=a.repeat)))


if __name__ == "__main__":
    main()
