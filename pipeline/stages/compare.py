"""`onnxpipe compare RUN...`: one table and one accuracy-vs-latency plot across several run folders
(pruned vs distilled vs quantized at equal size, two calibration methods, ...), the Pareto front marked,
written as compare.md (+ compare_files/accuracy_vs_latency.png) and a self-contained compare.html.

Accuracy and the drop against each run's own `torch` (with its 95% interval and McNemar p-value) come
from the manifests. Latency comes from each run's own record (bench p50 at the most threads, else the
select stage's p50), which was measured at another time, under another load; `measure=True` times every
ONNX variant of every run here instead, interleaved in one process (variants with the same inputs share
rounds), so the ratios are side by side."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_bytes, write_json
from ..core.parity import delta_words
from ..core.policy import entry_verdict
from ..runfolder import Run
from .report import Figure, Report, _png, _pyplot, pareto_front, to_html, to_markdown

COMPARE_MD = "compare.md"
COMPARE_HTML = "compare.html"
ASSETS = "compare_files"


@dataclass
class Point:
    run: str
    variant: str
    accuracy: float | None
    latency_ms: dict[int, float] = field(default_factory=dict)
    bytes: int = 0
    params: int | None = None
    drop: str = "-"
    selected: bool = False

    @property
    def label(self) -> str:
        return f"{self.run}:{self.variant}"


@dataclass
class CompareResult:
    points: list[Point]
    rows: list[dict]
    columns: list[str]
    fronts: dict[int, list[str]]
    timing: str
    markdown: Path
    html: Path
    png: Path


def run_labels(runs: list[Run]) -> list[str]:
    """Short, distinct names: the folder name, with its parent folder where two share a name."""
    names = [r.root.name for r in runs]
    return [f"{r.root.parent.name}/{r.root.name}" if names.count(r.root.name) > 1 else r.root.name for r in runs]


def recorded_latency(run: Run, variant: str) -> dict[int, float]:
    """p50 per batch: the bench cell at the most threads measured, else the select stage's timing."""
    bench = (run.metrics(variant).get("bench") or {}).get("latency") or {}
    if bench:
        most = max(bench, key=int)
        return {int(b): c["p50_ms"] for b, c in bench[most].items()}
    return {int(b): float(t) for b, t in (run.metrics(variant).get("latency_ms") or {}).items()
            if isinstance(t, (int, float))}


def params_of(run: Run, variant: str) -> int | None:
    """Parameters of the network behind a variant (its nearest torch ancestor's count)."""
    for v in run.lineage(variant):
        art = run.artifact(v)
        if art.format == "torch":
            return art.extra.get("params") or run.metrics(v).get("params")
    return None


def drop_text(run: Run, variant: str) -> str:
    """The variant's drop against the run's torch, with its interval, as verify recorded it."""
    if variant == "torch" or not run.has("torch"):
        return "-"
    entry = next(iter(run.parity(reference="torch", candidate=variant)), None)
    if entry is None:
        return "not verified"
    if entry["rule"] == "tensor":
        return f"lossless ({entry_verdict(entry)}, max|d| {entry['max_abs']:.1e})"
    return f"{delta_words(entry.get('uncertainty'), signed=False)} ({entry_verdict(entry)})" \
        if entry.get("uncertainty") else f"{entry['accuracy_drop']:.2f} pt ({entry_verdict(entry)})"


def measure_latency(runs: list[Run], labels: list[str], batches: tuple[int, ...], rounds: int) -> dict[str, dict[int, float]]:
    """p50 per batch of every ONNX variant of every run, interleaved in one process (one group per input
    signature: variants of different models cannot share inputs)."""
    from ..core.predictors import load_predictor
    from ..core.timing import time_predictors
    from .select import TIMING_BLOCK, example_batches, input_signature

    fns, groups, first = {}, {}, {}
    for run, label in zip(runs, labels):
        for v in run.variants():
            if run.artifact(v).format != "onnx":
                continue
            key = f"{label}:{v}"
            fns[key] = load_predictor(run, v, device="cpu", spinning=False)
            sig = input_signature(run, v)
            groups.setdefault(sig, []).append(key)
            first.setdefault(sig, (run, v))
    out: dict[str, dict[int, float]] = {k: {} for k in fns}
    for sig, members in groups.items():
        run, v = first[sig]
        lat = time_predictors({k: fns[k] for k in members}, example_batches(run, v, batches), warmup=3, runs=rounds,
                              block=TIMING_BLOCK)
        for b, per in lat.items():
            for k, latency in per.items():
                out[k][int(b)] = latency.p50
    return out


def collect(runs: list[Run], *, batches: tuple[int, ...] | None = None, measure: bool = False,
            rounds: int = 20) -> tuple[list[Point], str]:
    labels = run_labels(runs)
    measured = measure_latency(runs, labels, batches or (1, 64), rounds) if measure else {}
    points = []
    for run, label in zip(runs, labels):
        for v in run.variants():
            lat = measured.get(f"{label}:{v}", {}) if measure else recorded_latency(run, v)
            if batches:
                lat = {b: t for b, t in lat.items() if b in batches}
            points.append(Point(label, v, run.metrics(v).get("accuracy"), lat, run.artifact(v).bytes,
                                params_of(run, v), drop_text(run, v), run.selected == v))
    timing = ("measured here, interleaved in one process" if measure else
              "as recorded by each run (bench p50 at the most threads, else select's p50; measured at different times)")
    return points, timing


def fronts_of(points: list[Point]) -> dict[int, list[str]]:
    by_batch: dict[int, list[tuple[str, float, float]]] = {}
    for p in points:
        for b, t in p.latency_ms.items():
            if p.accuracy is not None and t:
                by_batch.setdefault(b, []).append((p.label, t, p.accuracy))
    return {b: pareto_front(pts) for b, pts in sorted(by_batch.items())}


def plot(points: list[Point], fronts: dict[int, list[str]], timing: str) -> Figure | None:
    if not fronts:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    runs = list(dict.fromkeys(p.run for p in points))
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(fronts), figsize=(6.0 * len(fronts), 4.6), squeeze=False)
    biggest = max(p.bytes for p in points) or 1
    for ax, (batch, front) in zip(axes[0], fronts.items()):
        pts = [p for p in points if p.accuracy is not None and p.latency_ms.get(batch)]
        for p in pts:
            ax.scatter(p.latency_ms[batch], p.accuracy, s=40 + 500 * p.bytes / biggest, alpha=0.6,
                       color=colors[runs.index(p.run) % len(colors)], edgecolors="black" if p.label in front else "none",
                       linewidths=1.5, label=p.run if p is next(q for q in pts if q.run == p.run) else None)
            ax.annotate(p.variant, (p.latency_ms[batch], p.accuracy), textcoords="offset points", xytext=(5, 5),
                        fontsize=7)
        line = sorted((p.latency_ms[batch], p.accuracy) for p in pts if p.label in front)
        ax.step([x for x, _ in line], [y for _, y in line], where="post", color="tab:red", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"median latency, batch {batch} (ms, log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return Figure("accuracy_vs_latency.png", _png(fig),
                  f"Accuracy vs median latency across run folders (colour: run; black edge and red line: the Pareto "
                  f"front, no point both faster and more accurate; marker area ~ file size). Latency {timing}.")


def compare(runs: list[Run], out: Path, *, batches: tuple[int, ...] | None = None, measure: bool = False,
            rounds: int = 20) -> CompareResult:
    """Write compare.md, compare_files/accuracy_vs_latency.png and compare.html into `out`."""
    from ..errors import ConfigError

    if len(runs) < 2:
        raise ConfigError("compare needs at least two run folders")
    points, timing = collect(runs, batches=batches, measure=measure, rounds=rounds)
    fronts = fronts_of(points)
    shown = sorted({b for p in points for b in p.latency_ms})
    columns = ["run", "variant", "accuracy", "drop vs its torch (95% CI, McNemar)", "params", "KiB",
               *[f"p50 ms b{b}" for b in shown], "Pareto front", "selected"]
    rows = []
    for p in points:
        on = [f"b{b}" for b, f in fronts.items() if p.label in f]
        rows.append({"run": p.run, "variant": p.variant, "accuracy": p.accuracy,
                     "drop vs its torch (95% CI, McNemar)": p.drop, "params": p.params, "KiB": f"{p.bytes / 1024:.1f}",
                     **{f"p50 ms b{b}": None if b not in p.latency_ms else f"{p.latency_ms[b]:.3f}" for b in shown},
                     "Pareto front": ", ".join(on) or "", "selected": p.selected})
    rep = Report("onnxpipe compare: " + ", ".join(dict.fromkeys(p.run for p in points)))
    best = {b: f[-1] for b, f in fronts.items()}
    lead = "; ".join(f"at batch {b} the most accurate point of the front is {name}" for b, name in best.items())
    rep.p(f"{len(runs)} run folders, {len(points)} variants. " + (lead + "." if lead else "No latency recorded: "
          "run `onnxpipe select` or `onnxpipe bench` on each run, or compare with --measure."))
    rep.p(f"Latency: {timing}. Drops are against each run's own torch variant, on that run's test split.")
    rep.table(columns, [[r[c] for c in columns] for r in rows])
    fig = plot(points, fronts, timing)
    rep.figure(fig)
    rep.p("Run folders: " + ", ".join(f"`{r.root}`" for r in runs) + ".")
    out = Path(out)
    png = out / ASSETS / "accuracy_vs_latency.png"
    if fig is not None:
        write_bytes(png, fig.png)
    write_bytes(out / COMPARE_MD, to_markdown(rep, assets=ASSETS).encode())
    summary = {"runs": [str(r.root) for r in runs], "timing": timing,
               "points": [{**p.__dict__, "latency_ms": {str(b): t for b, t in p.latency_ms.items()}} for p in points],
               "pareto_front": {str(b): f for b, f in fronts.items()}}
    write_bytes(out / COMPARE_HTML, to_html(rep, summary, "compare.json (the source of every number above)").encode())
    write_json(out / "compare.json", summary)
    return CompareResult(points, [{k: ("*" if v is True else "" if v is False else v) for k, v in r.items()} for r in rows],
                         columns, fronts, timing, out / COMPARE_MD, out / COMPARE_HTML, png)
