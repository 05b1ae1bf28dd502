"""Transfer benchmark: digits 0-4 -> 5-9 with a few labelled images per class, learning curves for a
frozen backbone, full fine-tuning and the from-scratch twin.

Per seed: train the model on digits 0-4 (onnxpipe train --classes 0-4, all of its training rows), then
`onnxpipe transfer` it to digits 5-9 with K labelled training images per class (and at most K validation
images per class; the 5-9 test split stays whole) twice: --freeze backbone (only the new head trains)
and --freeze none (every layer fine-tunes). The scratch twin (same architecture, data, epochs and seed,
random initialization, and the same training settings, learning rate included) is trained beside each,
so both modes get a paired interval against their own twin. Writes benchmarks/transfer.json, the curves as
benchmarks/transfer_curves.png and, with --write, the "transfer" section of benchmarks/RESULTS.md.

    python benchmarks/transfer.py --write
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

MODES = ("frozen", "frozen twin", "fine-tuned", "scratch")   # scratch: the fine-tuned run's twin (tuned lr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn")
    p.add_argument("--shots", default="5,10,20,50", help="labelled images per class of 5-9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=50, help="epochs of every transfer and scratch run")
    p.add_argument("--patience", type=int, default=50, help="early-stopping patience (50: none, the few-shot "
                                                              "validation split is tiny)")
    p.add_argument("--frozen-lr", type=float, default=1e-2, help="learning rate with --freeze backbone (a linear "
                                                                  "head trains faster than a whole network)")
    p.add_argument("--budget-epochs", default="2,5,15", help="also at K=10: these epoch budgets (where the gap closes "
                                                               "as training gets longer)")
    p.add_argument("--limit", type=int, default=None, help="digits subset of the source run (smoke runs)")
    p.add_argument("--source-epochs", type=int, default=None, help="epochs of the source run (default: the model's tuned)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "transfer.json")
    p.add_argument("--plot", type=Path, default=HERE / "transfer_curves.png")
    p.add_argument("--write", action="store_true", help="rewrite the transfer section of RESULTS.md")
    p.add_argument("--markdown", type=Path, default=RESULTS, help="the RESULTS.md to write into")
    return p.parse_args(argv)


def one_seed(model: str, seed: int, shots: list[int], args, work: Path) -> dict:
    from onnxpipe.orchestrate import Context, run_model, transfer_run

    train = {"epochs": args.source_epochs} if args.source_epochs else {}
    src = run_model(model, work / f"{model}-04-{seed}", Context(seed=seed, limit=args.limit, classes=(0, 1, 2, 3, 4),
                                                               progress=False, sections={"train": train}), stages=["train"])
    out = {"seed": seed, "source_accuracy": src.metrics("torch")["accuracy"], "shots": {}, "budget": {}}

    def three(k: int, epochs: int) -> dict:
        row = {}
        for mode, freeze, lr in (("frozen", "backbone", args.frozen_lr), ("fine-tuned", "none", None)):
            section = {"freeze": freeze, "epochs": epochs, "patience": args.patience, "scratch_baseline": True,
                       **({"lr": lr} if lr else {})}
            ctx = Context(seed=seed, classes=(5, 6, 7, 8, 9), per_class=k, progress=False, sections={"transfer": section})
            t = transfer_run(src.root, work / f"{model}-59-{seed}-{k}-{epochs}-{mode}", ctx).section("transfer")
            row[mode] = {"accuracy": t["transferred_accuracy"], "epochs_run": t["epochs_run"], "gain": t["gain_vs_scratch"]}
            row["frozen twin" if mode == "frozen" else "scratch"] = {"accuracy": t["scratch_accuracy"],
                                                                    "epochs_run": t["scratch_epochs_run"]}
        print(f"{model} seed {seed} K={k} epochs {epochs}: frozen {row['frozen']['accuracy']:.4f} fine-tuned "
              f"{row['fine-tuned']['accuracy']:.4f} scratch {row['scratch']['accuracy']:.4f}", flush=True)
        return row

    for k in shots:
        out["shots"][str(k)] = three(k, args.epochs)
    for e in args.budget:
        out["budget"][str(e)] = three(10, e)
    return out


def summarize(seeds: list[dict], keys: list[int], part: str = "shots") -> dict:
    out = {}
    for k in keys:
        cell = {}
        for mode in MODES:
            xs = [s[part][str(k)][mode]["accuracy"] for s in seeds]
            cell[mode] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "all": xs}
        for mode in ("frozen", "fine-tuned"):
            gaps = [s[part][str(k)][mode]["gain"]["delta_pt"] for s in seeds]     # against its own twin
            cell[f"{mode} - scratch"] = {"mean_pt": statistics.fmean(gaps), "all_pt": gaps}
        out[str(k)] = cell
    return out


def plot(summary: dict, path: Path, model: str, seeds: list[int], frozen_lr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [int(k) for k in summary]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"frozen": "transferred, backbone frozen (lr {lr:g})", "frozen twin": "from scratch, lr {lr:g}",
              "fine-tuned": "transferred, fine-tuned", "scratch": "from scratch (twin of fine-tuned)"}
    for mode, color, style in zip(MODES, ("tab:blue", "tab:blue", "tab:green", "tab:gray"), ("-", ":", "-", "-")):
        ax.errorbar(shots, [summary[str(k)][mode]["mean"] for k in shots], yerr=[summary[str(k)][mode]["sd"] for k in shots],
                    marker="o", capsize=3, color=color, ls=style, alpha=0.6 if mode == "frozen twin" else 1.0,
                    label=labels[mode].format(lr=frozen_lr))
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(shots, [str(k) for k in shots])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("labelled training images per class (digits 5-9)")
    ax.set_ylabel("test accuracy on 5-9")
    ax.set_title(f"{model}: trained on digits 0-4, transferred to 5-9 (mean ± sd, seeds {seeds})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from onnxpipe.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(results: dict, command: str, plot_rel: str) -> str:
    from onnxpipe.runfolder import library_versions

    v = library_versions()
    lines = ["## Transfer: digits 0-4 -> 5-9 (benchmarks/transfer.py)", "", "```bash", command, "```", "",
             f"Machine: {platform.processor() or platform.machine()}, {results['cores']} cores (shared; load average "
             f"{results['load']} at the end); torch {v.get('torch')}, {results['threads']} thread(s). Run "
             f"{results['date']}, {results['seconds'] / 60:.0f} min. Source: each model trained on digits 0-4 with "
             "its tuned settings; transfer to 5-9 with K labelled training images per class (and at most K "
             "validation images per class), test on the whole 5-9 test split (180 images; one image = 0.56 points). "
             f"Every transfer and scratch run: {results['epochs']} epochs, patience {results['patience']}; frozen "
             f"backbone at lr {results['frozen_lr']:g}, fine-tuning at the model's tuned lr; each transfer's scratch twin "
             "trains with the same settings (learning rate included), so the frozen runs have a twin at lr "
             f"{results['frozen_lr']:g} and the fine-tuned runs one at the tuned lr (the scratch column). Gains are "
             f"against each run's own twin. Mean ± sd over seeds {results['seeds']}.", "",
             f"![transfer curves]({plot_rel})", ""]
    targets = []
    for model, r in results["models"].items():
        src = [s["source_accuracy"] for s in r["seeds"]]
        lines += [f"### {model} (source accuracy on 0-4: {statistics.fmean(src):.4f})", "",
                  f"| K per class | frozen backbone | its twin (lr {results['frozen_lr']:g}) | fine-tuned | scratch twin | "
                  "frozen - its twin (pt) | fine-tuned - scratch (pt) |",
                  "|---|---|---|---|---|---|---|"]
        for k, c in r["summary"].items():
            lines.append(f"| {k} | {c['frozen']['mean']:.4f} ± {c['frozen']['sd']:.4f} | "
                         f"{c['frozen twin']['mean']:.4f} ± {c['frozen twin']['sd']:.4f} | "
                         f"{c['fine-tuned']['mean']:.4f} ± {c['fine-tuned']['sd']:.4f} | "
                         f"{c['scratch']['mean']:.4f} ± {c['scratch']['sd']:.4f} | "
                         f"{c['frozen - scratch']['mean_pt']:+.2f} | {c['fine-tuned - scratch']['mean_pt']:+.2f} |")
        for mode in ("frozen", "fine-tuned"):
            cis = []
            for s in r["seeds"]:
                g = s["shots"].get("10", {}).get(mode, {}).get("gain")
                if g:
                    cis.append(f"seed {s['seed']}: {g['delta_pt']:+.2f} [{g['ci_pt'][0]:+.2f}, {g['ci_pt'][1]:+.2f}], "
                               f"McNemar p={g['mcnemar_p']:.2g}" + ("" if g["distinguishable"] else " (n.d.)"))
            if cis:
                lines += ["", f"{mode.capitalize()} - its twin at K=10, per seed (paired over the test rows, 95% CI; "
                              "n.d.: not distinguishable from 0): " + "; ".join(cis) + "."]
        if r.get("budget_summary"):
            lines += ["", f"At K=10, by training budget (epochs; the table above uses {results['epochs']}):", "",
                      f"| epochs | frozen backbone | its twin (lr {results['frozen_lr']:g}) | fine-tuned | scratch twin | "
                      "frozen - its twin (pt) | fine-tuned - scratch (pt) |",
                      "|---|---|---|---|---|---|---|"]
            for e, c in r["budget_summary"].items():
                lines.append(f"| {e} | {c['frozen']['mean']:.4f} ± {c['frozen']['sd']:.4f} | "
                             f"{c['frozen twin']['mean']:.4f} ± {c['frozen twin']['sd']:.4f} | "
                             f"{c['fine-tuned']['mean']:.4f} ± {c['fine-tuned']['sd']:.4f} | "
                             f"{c['scratch']['mean']:.4f} ± {c['scratch']['sd']:.4f} | "
                             f"{c['frozen - scratch']['mean_pt']:+.2f} | {c['fine-tuned - scratch']['mean_pt']:+.2f} |")
        if "10" in r["summary"]:
            best = max(("frozen", "fine-tuned"), key=lambda m: r["summary"]["10"][f"{m} - scratch"]["mean_pt"])
            gap = r["summary"]["10"][f"{best} - scratch"]["mean_pt"]
            targets.append((f"{model}: with 10 labelled images per class the transferred model beats the scratch twin "
                            f"by >= 10 points (mean over seeds; best mode: {best})", f"{gap:+.2f} pt", gap >= 10))
        lines.append("")
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**missed**'} |" for t, m, ok in targets]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import onnxpipe.models  # noqa: F401
    from onnxpipe.atomic import write_json

    t0 = time.monotonic()
    shots = [int(k) for k in args.shots.split(",")]
    args.budget = [int(e) for e in args.budget_epochs.split(",") if e.strip()] if args.budget_epochs else []
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "seeds": seeds, "shots": shots,
               "epochs": args.epochs, "patience": args.patience, "frozen_lr": args.frozen_lr, "threads": args.threads,
               "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            per_seed = [one_seed(model, s, shots, args, Path(tmp)) for s in seeds]
            results["models"][model] = {"seeds": per_seed, "summary": summarize(per_seed, shots),
                                        "budget_summary": summarize(per_seed, args.budget, "budget")}
            write_json(args.out, results)
    results["seconds"] = time.monotonic() - t0
    results["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    write_json(args.out, results)
    first = next(iter(results["models"]))
    plot(results["models"][first]["summary"], args.plot, first, seeds, args.frozen_lr)
    command = "python benchmarks/transfer.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        plot_rel = os.path.relpath(args.plot, args.markdown.parent)
    except ValueError:
        plot_rel = str(args.plot)
    text = markdown(results, command.strip(), plot_rel)
    print(text)
    if args.write:
        write_section("transfer", text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
