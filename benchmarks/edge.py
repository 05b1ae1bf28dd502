"""Edge packages, measured: package sizes per target, the .ort against the .onnx it came from (load time and
latency on the native CPU provider), and the page in headless Chromium (WASM) against the native CPU provider
at batch 1, for every model; results in benchmarks/edge.json and the `edge` section of benchmarks/RESULTS.md.

    python benchmarks/edge.py                          # every model, default size, variants onnx and selected
    python benchmarks/edge.py --models cnn --runs 30 --no-web

Run folders are benchmarks/runs/<model>-default (made by run_benchmarks.py, reused; built here if missing).
Each package is made by `onnxpipe package` (the stage function), so its parity proof and operator check ran
before its numbers are reported. Load times and latencies of .onnx and .ort are timed interleaved in this
process (the one timing loop, one thread, spinning off); the browser's latency is the median of calls timed
in the page (onnxruntime-web WASM, one thread), beside the native CPU provider on the same file and thread
count, measured by the package check in the same minute."""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTION = "edge"
MODELS = ("cnn", "lstm", "gru", "transformer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all four)")
    p.add_argument("--out", type=Path, default=HERE / "runs", help="folder of the run folders (and packages/)")
    p.add_argument("--runs", type=int, default=30, help="timed rounds per latency cell and calls in the page (default 30)")
    p.add_argument("--loads", type=int, default=15, help="session loads timed per file (default 15)")
    p.add_argument("--no-web", action="store_true", help="skip the web packages (no Chromium needed)")
    p.add_argument("--limit", type=int, default=None, help="train missing runs on N samples (smoke runs)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of missing runs (default: the model's)")
    p.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the section from --json")
    p.add_argument("--json", type=Path, default=HERE / "edge.json")
    p.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    return p.parse_args(argv)


def open_or_build(model: str, args):
    sys.path.insert(0, str(HERE))
    from run_benchmarks import build_or_open  # benchmarks/run_benchmarks.py: one way to make benchmark runs

    ns = argparse.Namespace(out=args.out, rebuild=False, stages=None, base_epochs=5, epochs=args.epochs,
                            limit=args.limit)
    run, _ = build_or_open(model, "default", ns, lambda msg: print(msg, file=sys.stderr))
    return run


def time_loads(files: dict[str, tuple[Path, str]], loads: int) -> dict[str, float]:
    """Median seconds to create a session, per file, loads interleaved (A B A B ...)."""
    from onnxpipe.core.runtime import make_session

    samples = {k: [] for k in files}
    for _ in range(loads):
        for k, (path, level) in files.items():
            t0 = time.perf_counter()
            make_session(path, device="cpu", threads=1, opt_level=level)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000.0 for k, v in samples.items()}


def measure(run, variant: str, args) -> dict:
    import numpy as np

    from onnxpipe.core.runtime import make_session
    from onnxpipe.core.timing import time_predictors
    from onnxpipe.stages.configs import PackageConfig
    from onnxpipe.stages.package import load_reference, package

    pkgs = args.out / "packages"
    ort_pkg = package(run, PackageConfig(target="ort", variant=variant, force=True), pkgs / f"{run.model_name}-{variant}-ort")
    onnx_file, ort_file = run.path(variant), ort_pkg.out / "model.ort"
    # .onnx at all (how onnxpipe serves it: NCHWc layouts chosen at load for this CPU), .onnx at extended (the
    # portable level the .ort bakes in) and the .ort as a minimal build runs it
    files = {".onnx": (onnx_file, "all"), ".onnx ext": (onnx_file, "extended"), ".ort": (ort_file, "disable")}
    loads = time_loads(files, args.loads)
    sessions = {k: make_session(p, device="cpu", threads=1, opt_level=lvl, spinning=False) for k, (p, lvl) in files.items()}
    ref = load_reference(run)["inputs"]
    inputs = {1: [ref[:1]], 64: [np.resize(ref, (64, *ref.shape[1:]))]}
    lat = time_predictors(sessions, inputs, warmup=5, runs=args.runs, block=3)
    row = {"model": run.model_name, "variant": variant, "onnx_bytes": run.artifact(variant).bytes,
           "ort_package_bytes": ort_pkg.info["bytes"], "ort_bytes": ort_pkg.info["files"]["model.ort"]["bytes"],
           "operators": ort_pkg.info["operators"]["count"], "ort_parity_max_abs": ort_pkg.parity["max_abs"],
           "load_ms": loads, "latency_ms": {str(b): {k: v.p50 for k, v in cells.items()} for b, cells in lat.items()},
           "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in ort_pkg.info["memory"].items()}}
    if not args.no_web:
        web = package(run, PackageConfig(target="web", variant=variant, check=True, force=True, bench_calls=args.runs),
                      pkgs / f"{run.model_name}-{variant}-web")
        b = web.info["browser"]
        p = web.parity
        row.update(web_package_bytes=web.info["bytes"], browser=b["browser"], web_rule=p["rule"],
                   web_max_abs=p["max_abs"], web_agreement=p.get("agreement"), web_rows=b["rows"],
                   browser_ms=b["latency_b1"]["browser_wasm_ms"], native_ms=b["latency_b1"]["native_cpu_ms"],
                   screenshot=str(run.root / b["screenshot"]))
    return row


def kib(n) -> str:
    return f"{n / 1024:.1f}"


def markdown(rows: list[dict], command: str, versions: dict) -> str:
    lines = ["## Edge packages (`onnxpipe package`)", "", f"Command: `{command}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ". One thread everywhere; "
             "latencies are medians (p50). `.onnx` loads at level all (as onnxpipe's sessions do); `.ort` loads "
             "without further optimization, as a minimal build runs it (its graph was optimized at level extended "
             "when it was written).", "",
             "Three ways to run one variant: `.onnx` at level all (how onnxpipe serves it; NCHWc layouts picked at "
             "load for this CPU), `.onnx` at extended (the portable level the `.ort` bakes in) and the `.ort`. "
             "Columns with three numbers read in that order.", "",
             "| model | variant | .onnx KiB | ort package KiB | web package KiB | operators | load ms | "
             "b1 ms | b64 ms | peak RSS MB .onnx / .ort |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = (".onnx", ".onnx ext", ".ort")
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['model']} | {r['variant']} | {kib(r['onnx_bytes'])} | {kib(r['ort_package_bytes'])} | "
                     f"{kib(r['web_package_bytes']) if 'web_package_bytes' in r else '-'} | {r['operators']} | "
                     + " / ".join(f"{r['load_ms'][k]:.1f}" for k in keys) + " | "
                     + " / ".join(f"{lat['1'][k]:.3f}" for k in keys) + " | "
                     + " / ".join(f"{lat['64'][k]:.3f}" for k in keys) + " | "
                     f"{r['peak_rss_mb']['onnx']:.1f} / {r['peak_rss_mb']['ort']:.1f} |")
    web = [r for r in rows if "browser_ms" in r]
    if web:
        lines += ["", f"In the browser ({web[0]['browser']}, headless; onnxruntime-web WASM), every reference input "
                  "against the CPU execution provider on the same file, and batch-1 latency timed in the page:", "",
                  "| model | variant | rule | rows | max abs / agreement | browser WASM ms b1 | native CPU ms b1 | WASM / native |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in web:
            judged = f"{r['web_max_abs']:.2e}" if r["web_rule"] == "tensor" else f"agreement {r['web_agreement']:.4f}"
            lines.append(f"| {r['model']} | {r['variant']} | {r['web_rule']} | {r['web_rows']} | {judged} | "
                         f"{r['browser_ms']:.3f} | {r['native_ms']:.3f} | {r['browser_ms'] / r['native_ms']:.1f}x |")
        ratios = sorted(r["browser_ms"] / r["native_ms"] for r in web)
        lines += ["", f"Reading: the page answered every reference input within the policy for all {len(web)} "
                  f"packages; at batch 1 WASM took {ratios[0]:.1f}x to {ratios[-1]:.1f}x the native CPU provider's "
                  f"time (median {statistics.median(ratios):.1f}x). A web package is "
                  f"{min(r['web_package_bytes'] for r in web) / 2**20:.1f} to "
                  f"{max(r['web_package_bytes'] for r in web) / 2**20:.1f} MiB, almost all of it onnxruntime-web's "
                  "WASM binary; the model is the rest."]
    fast = [r for r in rows if r["latency_ms"]["64"][".ort"] > 0]
    if fast:
        vs_all = sorted(r["latency_ms"]["64"][".ort"] / r["latency_ms"]["64"][".onnx"] for r in fast)
        vs_ext = sorted(r["latency_ms"]["64"][".ort"] / r["latency_ms"]["64"][".onnx ext"] for r in fast)
        slow = sorted({r["model"] for r in fast if r["latency_ms"]["64"][".ort"] / r["latency_ms"]["64"][".onnx"] > 1.3})
        lines += ["", f"The `.ort` at batch 64 took {vs_ext[0]:.2f}x to {vs_ext[-1]:.2f}x the time of the `.onnx` at "
                  f"extended (the same graph optimizations), and {vs_all[0]:.2f}x to {vs_all[-1]:.2f}x that of the "
                  "`.onnx` at all. What the portable level gives up on this x86 CPU is the NCHWc layout a full "
                  "ONNX Runtime picks at load: more than 1.3x slower at batch 64 for "
                  f"{', '.join(slow) or 'no model'}, within noise for the others; that is the price of a file "
                  "that any CPU build (ARM included) can run."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxpipe.models  # noqa: F401  (registers the built-in models)
    from onnxpipe.runfolder import library_versions
    from onnxpipe.stages.configs import ORT_WEB_VERSION

    if args.render_only:
        saved = json.loads(args.json.read_text())
        sys.path.insert(0, str(HERE))
        from results_md import write_section

        write_section(SECTION, markdown(saved["rows"], saved["command"], saved["versions"]), args.markdown)
        return 0
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        run = open_or_build(model, args)
        for variant in dict.fromkeys(["onnx", run.selected or "onnx"]):
            print(f"[{model}] packaging {variant}", file=sys.stderr)
            rows.append(measure(run, variant, args))
    versions = {k: v for k, v in library_versions().items() if k in ("onnxruntime", "onnx", "torch")}
    if not args.no_web:
        versions["onnxruntime-web"] = ORT_WEB_VERSION
    command = "python benchmarks/edge.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    args.json.write_text(json.dumps({"command": command.strip(), "versions": versions, "rows": rows}, indent=1) + "\n")
    sys.path.insert(0, str(HERE))
    from results_md import write_section  # benchmarks/results_md.py: one writer for every section

    write_section(SECTION, markdown(rows, command.strip(), versions), args.markdown)
    print(markdown(rows, command.strip(), versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
