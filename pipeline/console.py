"""What the CLI prints: tables of variants, parity, bench cells and quantize results (front end, layer 5).

Only formatting: every number comes from the manifest or a stage's return value, and every verdict is
worded by the parity policy."""
from __future__ import annotations

import logging
import sys

LEFT = ("model", "variant", "parent", "parity", "stage", "reference", "candidate", "rule", "status", "note", "passed",
        "layer", "kind", "drop 95% CI, McNemar")


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in LEFT else "right")
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in columns])
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file or pipe has no width to fit: don't cut columns to 80
    console.print(table)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "*" if v else ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def print_summary(run) -> None:
    from .orchestrate import summary_rows

    rows = summary_rows(run)
    for r in rows:
        r["size"] = f"{r.pop('bytes') / 1024:.1f} KiB"
    print_table(rows, ["model", "variant", "parent", "accuracy", "parity", "size"])


def print_parity(run, reports) -> None:
    rows = [{"reference": r.reference, "candidate": r.candidate, "rule": r.rule, "passed": r.verdict,
             "max_abs": f"{r.max_abs:.2e}", "agreement": r.agreement, "acc_drop_pt": r.accuracy_drop,
             "drop 95% CI, McNemar": r.drop.words(signed=False) if r.drop is not None else None,
             "shapes": len({tuple(c.shape) for c in r.checks})} for r in reports]
    print_table(rows, ["reference", "candidate", "rule", "passed", "max_abs", "agreement", "acc_drop_pt",
                       "drop 95% CI, McNemar", "shapes"], title=f"parity: {run.root}")


def print_pruning(run) -> None:
    """What `onnxpipe prune` did: unpruned vs pruned, the plan, and the speedup of the fastest pruned variant."""
    import typer

    from .core.parity import delta_words

    p = run.section("pruning")
    ft = p.get("fine_tune") or {}
    rows = [{"model": f"unpruned ({run.model_name})", "params": p["params_before"], "MFLOP/row": p["flops_before"] / 1e6,
             "accuracy": p["teacher_accuracy"]},
            {"model": "pruned, before fine-tuning", "params": p["params_after"], "MFLOP/row": p["flops_after"] / 1e6,
             "accuracy": p["pruned_accuracy_before_fine_tune"]}]
    if ft:
        rows.append({"model": f"pruned, fine-tuned {ft['epochs_run']} epochs"
                              + (" on soft targets" if ft.get("soft_targets") else ""),
                     "params": p["params_after"], "MFLOP/row": p["flops_after"] / 1e6, "accuracy": p["pruned_accuracy"]})
    print_table(rows, ["model", "params", "MFLOP/row", "accuracy"],
                title=f"prune: {run.root} ({p['library']}, {p['importance']}, {p['scope']}, ratio {p['ratio']:.3f})")
    typer.echo(f"drop vs unpruned: {delta_words(p.get('drop_vs_teacher'), signed=False)}")
    plan = [{"layer": r["group"], "kind": r["kind"], "units": r.get("size", "-"), "kept": r.get("kept", "-"),
             "pruned": len(r["pruned_units"])} for r in p["plan"]]
    print_table(plan, ["layer", "kind", "units", "kept", "pruned"], title="pruning plan")
    print_speedup(run, p.get("speedup"), "pruned", "the unpruned fastest", "the unpruned model")


def print_speedup(run, speedup: dict | None, branch: str, fastest: str, reference: str) -> None:
    """The batch-64 line of select.branch_speedup for `branch` (student, pruned), then the selected variant."""
    import typer

    sp = (speedup or {}).get("64", {})
    if sp.get("speedup"):
        typer.echo(f"batch 64: {sp[f'{branch}_best']} {sp[f'{branch}_ms']:.3f} ms vs {fastest} {sp['teacher_best']} "
                   f"{sp['teacher_ms']:.3f} ms: {sp['speedup']:.2f}x")
    else:
        typer.echo(f"no {branch} variant is within the budget against {reference}, so none can be selected")
    typer.echo(f"selected: {run.selected}")


def print_transfer(run) -> None:
    """What `onnxpipe transfer` did: the source, what was frozen, transferred vs scratch with the gain's interval."""
    import typer

    from .core.parity import delta_words

    t = run.section("transfer")
    src = t["source"]
    rows = [{"model": f"transferred (freeze {t['freeze']}, head {t['head']})", "trainable params": t["trainable_params"],
             "epochs": t["epochs_run"], "accuracy": t["transferred_accuracy"]}]
    if "scratch_accuracy" in t:
        rows.append({"model": "same architecture from scratch", "trainable params": t["trainable_params"] + t["frozen_params"],
                     "epochs": t["scratch_epochs_run"], "accuracy": t["scratch_accuracy"]})
    print_table(rows, ["model", "trainable params", "epochs", "accuracy"],
                title=f"transfer: {src['run']} ({src['variant']}, sha256 {src['sha256'][:12]}...) -> {run.root} "
                      f"({t['train_rows']} training rows)")
    if t["frozen_layers"]:
        typer.echo(f"frozen ({t['frozen_params']:,} params, unchanged after training): {', '.join(t['frozen_layers'])}")
    if "gain_vs_scratch" in t:
        typer.echo(f"transferred - scratch: {delta_words(t['gain_vs_scratch'])}")
    typer.echo(f"new run folder: {run.root} (every stage applies: onnxpipe export {run.root}, ...)")


def print_quantize(run, results, cfg) -> None:
    rows = []
    for r in results:
        if r.artifact is None:
            rows.append({"variant": r.variant, "status": "not kept: " + r.reason})
            continue
        m, e = run.metrics(r.variant), r.artifact.extra
        rows.append({"variant": r.variant, "status": "kept", "size_ratio": e["size_ratio"], "agreement": m["agreement"],
                     "acc_drop_pt": m["accuracy_drop"], "cosine": m["cosine"],
                     "fp32_nodes": len(e["excluded_nodes"]), "preprocess": e["preprocess"]})
    print_table(rows, ["variant", "status", "size_ratio", "agreement", "acc_drop_pt", "cosine", "fp32_nodes", "preprocess"],
                title=f"quantize: {run.root} (budget {cfg.max_accuracy_drop} pt, agreement >= {cfg.min_agreement})")


def bench_display(row: dict) -> dict:
    """A bench row with short, fixed-precision strings for the terminal."""
    def num(v, spec):
        return None if v is None else format(v, spec)

    return {
        "variant": row["variant"] + (" *" if row["selected"] else ""), "threads": row["threads"], "batch": row["batch"],
        "p50_ms": num(row["p50_ms"], ".3f"), "p90_ms": num(row["p90_ms"], ".3f"), "p99_ms": num(row["p99_ms"], ".3f"),
        "rows/s": num(row["rows_s"], ".0f"), "x torch": num(row["x_torch"], ".2f"), "GFLOP/s": num(row["gflops"], ".1f"),
        "% peak": num(row["pct_peak"], ".0f"), "limit": row["limit"], "kind": row["kind"],
        "MFLOP/row": num(None if row["flops_per_row"] is None else row["flops_per_row"] / 1e6, ".3f"),
        "size KiB": num(row["size_kib"], ".1f"), "peak RSS MB": num(row["rss_mb"], ".0f"),
        "accuracy": num(row["accuracy"], ".4f"),
    }


def print_bench(run, info: dict, device: str) -> None:
    import typer

    from .stages.bench import bench_rows

    rows = bench_rows(run)
    print_table([bench_display(r) for r in rows],
                ["variant", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "rows/s", "x torch", "GFLOP/s", "% peak",
                 "limit"], title=f"bench: {run.root} ({info['machine']['cpu']}, device {device})")
    per_variant = {r["variant"]: bench_display(r) for r in rows}
    print_table(list(per_variant.values()), ["variant", "kind", "MFLOP/row", "size KiB", "peak RSS MB", "accuracy"])
    for t, lim in info["limits"].items():
        for b, x in lim["by_batch"].items():
            typer.echo(f"limits at {t} thread(s), measured in the batch-{b} rounds: FP32 matmul {x['fp32_gflops']:.0f} "
                       f"GFLOP/s, INT8 matmul {x['int8_gops']:.0f} GOP/s, per-call overhead ORT "
                       f"{1000 * x['overhead_ms']:.0f} us, torch {1000 * x['torch_overhead_ms']:.0f} us")
    print_profiles(run)
    typer.echo(f"results in {run.root / 'manifest.json'} (metrics.<variant>.bench)")


def print_profiles(run) -> None:
    """One line per profiled (variant, threads, batch): where the time goes, slowest op types first."""
    import typer

    from .core.profile import profile_line
    from .stages.report_profile import profiled_cells

    for v, t, b, prof in profiled_cells(run):
        typer.echo(f"profile {v} at {t} thread(s), batch {b}: {profile_line(prof)}")


def print_package(pkg) -> None:
    """What `onnxpipe package` wrote, with its evidence."""
    import typer

    m = pkg.info
    src = m["source"]
    typer.echo(f"{m['target']} package of {src['model']} variant {src['variant']} -> {pkg.out} "
               f"({len(m['files'])} files, {m['bytes'] / 1024:.1f} KiB)")
    for p in m["parity"]:
        rule = (f"max abs {p['max_abs']:.2e} (atol {p['atol']:g}, rtol {p['rtol']:g})" if p["rule"] == "tensor"
                else f"top-1 agreement {p['agreement']:.4f} (min {p['min_agreement']})")
        typer.echo(f"parity {p['reference']} -> {p['candidate']} over {len(p['shapes'])} shape(s): "
                   f"{'pass' if p['passed'] else 'FAIL'}, {rule}")
    if m["target"] == "ort":
        ops = m["operators"]
        mem = m["memory"]
        typer.echo(f"{m['model']['file']} at level {m['model']['optimization_level']}; {ops['config']}: {ops['count']} "
                   f"operators, every node listed ({', '.join(ops['domains'])})")
        typer.echo(f"peak RSS of a fresh process (load + 1 row, {mem['ort']['threads']} thread): .ort "
                   f"{mem['ort']['peak_rss_mb']:.1f} MB, .onnx {mem['onnx']['peak_rss_mb']:.1f} MB")
    elif m["checked_in_browser"]:
        b = m["browser"]
        lat = b["latency_b1"]
        typer.echo(f"{b['browser']}: {b['rows']} reference inputs, {b['requests']} requests, all to the package's "
                   f"own folder; batch 1: WASM {lat['browser_wasm_ms']:.3f} ms vs native CPU {lat['native_cpu_ms']:.3f} ms "
                   f"({lat['threads']} thread)")
        if b.get("preprocessing"):
            typer.echo(f"image preprocessing vs onnxpipe predict: max abs {b['preprocessing']['max_abs_vs_python']:.2e}")
        typer.echo(f"screenshot: {b['screenshot']} in the run folder (shown by `onnxpipe report`)")
    else:
        typer.echo("not run in a browser: pass --check to prove it in headless Chromium")
    if m["target"] == "web":
        typer.echo(f"open it: python -m http.server -d {pkg.out} 8000, then http://127.0.0.1:8000/")


class _Stderr(logging.Handler):
    """One `warning: ...` line per record on whatever sys.stderr is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.levelname.lower()}: {record.getMessage()}\n")
        except Exception:  # a closed stream must not turn a warning into a crash
            self.handleError(record)


def configure_logging() -> None:
    """Stages' notes and warnings (logger "onnxpipe") as one line each on stderr."""
    logger = logging.getLogger("onnxpipe")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.INFO)
    logger.propagate = False
