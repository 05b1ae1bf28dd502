"""Compression benchmark (issue 3): INT8 file sizes, the selected variant against ORT FP32 and against
PyTorch eager, and whether selection ever picked a variant that is slower than FP32 or over budget.

    python benchmarks/compression.py                                  # all four models + base cnn/transformer
    python benchmarks/compression.py --models transformer --sizes base --threads 1 --repeats 2

Run folders are built with the pipeline's own stages (train, export, optimize, quantize, verify,
select) under exports/bench-compression/<model>-<size> and reused when present (--rebuild makes them
again). Each measurement set times torch eager, ORT FP32 (`onnx`) and every other ONNX variant
interleaved in one process (pipeline.timing, ORT spinning off, blocks of 3 with the first call
untimed); --repeats independent sets give the spread. Ratios come from one set each, never across
sets; the median over sets is reported with its min..max. `--write` replaces this script's section
of benchmarks/RESULTS.md (between its markers) and leaves the rest alone."""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "compression"   # RESULTS.md markers: <!-- compression:begin --> ... <!-- compression:end -->
BUILD_STAGES = ["train", "export", "optimize", "quantize", "verify", "select"]
TARGETS = {"int8_size_ratio": 0.35, "base_transformer_vs_fp32_b64": 1.3, "selected_vs_eager": 1.5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,lstm,gru,transformer", help="comma-separated default-size models")
    p.add_argument("--base", default="cnn,transformer", help="comma-separated models also built at --size base")
    p.add_argument("--sizes", default="default,base", help="which sizes to run: default, base or both")
    p.add_argument("--out", type=Path, default=ROOT / "exports" / "bench-compression")
    p.add_argument("--rebuild", action="store_true", help="rebuild run folders that exist")
    p.add_argument("--base-epochs", type=int, default=5, help="training epochs for base-size runs (speed, not accuracy)")
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: every usable core)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--runs", type=int, default=10, help="timed rounds per set (each times 2 calls per variant)")
    p.add_argument("--repeats", type=int, default=3, help="independent interleaved sets per cell")
    p.add_argument("--no-int8-types", dest="int8_types", action="store_false",
                   help="skip timing static S8S8 against U8S8 on the base models")
    p.add_argument("--from-json", type=Path, default=None,
                   help="rebuild the Markdown from a results.json of an earlier run (no building, no timing)")
    p.add_argument("--write", action="store_true", help="rewrite this script's section of benchmarks/RESULTS.md")
    return p.parse_args(argv)


def build(model: str, size: str, args) -> Path:
    from onnxpipe.orchestrate import Context, run_model

    root = args.out / f"{model}-{size}"
    if (root / "manifest.json").is_file() and not args.rebuild:
        from onnxpipe.runfolder import Run

        run = Run.open(root)
        if run.manifest.get("selected") and run.manifest.get("selection"):
            return root
    overrides = {"epochs": args.base_epochs} if size == "base" else {}
    t0 = time.monotonic()
    print(f"[build] {model} {size}: {', '.join(BUILD_STAGES)}", file=sys.stderr, flush=True)
    run_model(model, root, Context(progress=False, sections={"train": overrides}), size=None if size == "default" else size,
              force=True, stages=BUILD_STAGES)
    print(f"[build] {model} {size}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return root


def measure(root: Path, threads: int, batches: list[int], args) -> dict:
    """{batch: {"sets": [{variant: p50_ms}]}} for torch, onnx and every other ONNX variant."""
    from onnxpipe.core.predictors import load_predictor
    from onnxpipe.core.timing import time_predictors
    from onnxpipe.runfolder import Run
    from onnxpipe.stages.select import example_batches

    run = Run.open(root)
    names = ["torch"] + [v for v in run.variants() if run.artifact(v).format == "onnx"]
    # torch variants honour `threads` through the same predictor interface as ONNX ones
    fns = {v: load_predictor(run, v, threads=threads, spinning=False) for v in names}
    inputs = example_batches(run, "onnx", batches)
    sets = [time_predictors(fns, inputs, warmup=3, runs=args.runs, block=3) for _ in range(args.repeats)]
    return {str(b): {"sets": [{v: s[b][v].p50 for v in names} for s in sets]} for b in batches}


def measure_int8_pairs(root: Path, threads: int, batches: list[int], args) -> dict:
    """Static INT8 with U8S8 (the run's int8_static) against S8S8 (built here in a scratch copy), and FP32:
    on x86 without VNNI, S8S8 GEMMs are several times slower than U8S8; this records what this CPU does."""
    import shutil
    import tempfile

    from onnxpipe.core.data import reload_dataset
    from onnxpipe.core.predictors import load_predictor
    from onnxpipe.core.timing import time_predictors
    from onnxpipe.runfolder import Run
    from onnxpipe.stages.configs import QuantizeConfig
    from onnxpipe.stages.quantize import quantize
    from onnxpipe.stages.select import example_batches

    run = Run.open(root)
    if not run.has("int8_static"):
        return {}
    with tempfile.TemporaryDirectory(prefix="onnxpipe-s8s8-") as tmp:
        copy = Path(shutil.copytree(root, Path(tmp) / root.name))
        scratch = Run.open(copy)
        cfg = QuantizeConfig(mode="static", activation_type="int8", max_accuracy_drop=100.0, min_agreement=0.0)
        quantize(scratch, cfg, reload_dataset(scratch.dataset_info))
        fns = {"fp32": load_predictor(run, "onnx", threads=threads, spinning=False),
               "u8s8": load_predictor(run, "int8_static", threads=threads, spinning=False),
               "s8s8": load_predictor(scratch, "int8_static", threads=threads, spinning=False)}
        inputs = example_batches(run, "onnx", batches)
        timed = [time_predictors(fns, inputs, warmup=3, runs=args.runs, block=3) for _ in range(args.repeats)]
        out = {}
        for b in batches:
            sets = [{k: v.p50 for k, v in s[b].items()} for s in timed]
            out[str(b)] = {"sets": sets, "s8s8_vs_u8s8": ratio_stats(sets, "s8s8", "u8s8"),
                           "u8s8_vs_fp32": ratio_stats(sets, "fp32", "u8s8")}
        del fns
    return out


def ratio_stats(sets: list[dict], num: str, den: str) -> dict:
    """Per-set ratio sets[num] / sets[den] (how many times faster `den` is), median and range."""
    r = [s[num] / s[den] for s in sets]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def summarize(root: Path, timings: dict) -> dict:
    from onnxpipe.runfolder import Run

    run = Run.open(root)
    sel = run.manifest["selected"]
    onnx_bytes = run.artifact("onnx").bytes
    rows = []
    for v in run.variants():
        art, m = run.artifact(v), run.metrics(v)
        row = {"variant": v, "bytes": art.bytes, "size_ratio": art.bytes / onnx_bytes if art.format == "onnx" else None,
               "accuracy": m.get("accuracy"), "agreement": m.get("agreement"), "accuracy_drop": m.get("accuracy_drop"),
               "selected": v == sel, "slower_than_parent": m.get("slower_than_parent"),
               "excluded_nodes": len(art.extra.get("excluded_nodes", [])) if art.lossy else None}
        for t, per_batch in timings.items():
            for b, cell in per_batch.items():
                row[f"t{t}_b{b}_ms"] = statistics.median(s[v] for s in cell["sets"]) if v in cell["sets"][0] else None
        rows.append(row)
    ratios = {}
    for t, per_batch in timings.items():
        for b, cell in per_batch.items():
            ratios[f"t{t}_b{b}"] = {"selected_vs_fp32": ratio_stats(cell["sets"], "onnx", sel),
                                    "selected_vs_eager": ratio_stats(cell["sets"], "torch", sel)}
    opt = run.artifact("onnx_opt").extra if run.has("onnx_opt") else {}
    return {"model": run.model_name, "size": run.manifest.get("size", "default"), "selected": sel, "rows": rows,
            "ratios": ratios, "selection": run.manifest.get("selection"), "machine": run.manifest.get("machine"),
            "fused": {k: opt.get(k) for k in ("fused_nodes", "attention_nodes", "nodes_before", "nodes_after")},
            "quantize": run.manifest.get("quantize")}


def eager_unstable(timings: dict, threads: str, batch: str) -> str:
    """Why a torch-eager cell cannot be judged, or "". On busy cores, torch's OpenMP pool stalls at its
    barriers whenever a thread is descheduled: a call then takes a scheduler slice or more, not its work."""
    eager = [s["torch"] for s in timings[threads][batch]["sets"]]
    if max(eager) > 2 * min(eager):
        return f"torch eager p50 varied {min(eager):.2f}..{max(eager):.2f} ms across the sets"
    one = timings.get("1", {}).get(batch)
    if threads != "1" and one:
        single = statistics.median(s["torch"] for s in one["sets"])
        if statistics.median(eager) > 3 * single:
            return (f"torch eager at {threads} threads ({statistics.median(eager):.2f} ms) is over 3x its "
                    f"1-thread time ({single:.2f} ms): OpenMP stalls on busy cores")
    return ""


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: list[dict], command: str, threads: list[int], batches: list[int]) -> str:
    cpu = results[0]["machine"]["cpu"] if results and results[0].get("machine") else {}
    feats = ", ".join(k for k, v in (cpu.get("features") or {}).items() if v)
    lines = ["## Compression (issue 3): sizes, selected variant vs ORT FP32 and vs PyTorch eager", "",
             f"Command: `{command}`", "",
             f"CPU: {cpu.get('model', '?')}, {cpu.get('usable_cpus', '?')} usable cores; features: {feats}.",
             "Each ratio is measured inside one interleaved set (torch eager, ORT FP32 and every variant, ORT spinning "
             "off, blocks of 3 with the first call untimed); the cell shows the median over the sets and the min..max.",
             "Latency columns are medians of p50 over the sets, in ms. The machine was shared with other jobs.", ""]
    lines += ["### Targets", "", "| target | model | measured | pass |", "|---|---|---|---|"]
    for r in results:
        name = f"{r['model']} ({r['size']})"
        int8 = [row for row in r["rows"] if row["variant"].startswith("int8") and row["size_ratio"] is not None]
        if r["size"] == "base":
            for row in int8:
                ok = row["size_ratio"] <= TARGETS["int8_size_ratio"]
                lines.append(f"| INT8 file <= 0.35x FP32 | {name} {row['variant']} | {row['size_ratio']:.3f}x | {'yes' if ok else 'NO'} |")
        for key, ratio in r["ratios"].items():
            t, b = key[1:].split("_b")
            if r["size"] == "base" and r["model"] == "transformer" and b == "64":
                s = ratio["selected_vs_fp32"]
                ok = s["median"] >= TARGETS["base_transformer_vs_fp32_b64"]
                lines.append(f"| selected >= 1.3x ORT FP32, batch 64, {t} thr | {name}: {r['selected']} | "
                             f"{s['median']:.2f}x ({s['min']:.2f}..{s['max']:.2f}) | {'yes' if ok else 'NO'} |")
            # Every model and size: the target names the default sizes, base is reported beside them.
            s = ratio["selected_vs_eager"]
            unstable = eager_unstable(r["timings"], t, b)
            verdict = f"not judged: {unstable}" if unstable else "yes" if s["median"] >= TARGETS["selected_vs_eager"] else "NO"
            lines.append(f"| selected >= 1.5x torch eager, batch {b}, {t} thr | {name}: {r['selected']} | "
                         f"{s['median']:.2f}x ({s['min']:.2f}..{s['max']:.2f}) | {verdict} |")
        for key, ratio in r["ratios"].items():
            s = ratio["selected_vs_fp32"]
            if r["selected"] != "onnx" and s["median"] < 1.0:
                lines.append(f"| selected never slower than FP32 | {name}: {r['selected']} at {key} | "
                             f"{s['median']:.2f}x ({s['min']:.2f}..{s['max']:.2f}) | NO |")
    lines += ["", "### Variants", ""]
    tcols = [f"t{t}_b{b}_ms" for t in threads for b in batches]
    head = ["model", "variant", "KiB", "x FP32", "accuracy", "agreement", "drop pt", "FP32 nodes", *tcols, "selected", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        excluded = (r.get("selection") or {}).get("excluded", {})
        for row in r["rows"]:
            lines.append("| " + " | ".join([
                f"{r['model']} ({r['size']})", row["variant"], f"{row['bytes'] / 1024:.0f}", fmt(row["size_ratio"], ".2f"),
                fmt(row["accuracy"], ".4f"), fmt(row["agreement"], ".4f"), fmt(row["accuracy_drop"], ".2f"),
                fmt(row["excluded_nodes"], "d"), *[fmt(row.get(c), ".3f") for c in tcols],
                "**yes**" if row["selected"] else "", excluded.get(row["variant"], "")]) + " |")
        for v, info in (r.get("quantize") or {}).items():
            if not info.get("recorded"):
                lines.append(f"| {r['model']} ({r['size']}) | {v} | - | - | - | - | - | - | " + " | ".join("-" for _ in tcols)
                             + f" | | not kept: {info.get('reason')} |")
    pair_lines = []
    for r in results:
        for t, per_batch in (r.get("int8_types") or {}).items():
            for b, cell in per_batch.items():
                a, u = cell["s8s8_vs_u8s8"], cell["u8s8_vs_fp32"]
                pair_lines.append(f"| {r['model']} ({r['size']}) | {t} | {b} | {u['median']:.2f}x ({u['min']:.2f}..{u['max']:.2f}) "
                                  f"| {a['median']:.2f}x ({a['min']:.2f}..{a['max']:.2f}) |")
    if pair_lines:
        lines += ["", "### Static INT8 types: U8S8 vs S8S8 (same calibration, interleaved)", "",
                  "| model | threads | batch | U8S8 speed-up over FP32 | S8S8 time / U8S8 time |", "|---|---|---|---|---|",
                  *pair_lines]
    lines += ["", "### Transformer graph after `onnxpipe optimize` (saved at extended, `all` applied at load)", ""]
    for r in results:
        if r["model"] == "transformer":
            f = r["fused"]
            fused = ", ".join(f"{k.rsplit('.', 1)[-1]} x{n}" for k, n in (f.get("fused_nodes") or {}).items())
            lines.append(f"- {r['size']}: nodes {f.get('nodes_before')} -> {f.get('nodes_after')}; native Attention "
                         f"nodes {f.get('attention_nodes')}; fused: {fused or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from onnxpipe.atomic import write_json
    from onnxpipe.core.timing import usable_cores

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results = saved["results"]
        threads = sorted({int(t) for r in results for t in r["timings"]})
        batches = sorted({int(b) for r in results for per in r["timings"].values() for b in per})
        text = markdown(results, saved["command"].strip(), threads, batches)
        print(text)
        if args.write:
            from results_md import write_section

            write_section(SECTION, text)
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    jobs = [(m.strip(), "default") for m in args.models.split(",") if m.strip() and "default" in sizes]
    jobs += [(m.strip(), "base") for m in args.base.split(",") if m.strip() and "base" in sizes]
    threads = [int(t) for t in args.threads.split(",") if t.strip()] or [usable_cores()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    results = []
    for model, size in jobs:
        root = build(model, size, args)
        timings = {}
        for t in threads:
            print(f"[time] {model} {size}: {t} thread(s), batches {batches}", file=sys.stderr, flush=True)
            timings[str(t)] = measure(root, t, batches, args)
        pairs = {}
        if size == "base" and args.int8_types:
            for t in threads:
                print(f"[time] {model} {size}: U8S8 vs S8S8, {t} thread(s)", file=sys.stderr, flush=True)
                pairs[str(t)] = measure_int8_pairs(root, t, batches, args)
        results.append(summarize(root, timings) | {"timings": timings, "int8_types": pairs})
    command = "python benchmarks/compression.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = markdown(results, command.strip(), threads, batches)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"command": command, "results": results})
    print(text)
    if args.write:
        from results_md import write_section   # benchmarks/results_md.py: one writer for every section

        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
