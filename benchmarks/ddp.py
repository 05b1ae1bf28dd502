"""DDP timing: `onnxpipe train MODEL --nproc N`, same global batch and seed, for each configuration
"N" (N processes, each with cores/N torch threads) or "NxT" (T threads each), interleaved round by round
(A B C, C B A, ...) so that the machine's load hits all alike; writes the "DDP training" section of
benchmarks/RESULTS.md (between its markers; the rest is left alone).

    python benchmarks/ddp.py                          # cnn, 5 epochs, full digits: 1 process, 1x1 thread, 2 processes
    python benchmarks/ddp.py --model transformer --epochs 3 --rounds 5 --configs 1,2

Two times per run: the wall time of the whole command (process start, imports, data, spawn of the ranks,
rendezvous, training, writing) and the training loop alone (manifest training.seconds, rank 0)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import write_section  # noqa: E402  (the shared RESULTS.md section writer)

SECTION = "onnxpipe-ddp"


def train_once(model: str, config: str, root: Path, epochs: int, limit: int | None) -> dict:
    nproc, _, threads = config.partition("x")
    cmd = [sys.executable, "-m", "onnxpipe.cli", "train", model, "--run", str(root), "--nproc", nproc,
           "--epochs", str(epochs), "--patience", str(epochs), "--force", "-q"]
    if limit:
        cmd += ["--limit", str(limit)]
    if threads:
        root.mkdir(parents=True, exist_ok=True)
        (root.parent / f"{root.name}.json").write_text(json.dumps({"train": {"threads": int(threads)}}))
        cmd += ["--config", str(root.parent / f"{root.name}.json")]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    manifest = json.loads((root / "manifest.json").read_text())
    return {"wall_s": wall, "train_s": manifest["training"]["seconds"],
            "accuracy": manifest["metrics"]["torch"]["accuracy"], "epochs": manifest["training"]["epochs_run"]}


def describe(config: str, cores: int) -> str:
    nproc, _, threads = config.partition("x")
    return f"{nproc} x {threads or max(1, cores // int(nproc))}"


def markdown(results: dict[str, list[dict]], args, command: str) -> str:
    from onnxpipe.core.timing import usable_cores

    cores = usable_cores()
    base = statistics.median(r["train_s"] for r in results[next(iter(results))])
    lines = [
        "## DDP training: 1 vs 2 processes",
        "",
        f"`{command}` ({platform.processor() or platform.machine()}, {cores} cores, torch "
        f"{__import__('torch').__version__}, gloo; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}). Model `{args.model}`, {args.epochs} epochs, "
        f"global batch 32, seed 0, data digits{f' (limit {args.limit})' if args.limit else ''}; "
        f"{args.rounds} interleaved rounds, medians (min-max).",
        "",
        f"| processes x threads | training loop s | speed vs {describe(next(iter(results)), cores)} | whole command s | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for n, rs in results.items():
        tr = [r["train_s"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        acc = sorted({round(r["accuracy"], 4) for r in rs})
        lines.append(f"| {describe(n, cores)} | {statistics.median(tr):.1f} ({min(tr):.1f}-{max(tr):.1f}) | "
                     f"{base / statistics.median(tr):.2f} | {statistics.median(wall):.1f} ({min(wall):.1f}-{max(wall):.1f}) | "
                     f"{', '.join(f'{a:.4f}' for a in acc)} |")
    loop = {c: statistics.median(r["train_s"] for r in rs) for c, rs in results.items()}
    best = min(loop, key=loop.get)
    lines += ["", f"Fastest training loop: {describe(best, cores)} ({loop[best]:.1f} s)."]
    if "1x1" in loop and "2" in loop:
        lines[-1] += (f" Two processes (one thread each) vs one process with one thread: "
                      f"{loop['1x1'] / loop['2']:.2f}x.")
    lines += ["A wide min-max range in a row is the machine's load (see DDP training in README.md)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--configs", default="1,1x1,2", help="comma-separated N (processes) or NxT (T threads each)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "runs", help="folder for the run folders")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            res = train_once(args.model, c, args.out / f"ddp-{args.model}-{c}", args.epochs, args.limit)
            results[c].append(res)
            print(f"round {r + 1}: {c}: loop {res['train_s']:.1f} s, command {res['wall_s']:.1f} s, "
                  f"accuracy {res['accuracy']:.4f}", flush=True)
    command = "python benchmarks/ddp.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, args, command.strip())
    write_section(SECTION, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
