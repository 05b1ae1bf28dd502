"""Pruning benchmark: pruning ratios x models, against the unpruned model and a distilled student of the
same size.

For every model and size, over several seeds: train the teacher, distill its declared student (same
epochs as the fine-tuning), prune at each ratio and at the student's parameter count (onnxpipe prune:
L1, per layer, fine-tuned on the teacher's soft targets), and record accuracy, params and FLOPs per row.
For seed 0 every network is exported to ONNX and timed side by side (interleaved rounds, one process,
batch 1 and 64, --threads intra-op threads; the ONNX Runtime session applies its `all` optimizations at
load). Writes benchmarks/prune.json and, with --write, the "prune" section of benchmarks/RESULTS.md.

    python benchmarks/prune.py --write
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from results_md import RESULTS, write_section  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", dest="cases", default="cnn:default,lstm:default,gru:default,transformer:default,cnn:base",
                   help="model:size pairs")
    p.add_argument("--ratios", default="0.25,0.5,0.75")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning and student epochs (default: each model's "
                                                            "tuned training epochs)")
    p.add_argument("--base-epochs", type=int, default=5, help="epochs of everything at --size base (speed, not accuracy)")
    p.add_argument("--limit", type=int, default=None, help="digits subset (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (1: stable on shared cores)")
    p.add_argument("--timing-runs", type=int, default=30)
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the ONNX export and timing of seed 0")
    p.add_argument("--out", type=Path, default=HERE / "prune.json")
    p.add_argument("--write", action="store_true", help="rewrite the prune section of RESULTS.md")
    p.add_argument("--section", default="prune", help="the RESULTS.md section (marker name) to write")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from --out's JSON, measuring nothing")
    p.add_argument("--markdown", type=Path, default=RESULTS, help="the RESULTS.md to write into")
    return p.parse_args(argv)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def one_seed(model: str, size: str, seed: int, ratios: list[float], args, work: Path, export_to: Path | None) -> dict:
    """Teacher, student, pruned models for one seed; ONNX files of each into `export_to` (seed 0)."""
    from onnxpipe.core.parity import paired_delta
    from onnxpipe.core.predictors import load_torch_variant
    from onnxpipe.orchestrate import Context, run_model
    from onnxpipe.stages.configs import DistillConfig, PruneConfig
    from onnxpipe.stages.distill import distill
    from onnxpipe.stages.export import export_module
    from onnxpipe.stages.prune import counts, prune
    from onnxpipe.stages.train import evaluate

    epochs = args.base_epochs if size == "base" else args.epochs
    train = {"epochs": epochs} if epochs else {}
    ctx = Context(seed=seed, limit=args.limit, progress=False, sections={"train": train})
    run = run_model(model, work / f"{model}-{size}-{seed}", ctx, size=size, stages=["train"])
    ds = ctx.dataset
    labels = ds.y_test
    teacher, spec, cfg = load_torch_variant(run, "torch")
    _, t_logits = evaluate(teacher, ds.x_test, labels)
    out = {"seed": seed, "teacher": {"accuracy": run.metrics("torch")["accuracy"], **counts(teacher, spec, cfg)}}
    files = {}

    def save(name: str, variant: str):
        if export_to is not None:
            net, s, c = load_torch_variant(run, variant)
            path = export_to / f"{name}.onnx"
            export_module(net, s, c, path, s.opset)
            files[name] = str(path)

    save("unpruned", "torch")
    distill(run, DistillConfig(seed=seed, epochs=epochs, scratch_baseline=False), ds, progress=False)
    d = run.section("distillation")
    student, s_spec, s_cfg = load_torch_variant(run, "student")
    _, s_logits = evaluate(student, ds.x_test, labels)
    out["student"] = {"accuracy": d["distilled_accuracy"], **counts(student, s_spec, s_cfg),
                      "config": d["student_config"]}
    save("student", "student")
    goals = [(f"ratio {r:g}", PruneConfig(ratio=r, epochs=epochs, seed=seed)) for r in ratios]
    goals.append(("at student params", PruneConfig(target_params=float(d["student_params"]), epochs=epochs, seed=seed)))
    out["pruned"] = {}
    for name, pcfg in goals:
        t0 = time.monotonic()
        prune(run, pcfg, ds, progress=False)
        p = run.section("pruning")
        net, _, _ = load_torch_variant(run, "pruned")
        _, p_logits = evaluate(net, ds.x_test, labels)
        right = p_logits.argmax(1) == labels
        out["pruned"][name] = {
            "ratio": p["ratio"], "accuracy": p["pruned_accuracy"], "before_fine_tune": p["pruned_accuracy_before_fine_tune"],
            "params": p["params_after"], "flops": p["flops_after"], "plan": [[r["group"], r["kept"], r["size"]] for r in p["plan"]],
            "epochs_run": (p["fine_tune"] or {}).get("epochs_run"), "seconds": round(time.monotonic() - t0, 1),
            "drop_vs_teacher": paired_delta(t_logits.argmax(1) == labels, right).to_json(),
            "vs_student": paired_delta(right, s_logits.argmax(1) == labels).to_json(),
        }
        save(name.replace(" ", "_"), "pruned")
        print(f"{model} {size} seed {seed} {name}: params {p['params_after']:,} acc {p['pruned_accuracy']:.4f} "
              f"(teacher {out['teacher']['accuracy']:.4f}, student {out['student']['accuracy']:.4f})", flush=True)
    out["files"] = files
    return out


def timing(files: dict[str, str], threads: int, runs: int, spec, cfg) -> dict:
    """p50 ms per batch of every ONNX file, interleaved in one process."""
    import numpy as np

    from onnxpipe.core.runtime import make_session
    from onnxpipe.core.timing import time_predictors

    sessions = {n: make_session(Path(f), device="cpu", threads=threads, spinning=False) for n, f in files.items()}
    inputs = {b: [np.ascontiguousarray(t.numpy()) for t in spec.example_inputs(cfg, batch=b).values()] for b in (1, 64)}
    lat = time_predictors(sessions, inputs, warmup=5, runs=runs, min_seconds=0.5, block=3)
    return {n: {str(b): lat[b][n].p50 for b in lat} for n in files}


def summarize(case: dict, ratios: list[float]) -> dict:
    seeds = case["seeds"]
    names = [f"ratio {r:g}" for r in ratios] + ["at student params"]
    rows = {"unpruned": [s["teacher"] for s in seeds], "distilled student": [s["student"] for s in seeds]}
    for n in names:
        rows[f"pruned {n}"] = [s["pruned"][n] for s in seeds]
    out = {}
    for name, per_seed in rows.items():
        acc = mean_sd([r["accuracy"] for r in per_seed])
        out[name] = {"accuracy_mean": acc[0], "accuracy_sd": acc[1], "params": int(per_seed[0]["params"]),
                     "flops": per_seed[0]["flops"]}
        if name.startswith("pruned"):
            out[name]["drop_mean_pt"] = statistics.fmean(r["drop_vs_teacher"]["delta_pt"] for r in per_seed)
            out[name]["vs_student_pt"] = [r["vs_student"]["delta_pt"] for r in per_seed]
            out[name]["vs_student_ci"] = [r["vs_student"]["ci_pt"] for r in per_seed]
            out[name]["drop_ci"] = [r["drop_vs_teacher"]["ci_pt"] for r in per_seed]
    return out


def markdown(results: dict, command: str) -> str:
    from onnxpipe.runfolder import library_versions

    v = library_versions()
    cases = ", ".join(k.replace(":", " ") for k in results["cases"])
    lines = [f"## Pruning (benchmarks/prune.py): {cases}", "", "```bash", command, "```", "",
             f"Machine: {platform.processor() or platform.machine()}, {results['cores']} cores (shared; load average "
             f"{results['load']} at the end); torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
             f"torch threads {results['threads']}. Run {results['date']}, {results['seconds'] / 60:.0f} min.", "",
             "onnxpipe prune with its defaults (L1 importance, per-layer scope, fine-tuned on the teacher's soft "
             "targets for as many epochs as the distilled student trains: each model's tuned epochs at default size, "
             f"{results['base_epochs']} at base size). Accuracy on the digits test split (360 images; one image = 0.28 "
             f"points): mean and standard deviation over seeds {results['seeds']}. Params and FLOPs per row (torch "
             "count, 2 per multiply-accumulate) of seed 0's networks (the plan can differ between seeds; params and "
             "FLOPs barely do). Latency: seed 0's networks exported to FP32 ONNX, p50 in ms, all variants of one model "
             f"timed interleaved in one process, {results['threads']} thread(s); x = speed-up over the unpruned "
             "model in the same rounds.", ""]
    targets = []
    for key, case in results["cases"].items():
        model, size = key.split(":")
        s = case["summary"]
        lat = case.get("latency", {})
        lines += [f"### {model}, {size} size", "",
                  "| variant | params | MFLOP/row | accuracy (mean ± sd) | drop vs unpruned (pt, mean) | b1 ms | b64 ms | x b1 | x b64 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fname = {"unpruned": "unpruned", "distilled student": "student"}
        base = lat.get("unpruned", {})
        for name, r in s.items():
            f = fname.get(name, name.removeprefix("pruned ").replace(" ", "_"))
            cell = lat.get(f, {})
            x1 = base.get("1") / cell["1"] if cell and base else None
            x64 = base.get("64") / cell["64"] if cell and base else None
            drop = "-" if "drop_mean_pt" not in r else f"{r['drop_mean_pt']:+.2f}"
            lines.append(f"| {name} | {r['params']:,} | {r['flops'] / 1e6:.3f} | {r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f} | "
                         f"{drop} | {cell.get('1', float('nan')):.3f} | {cell.get('64', float('nan')):.3f} | "
                         f"{'-' if x1 is None else f'{x1:.2f}'} | {'-' if x64 is None else f'{x64:.2f}'} |")
        matched, student = s["pruned at student params"], s["distilled student"]
        gap = 100 * (matched["accuracy_mean"] - student["accuracy_mean"])
        per_seed = ", ".join(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, (lo, hi) in zip(matched["vs_student_pt"], matched["vs_student_ci"]))
        lines += ["", f"Pruned at the student's parameter count ({matched['params']:,} vs {student['params']:,}) minus the "
                      f"distilled student: {gap:+.2f} points on the mean; per seed (paired, 95% CI): {per_seed}.", ""]
        targets.append((f"{model} {size}: pruned + fine-tuned at the student's params within 0.5 pt of the distilled "
                        "student or better (mean over seeds)", f"{gap:+.2f} pt", gap >= -0.5))
        if model == "cnn" and size == "base" and lat:
            half = s["pruned ratio 0.5"]
            x64 = base["64"] / lat["ratio_0.5"]["64"]
            drop = half["drop_mean_pt"]
            targets.append(("cnn base, ratio 0.5: >= 1.8x faster than unpruned at batch 64 within 1 point",
                            f"{x64:.2f}x, drop {drop:+.2f} pt", x64 >= 1.8 and drop <= 1.0))
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**missed**'} |" for t, m, ok in targets]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        import json

        results = json.loads(args.out.read_text())
        results.setdefault("load", "-")
        text = markdown(results, results.get("command", "python benchmarks/prune.py"))
        print(text)
        if args.write:
            write_section(args.section, text, args.markdown)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    import onnxpipe.models  # noqa: F401
    from onnxpipe.atomic import write_json
    from onnxpipe.models import get_model

    t0 = time.monotonic()
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "seeds": seeds, "ratios": ratios,
               "threads": args.threads, "base_epochs": args.base_epochs, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            model, size = case.split(":")
            entry = {"seeds": []}
            onnx_dir = Path(tmp) / f"onnx-{model}-{size}"
            onnx_dir.mkdir()
            for seed in seeds:
                entry["seeds"].append(one_seed(model, size, seed, ratios, args, Path(tmp),
                                               onnx_dir if seed == seeds[0] and args.speed else None))
            spec = get_model(model)
            cfg = spec.make_config(size=None if size == "default" else size)
            files = entry["seeds"][0].pop("files")
            entry["latency"] = timing(files, args.threads, args.timing_runs, spec, cfg) if files else {}
            for s in entry["seeds"]:
                s.pop("files", None)
            entry["summary"] = summarize(entry, ratios)
            results["cases"][case] = entry
            write_json(args.out, {**results, "seconds": time.monotonic() - t0})   # partial results survive a kill
    results["seconds"] = time.monotonic() - t0
    results["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python benchmarks/prune.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results["command"] = command.strip()
    write_json(args.out, results)
    text = markdown(results, command.strip())
    print(text)
    if args.write:
        write_section(args.section, text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
