"""Distillation benchmark: teacher vs distilled student vs the same student trained from scratch.

Accuracy over several seeds (train the teacher, distill, train the scratch twin: same epochs and
seed), then for seed 0 the whole pipeline (teacher and student through export, optimize, quantize,
verify and select) so that the student's fastest variant within budget is timed side by side with
the teacher's fastest ONNX variant (interleaved, batch 1 and 64). Writes benchmarks/distill.json
and, with --write, the "distill" section of benchmarks/RESULTS.md.

    python benchmarks/distill.py --write
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
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
    p.add_argument("--models", default="cnn,lstm,gru,transformer")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--temperature", type=float, default=None, help="default: DistillConfig's")
    p.add_argument("--alpha", type=float, default=None, help="default: DistillConfig's")
    p.add_argument("--mixup", type=float, default=None, help="default: DistillConfig's")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the model's tuned setting)")
    p.add_argument("--limit", type=int, default=None, help="digits subset (smoke runs)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the seed-0 timing run")
    p.add_argument("--out", type=Path, default=HERE / "distill.json")
    p.add_argument("--write", action="store_true", help="rewrite the distill section of RESULTS.md")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from --out's JSON, measuring nothing")
    p.add_argument("--markdown", type=Path, default=RESULTS, help="the RESULTS.md to write into")
    return p.parse_args(argv)


def distill_options(args) -> dict:
    opts = {"temperature": args.temperature, "alpha": args.alpha, "mixup": args.mixup, "epochs": args.epochs}
    return {k: v for k, v in opts.items() if v is not None}


def accuracy_over_seeds(model: str, seeds: list[int], args, work: Path) -> list[dict]:
    from onnxpipe.stages.distill import DistillConfig, distill
    from onnxpipe.orchestrate import Context, run_model

    rows = []
    for seed in seeds:
        ctx = Context(seed=seed, limit=args.limit, progress=False)
        run = run_model(model, work / f"{model}-acc-{seed}", ctx, stages=["train"])
        distill(run, DistillConfig(seed=seed, **distill_options(args)), ctx.dataset, progress=False)
        d = run.manifest["distillation"]
        rows.append({"seed": seed, **{k: d[k] for k in ("teacher_accuracy", "distilled_accuracy", "scratch_accuracy",
                                                          "teacher_params", "student_params", "student_model",
                                                          "temperature", "alpha", "mixup")},
                     "gain": d.get("distillation_gain")})
        print(f"{model} seed {seed}: teacher {d['teacher_accuracy']:.4f} distilled {d['distilled_accuracy']:.4f} "
              f"scratch {d['scratch_accuracy']:.4f}", flush=True)
    return rows


def speed(model: str, args, work: Path) -> dict:
    """Seed 0 through the whole pipeline; latencies come from the select stage (interleaved timing)."""
    from onnxpipe.orchestrate import Context, run_model

    ctx = Context(seed=0, limit=args.limit, progress=False, sections={"distill": distill_options(args)})
    run = run_model(model, work / f"{model}-speed", ctx,
                    stages=["train", "export", "optimize", "quantize", "distill", "verify", "select"])
    lat = {v: run.metrics(v).get("latency_ms") for v in run.variants()}
    onnx = [v for v in run.variants() if run.artifact(v).format == "onnx" and lat.get(v)]
    out = {"selected": run.manifest["selected"], "latency_ms": lat,
           "accuracy": {v: run.metrics(v).get("accuracy") for v in onnx}}
    # the same rule as `selected`: a student variant counts only if eligible (pipeline.distill.student_speedup)
    out.update({f"b{b}": entry for b, entry in run.manifest["distillation"]["speedup"].items()})
    print(f"{model}: b64 teacher {out['b64']['teacher_best']} {out['b64']['teacher_ms']:.3f} ms, student "
          f"{out['b64']['student_best']} {out['b64']['student_ms'] or float('nan'):.3f} ms", flush=True)
    return out


def markdown(results: dict, command: str) -> str:
    from onnxpipe.runfolder import library_versions

    v = library_versions()
    lines = ["## Distillation (benchmarks/distill.py)", "", "```bash", command, "```", "",
             f"Machine: {platform.processor() or platform.machine()}, {results['cores']} cores; torch {v.get('torch')}, "
             f"onnxruntime {v.get('onnxruntime')}. Settings: {json.dumps(results['settings'])}. "
             f"Run {results['date']}, {results['seconds']:.0f} s, load average {results['load']}.", "",
             "Accuracy on the digits test split (360 images; one image = 0.28 points), mean ± standard deviation over "
             f"seeds {results['seeds']}; distilled - scratch is the mean ± sd of the per-seed differences"
             + (", with each seed's paired 95% interval over the test rows where recorded" if any(
                 x.get("gain") for r in results["models"].values() for x in r["seeds"]) else "") + ":", "",
             "| model | student | T / alpha / mixup | params teacher / student | teacher | distilled | scratch | distilled - scratch | distilled >= scratch |",
             "|---|---|---|---|---|---|---|---|---|"]
    import statistics

    def ms(xs):
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    for m, r in results["models"].items():
        rows = r["seeds"]
        stats = {k: ms([x[k] for x in rows]) for k in ("teacher_accuracy", "distilled_accuracy", "scratch_accuracy")}
        gains = ms([100 * (x["distilled_accuracy"] - x["scratch_accuracy"]) for x in rows])
        cis = "; ".join(f"[{x['gain']['ci_pt'][0]:+.2f}, {x['gain']['ci_pt'][1]:+.2f}]" for x in rows if x.get("gain"))
        cell = lambda k: f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}"  # noqa: E731
        lines.append(f"| {m} | {rows[0]['student_model']} | {rows[0]['temperature']:g} / {rows[0]['alpha']:g} / {rows[0]['mixup']:g} | "
                     f"{rows[0]['teacher_params']:,} / {rows[0]['student_params']:,} | "
                     f"{cell('teacher_accuracy')} | {cell('distilled_accuracy')} | {cell('scratch_accuracy')} | "
                     f"{gains[0]:+.2f} ± {gains[1]:.2f} pt{' ' + cis if cis else ''} | {'yes' if gains[0] >= 0 else 'no'} |")
    if any("speed" in r for r in results["models"].values()):
        lines += ["", "Speed (seed 0, p50 from the select stage's interleaved timing; a student variant counts only "
                  "if it is eligible for `selected`: within 1.5 points of the teacher and passing its own checks):", "",
                  "| model | batch | teacher's fastest ONNX | ms | student's fastest within budget | ms | speedup | >= 2x |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, r in results["models"].items():
            for b in ("1", "64"):
                s = r["speed"][f"b{b}"]
                sp = s["speedup"]
                lines.append(f"| {m} | {b} | {s['teacher_best']} | {s['teacher_ms']:.3f} | {s['student_best'] or '-'} | "
                             f"{s['student_ms'] if s['student_ms'] is None else format(s['student_ms'], '.3f')} | "
                             f"{'-' if sp is None else format(sp, '.2f') + 'x'} | {'' if b == '1' else ('yes' if sp and sp >= 2 else 'no')} |")
            lines.append(f"| {m} | | selected: {r['speed']['selected']} | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    if args.render_only:
        results = json.loads(args.out.read_text())
        text = markdown(results, results.get("command", "python benchmarks/distill.py --write"))
        print(text)
        if args.write:
            write_section("distill", text, args.markdown)
        return 0

    import onnxpipe.models  # noqa: F401
    t0 = time.monotonic()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "seeds": seeds,
               "settings": distill_options(args) or "each model's distill_defaults", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            entry = {"seeds": accuracy_over_seeds(model, seeds, args, Path(tmp))}
            if args.speed:
                entry["speed"] = speed(model, args, Path(tmp))
            results["models"][model] = entry
    results["seconds"] = time.monotonic() - t0
    results["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    from onnxpipe.atomic import write_json

    command = "python benchmarks/distill.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results["command"] = command.strip()
    write_json(args.out, results)
    text = markdown(results, command.strip())
    print(text)
    if args.write:
        write_section("distill", text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
