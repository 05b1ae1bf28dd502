"""Peak resident memory of a fresh process that loads one variant and runs it: what a deployment pays.

Run as `python -m onnxpipe.core.memprobe RUN VARIANT INPUTS.npz --threads N --device D`; it prints one JSON
line. Only the variant's own runtime is imported (onnxruntime for ONNX variants, torch for torch
ones), so the number includes the runtime a deployment would have to load too. `import_rss_mb` is
the peak after importing that runtime, before the model, so a reader can split the two."""
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


def measure_in_fresh_process(run_dir: Path, variant: str, inputs: list[np.ndarray], *, threads: int, device: str,
                             tmp: Path, timeout: float = 300.0) -> dict:
    """Run `probe` in a new Python process and return its result."""
    inputs_file = tmp / f"memprobe-inputs-{len(inputs[0])}.npz"
    if not inputs_file.exists():
        np.savez(inputs_file, **{f"x{i:03d}": x for i, x in enumerate(inputs)})  # name order = input order
    cmd = [sys.executable, "-m", "onnxpipe.core.memprobe", str(run_dir), variant, str(inputs_file),
           "--threads", str(threads), "--device", device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"memory probe of variant {variant!r} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArtifactError(f"memory probe of variant {variant!r} failed in a fresh process: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m onnxpipe.core.memprobe", description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("variant")
    p.add_argument("inputs", help=".npz whose arrays, in name order, are the model's inputs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(probe(a.run, a.variant, a.inputs, threads=a.threads, device=a.device, repeat=a.repeat)))


if __name__ == "__main__":
    main()
