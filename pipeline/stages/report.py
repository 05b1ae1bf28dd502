"""The run report: report.md and a self-contained report.html (images inlined as base64 PNGs, no
external resources: it opens offline) in the run folder, built from manifest.json alone.

Both files render one list of blocks (headings, paragraphs, tables, figures), so they say the same
thing. Sections: the run, lineage, variants (accuracy, size, latency, speed-up over torch, fraction
of the machine's peak, memory), the machine's limits, the parity matrix, plots (accuracy vs latency
with the Pareto front and marker area ~ file size; latency per variant per batch; training curves;
per-node divergence of quantized variants where the manifest has it) and the explanation grids of
`onnxpipe explain`, shown beside the variant that disagreed with torch.

Per-node divergence is what pipeline/stages/divergence.py writes (metrics[v]["node_divergence"], rows of
node_errors: {"node", "added_error", ...}); where that is missing, the quantizer's extra["excluded_nodes"]
(the nodes kept in FP32, ranked on the fully quantized build, same row format) is charted. Verdicts are
worded by the parity policy (pass / over budget / FAIL), as in `onnxpipe show` and `onnxpipe verify`."""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_bytes
from ..core.parity import delta_words
from ..core.policy import entry_verdict
from ..runfolder import Run

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
ASSETS = "report_files"          # PNGs referenced by report.md (report.html inlines them)


# --- blocks ---------------------------------------------------------------------------------------

@dataclass
class Figure:
    name: str            # file name under report_files/
    png: bytes
    caption: str
    source_path: str | None = None   # an existing PNG in the run folder (explain grids) instead of a new file


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, columns: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", Table(columns, [[_cell(v) for v in r] for r in rows])))

    def figure(self, fig: Figure | None) -> None:
        if fig is not None:
            self.blocks.append(("figure", fig))

    def figures(self) -> list[Figure]:
        return [b for kind, b in self.blocks if kind == "figure"]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# --- reading the manifest -------------------------------------------------------------------------

def latency_table(run: Run) -> tuple[str, dict[str, dict[int, dict[str, dict]]]]:
    """(source, {threads label: {batch: {variant: cell}}}) from bench metrics, else from selection's latency_ms."""
    out: dict[str, dict[int, dict[str, dict]]] = {}
    if run.section("bench"):
        for v in run.variants():
            for threads, per_batch in (run.metrics(v).get("bench") or {}).get("latency", {}).items():
                for batch, cell in per_batch.items():
                    out.setdefault(f"{threads} thread(s)", {}).setdefault(int(batch), {})[v] = cell
        return "onnxpipe bench", out
    for v in run.variants():
        for batch, p50 in (run.metrics(v).get("latency_ms") or {}).items():
            if isinstance(p50, (int, float)):
                out.setdefault("selection timing", {}).setdefault(int(batch), {})[v] = {"p50_ms": float(p50)}
    return "the select stage's timing (metrics.latency_ms)", out


def node_divergence(run: Run, variant: str) -> tuple[str, list[tuple[str, float]], str] | None:
    """(value name, [(node, value), ...], where it came from) for a variant: the divergence measured by
    pipeline/stages/divergence.py, else the quantizer's ranking of the nodes it kept in FP32."""
    measured = run.metrics(variant).get("node_divergence")
    if measured:
        source = run.metrics(variant).get("node_divergence_source", "onnxpipe report")
        return "added_error", [(r["node"], float(r["added_error"])) for r in measured], source
    excluded = run.artifact(variant).extra.get("excluded_nodes")
    if excluded:
        return "added_error", [(r["node"], float(r["added_error"])) for r in excluded], \
            "nodes kept in FP32, ranked on the fully quantized build"
    return None


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both latency (lower) and accuracy (higher)."""
    front, best = [], float("-inf")
    for name, lat, acc in sorted(points, key=lambda p: (p[1], -p[2])):
        if acc > best:
            front.append(name)
            best = acc
    return front


# --- plots ----------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


LABEL_OFFSETS = ((5, 7), (5, -14), (5, 17), (5, -24))   # points: alternate above / below the marker


def plot_accuracy_vs_latency(run: Run, table: dict, label: str) -> Figure | None:
    points_by_batch = {}
    for batch, cells in sorted(table.items()):
        pts = [(v, c["p50_ms"], run.metrics(v)["accuracy"]) for v, c in cells.items()
               if run.metrics(v).get("accuracy") is not None and c.get("p50_ms")]
        if pts:
            points_by_batch[batch] = pts
    if not points_by_batch:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, len(points_by_batch), figsize=(5.2 * len(points_by_batch), 4.2), squeeze=False)
    biggest = max(run.artifact(v).bytes for v in run.variants())
    for ax, (batch, pts) in zip(axes[0], points_by_batch.items()):
        front = pareto_front(pts)
        for k, (v, lat, acc) in enumerate(sorted(pts, key=lambda p: p[1])):
            area = 40 + 600 * run.artifact(v).bytes / biggest
            ax.scatter(lat, acc, s=area, alpha=0.55, color="tab:red" if v in front else "tab:blue",
                       edgecolors="black" if v == run.selected else "none", linewidths=1.5)
            # Neighbours in latency often tie in accuracy: stagger their labels above and below the point.
            ax.annotate(v, (lat, acc), textcoords="offset points", xytext=LABEL_OFFSETS[k % len(LABEL_OFFSETS)],
                        fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"})
        fp = sorted((lat, acc) for v, lat, acc in pts if v in front)
        ax.step([p[0] for p in fp], [p[1] for p in fp], where="post", color="tab:red", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        accs = [p[2] for p in pts]
        span = max(max(accs) - min(accs), 0.02)
        ax.set_ylim(min(accs) - 0.3 * span, max(accs) + 0.3 * span)
        ax.margins(x=0.25)
        ax.set_xlabel(f"median latency, batch {batch} (ms, log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"batch {batch} ({label})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return Figure("accuracy_vs_latency.png", _png(fig),
                  "Accuracy vs median latency. Red: the Pareto front (no variant is both faster and more accurate); "
                  "marker area ~ file size; black edge: the selected variant.")


def plot_latency_bars(run: Run, tables: dict[str, dict]) -> Figure | None:
    if not tables:
        return None
    plt = _pyplot()
    variants = [v for v in run.variants() if any(v in cells for t in tables.values() for cells in t.values())]
    fig, axes = plt.subplots(1, len(tables), figsize=(max(5.0, 1.1 * len(variants) + 3) * len(tables) / 1.4, 4.2),
                             squeeze=False)
    width = 0.8 / max(1, len(variants))
    colors = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20").colors  # one colour per variant
    for ax, (label, table) in zip(axes[0], tables.items()):
        batches = sorted(table)
        for i, v in enumerate(variants):
            xs, p50, err = [], [], [[], []]
            for j, b in enumerate(batches):
                c = table[b].get(v)
                if c:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    p50.append(c["p50_ms"])
                    err[0].append(0.0)
                    err[1].append(max(0.0, c.get("p90_ms", c["p50_ms"]) - c["p50_ms"]))
            ax.bar(xs, p50, width, yerr=err, capsize=2, label=v, color=colors[i % len(colors)])
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("median latency (ms, log); whisker to p90")
    axes[0][-1].legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return Figure("latency_per_batch.png", _png(fig), "Median latency of every variant at every batch size "
                  "(whisker: p90), measured interleaved in one run.")


def plot_training(run: Run) -> Figure | None:
    history = (run.section("training") or {}).get("history") or []
    if not history:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green", label="validation accuracy")
    ax2.set_ylabel("validation accuracy", color="tab:green")
    ax.set_title(f"training of {run.model_name}")
    ax.grid(alpha=0.3)
    return Figure("training.png", _png(fig), "Training loss and validation accuracy per epoch (variant torch).")


def plot_divergence(variant: str, value_name: str, items: list[tuple[str, float]], source: str, top: int = 25) -> Figure:
    plt = _pyplot()
    worst = sorted(items, key=lambda kv: kv[1], reverse=value_name != "cosine")[:top]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(worst) + 1.2))
    ax.barh([k for k, _ in worst][::-1], [v for _, v in worst][::-1], color="tab:orange")
    ax.set_xlabel(value_name)
    ax.set_title(f"{variant}: per-node divergence from its parent (worst {len(worst)})")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return Figure(f"divergence_{variant}.png", _png(fig), f"Per-node {value_name} of {variant} against its parent, "
                  f"worst nodes first: where the quantized graph drifts (source: {source}).")


# --- the report -----------------------------------------------------------------------------------

def accuracy_cost(run: Run, variant: str, reference: str = "torch") -> str:
    """The variant's accuracy against `reference` in words, as verify recorded it: lossless, or the drop with
    its 95% interval and McNemar p-value ("not distinguishable from 0" where that is so)."""
    if variant == reference:
        return "none (the reference itself)"
    entry = next(iter(run.parity(reference=reference, candidate=variant)), None)
    if entry is None:
        acc, ref = run.metrics(variant).get("accuracy"), run.metrics(reference).get("accuracy")
        return "not verified" if acc is None or ref is None else f"{100 * (ref - acc):.2f} pt (not verified)"
    if entry["rule"] == "tensor":
        return f"none: lossless (max |d| {entry['max_abs']:.1e})"
    if entry.get("uncertainty"):
        return f"drop {delta_words(entry['uncertainty'], signed=False)}"
    return f"drop {entry['accuracy_drop']:.2f} pt"


def _answer_section(rep: Report, run: Run, tables: dict) -> None:
    """The answer first: which variant, what it buys against torch, what it costs, and the runners-up."""
    sel = run.selected
    if not sel:
        rep.p("No variant is selected yet: run `onnxpipe select RUN` (or `onnxpipe run`).")
        return
    label = list(tables)[-1] if tables else None
    table = tables.get(label, {})
    ref = "torch" if any("torch" in cells for cells in table.values()) else ("onnx" if run.has("onnx") else None)
    ranking = (run.section("selection") or {}).get("ranking") or [sel]
    shown = list(dict.fromkeys([sel, *[v for v in ranking if v != sel][:2]]))
    batches = sorted(table)

    def speed(v: str, b: int):
        cell, base = table.get(b, {}).get(v), table.get(b, {}).get(ref)
        return None if not cell or not base or not cell.get("p50_ms") else base["p50_ms"] / cell["p50_ms"]

    root_bytes = run.artifact(run.root_variant(sel)).bytes
    gains = [f"{speed(sel, b):.2f}x {'faster' if speed(sel, b) >= 1 else 'as fast'} than {ref} at batch {b}"
             for b in batches if speed(sel, b) is not None]
    size = run.artifact(sel).bytes / root_bytes
    runners = [v for v in shown if v != sel]
    sentence = (f"**{sel}** is the selected variant: " + (", ".join(gains) if gains else "no latency recorded yet")
                + f", {size:.2f}x the size of {run.root_variant(sel)}; accuracy cost: "
                f"{accuracy_cost(run, sel, run.root_variant(sel))}."
                + (f" Closest: {', '.join(runners)}." if runners else ""))
    rep.p(sentence)
    cols = ["variant", *[c for b in batches for c in (f"p50 ms b{b}", f"x {ref} b{b}")], "KiB",
            f"size vs {run.root_variant(sel)}", f"accuracy cost vs {run.root_variant(sel)}"]
    rows = []
    for v in shown:
        row = [v + (" (selected)" if v == sel else "")]
        for b in batches:
            cell = table.get(b, {}).get(v) or {}
            x = speed(v, b)
            row += [fmt_ms(cell.get("p50_ms")), "-" if x is None else f"{x:.2f}"]
        row += [f"{run.artifact(v).bytes / 1024:.1f}", f"{run.artifact(v).bytes / root_bytes:.2f}x",
                accuracy_cost(run, v, run.root_variant(v))]
        rows.append(row)
    rep.table(cols, rows)
    if label:
        rep.p(f"Latency: {label} from {'onnxpipe bench' if run.section('bench') else 'the select stage'}; "
              f"the runners-up are the next variants in the selection ranking ({(run.section('selection') or {}).get('objective', 'geomean')} "
              "of the p50 latencies). Accuracy cost: drop in points on the test split with a 95% paired bootstrap "
              "interval and the exact McNemar p-value (information: the budgets decide).")


def build_report(run: Run) -> Report:
    m = run.manifest  # a snapshot: the report only reads
    rep = Report(f"onnxpipe report: {run.model_name} ({m.get('size', 'default')})")
    source, tables = latency_table(run)
    _answer_section(rep, run, tables)
    rep.h("The run")
    ds = m.get("dataset", {})
    split = ds.get("split", {})
    rep.p(f"Run folder `{run.root}`, created {m.get('created', '-')}. Model `{run.model_name}`, size "
          f"{m.get('size', 'default')}; data `{ds.get('source', '-')}` (train {split.get('train', '-')}, "
          f"validation {split.get('val', '-')}, test {split.get('test', '-')}). Selected variant: "
          f"**{m.get('selected') or 'none'}**.")
    for text in (m.get("warnings") or {}).values():   # e.g. a root model at chance accuracy
        rep.p(f"**Warning:** {text}")
    rep.p("Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ".")
    if m.get("timings"):
        rep.p("Stage times: " + ", ".join(f"{k} {v} s" for k, v in m["timings"].items()) + ".")
    if m.get("model_config"):
        rep.p("Model config: `" + json.dumps(m["model_config"]) + "`.")

    rep.h("Lineage")
    rows = []
    for v in run.variants():
        a = run.artifact(v)
        rows.append([v, " <- ".join(run.lineage(v)), a.stage, a.format, "lossy" if a.lossy else "lossless",
                     f"{a.bytes / 1024:.1f}", a.sha256[:12]])
    rep.table(["variant", "lineage (newest first)", "stage", "format", "step", "KiB", "sha256"], rows)
    _compression_section(rep, run)

    _variants_section(rep, run, tables, source)
    _limits_section(rep, run)
    _profile_sections(rep, run)
    _parity_section(rep, run)
    _packages_section(rep, run)

    rep.h("Plots")
    if tables:
        label = next(iter(tables)) if len(tables) == 1 else list(tables)[-1]
        rep.figure(plot_accuracy_vs_latency(run, tables[label], label))
        rep.figure(plot_latency_bars(run, tables))
    else:
        rep.p("No latency measured yet: run `onnxpipe bench RUN` for the latency plots.")
    rep.figure(plot_training(run))
    divergences = [(v, d) for v in run.variants() if run.artifact(v).lossy and (d := node_divergence(run, v))]
    if divergences:
        rep.h("Per-node divergence of quantized variants", 3)
        for v, (value_name, items, source) in divergences:
            rep.figure(plot_divergence(v, value_name, items, source))
    elif any(run.artifact(v).lossy for v in run.variants()):
        rep.p("The manifest holds no per-node divergence for the lossy variants.")
    for v in run.variants():
        if run.metrics(v).get("node_divergence_error"):
            rep.p(f"Per-node divergence of {v} could not be measured: {run.metrics(v)['node_divergence_error']}")

    _serving_section(rep, run)
    _explain_section(rep, run)
    return rep


def _setting_label(s: dict) -> str:
    return f"threads {s['threads']}, workers {s['workers']}, batch {s['max_batch']}, delay {s['max_delay_ms']:g} ms"


def plot_serving_sweep(record: dict) -> Figure | None:
    """Throughput against p99 latency, one line per setting through its concurrencies (`onnxpipe tune`)."""
    points = [p for p in record.get("sweep", []) if p.get("p99_ms") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    by_setting: dict[str, list[dict]] = {}
    for p in points:
        by_setting.setdefault(_setting_label(p["setting"]), []).append(p)
    colors = plt.get_cmap("tab20").colors
    for i, (label, ps) in enumerate(by_setting.items()):
        ps = sorted(ps, key=lambda p: p["concurrency"])
        ax.plot([p["rps"] for p in ps], [p["p99_ms"] for p in ps], marker="o", ms=3, lw=1,
                color=colors[i % len(colors)], label=label)
    ax.axhline(record["p99_ms"], color="grey", ls="--", lw=1, label=f"p99 target {record['p99_ms']:g} ms")
    chosen = record.get("chosen")
    if chosen:
        ax.plot([chosen["rps"]], [chosen["p99_ms"]], marker="*", ms=16, color="black", ls="none",
                label="chosen: " + _setting_label(record["settings"]))
    ax.set_xlabel("requests/s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_title(f"serving sweep (batch {record['load']['batch']}, {'binary' if record['load']['binary'] else 'JSON'}; "
                 f"concurrency {', '.join(map(str, record['load']['concurrency']))})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return Figure("serving_sweep.png", _png(fig), "Throughput against p99 latency for every serving setting the "
                  "sweep tried, one line through its concurrencies; the star is the setting `onnxpipe tune` chose.")


def _serving_section(rep: Report, run: Run) -> None:
    rec = run.section("serving")
    if not rec:
        return
    record = rec if rec.get("sweep") else rec.get("last_sweep")
    rep.h("Serving settings (onnxpipe tune)")
    if rec.get("settings"):
        c = rec.get("chosen", {})
        rep.p(f"Chosen {rec.get('when', '')} for variant {rec.get('variant', '-')} on {rec.get('cores', '?')} cores: "
              f"{_setting_label(rec['settings'])}: {c.get('rps', 0):.0f} requests/s at {c.get('concurrency')} clients, "
              f"p50 {c.get('p50_ms', 0):.2f} ms, p99 {c.get('p99_ms', 0):.2f} ms (target p99 <= {rec.get('p99_ms')} ms). "
              "`onnxpipe serve` and `onnxpipe export-triton` start from it; flags override it.")
    if record and record is not rec:
        rep.p(f"The last sweep ({record.get('when')}) found no setting within p99 <= {record.get('p99_ms')} ms; "
              "the settings above were kept.")
    if record:
        rep.table(["setting", "clients", "req/s", "p50 ms", "p99 ms", "rows/call", "errors"],
                  [[_setting_label(p["setting"]), p.get("concurrency"), f"{p['rps']:.0f}", p.get("p50_ms"),
                    p.get("p99_ms"), p.get("rows_per_call"), p["errors"] + p["non_200"]] for p in record["sweep"]])
        rep.figure(plot_serving_sweep(record))


def _variants_section(rep: Report, run: Run, tables: dict, source: str) -> None:
    rep.h("Variants")
    torch_acc = run.metrics("torch").get("accuracy") if run.has("torch") else None
    label = list(tables)[-1] if tables else None      # the most threads measured
    batches = sorted(tables[label]) if label else []
    cols = ["variant", "parent", "kind", "KiB", "accuracy", "drop vs torch (pt)", "selected"]
    for b in batches:
        cols += [f"p50 ms b{b}", f"x torch b{b}", f"% peak b{b}"]
    cols += ["peak RSS MB"]
    rows = []
    for v in run.variants():
        a, met = run.artifact(v), run.metrics(v)
        bench = met.get("bench") or {}
        acc = met.get("accuracy")
        drop = None if acc is None or torch_acc is None else f"{100 * (torch_acc - acc):.2f}"
        row = [v, a.parent or "-", (bench.get("flops") or {}).get("kind", "-"), f"{a.bytes / 1024:.1f}", fmt_acc(acc),
               drop, "*" if run.selected == v else ""]
        for b in batches:
            c = tables[label][b].get(v) or {}
            x, frac = c.get("speedup_vs_torch"), c.get("fraction_of_peak")
            row += [fmt_ms(c.get("p50_ms")), "-" if x is None else f"{x:.2f}", "-" if frac is None else f"{100 * frac:.0f}"]
        row.append(bench.get("peak_rss_mb"))
        rows.append(row)
    rep.table(cols, rows)
    if label:
        rep.p(f"Latency from {source}, {label}: median per cell, all variants timed interleaved in one run "
              "(ratios are side by side; absolute numbers move with the machine's load). "
              "% peak: achieved GFLOP/s (FLOPs per row from the ONNX graph) over the matmul peak of the same kind "
              "measured in the same rounds. Peak RSS: a fresh process loading and running the variant.")
    rows = []
    for v in run.variants():
        for threads, per_batch in ((run.metrics(v).get("bench") or {}).get("latency") or {}).items():
            for b, c in per_batch.items():
                rows.append([v, threads, b, fmt_ms(c["p50_ms"]), fmt_ms(c["p90_ms"]), fmt_ms(c["p99_ms"]),
                             f"{c['throughput_rows_s']:.0f}",
                             None if c.get("speedup_vs_torch") is None else f"{c['speedup_vs_torch']:.2f}",
                             None if c.get("gflops") is None else f"{c['gflops']:.1f}",
                             None if c.get("fraction_of_peak") is None else f"{100 * c['fraction_of_peak']:.0f}",
                             fmt_ms(c.get("compute_floor_ms")), fmt_ms(c.get("overhead_ms")), c.get("limit")])
    if rows:
        rep.h("Every bench cell", 3)
        rep.table(["variant", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "rows/s", "x torch", "GFLOP/s",
                   "% peak", "compute floor ms", "overhead ms", "limit"], rows)
        rep.p("limit: which floor is higher for the cell, the compute floor (work / peak) or one near-empty call "
              "(overhead); a latency far above both is the runtime's own inefficiency, not a machine limit.")


def _compression_section(rep: Report, run: Run) -> None:
    """Distillation, pruning and transfer: what each measured, with the interval of every gain or drop."""
    d = run.section("distillation")
    if d:
        rep.h("Distillation", 3)
        rows = [["teacher", d["teacher_params"], fmt_acc(d["teacher_accuracy"]), "-"],
                [f"distilled student ({d['student_model']})", d["student_params"], fmt_acc(d["distilled_accuracy"]),
                 accuracy_cost(run, "student") if run.has("student") else "-"]]
        if "scratch_accuracy" in d:
            rows.append(["same student from scratch", d["student_params"], fmt_acc(d["scratch_accuracy"]), "-"])
        rep.table(["model", "params", "accuracy", "cost vs teacher"], rows)
        if d.get("distillation_gain"):
            rep.p(f"Distilled - scratch: {delta_words(d['distillation_gain'])}.")
    p = run.section("pruning")
    if p:
        rep.h("Pruning", 3)
        rep.p(f"{p['library']}, importance {p['importance']}, scope {p['scope']}, ratio {p['ratio']:.3f} "
              f"(goal: {p['goal']['kind']} {p['goal']['value']:g}). Params {p['params_before']:,} -> {p['params_after']:,} "
              f"({100 * p['params_ratio']:.0f}%), FLOPs per row {p['flops_before']:,.0f} -> {p['flops_after']:,.0f} "
              f"({100 * p['flops_ratio']:.0f}%). Accuracy {fmt_acc(p['teacher_accuracy'])} unpruned, "
              f"{fmt_acc(p['pruned_accuracy_before_fine_tune'])} pruned before fine-tuning, {fmt_acc(p['pruned_accuracy'])} "
              f"after; drop {delta_words(p.get('drop_vs_teacher'), signed=False)}."
              + (f" Zeroed-weights check: max |d| {p['zeroed_check']['max_abs']:.1e} over "
                 f"{len(p['zeroed_check']['shapes'])} shapes." if p.get("zeroed_check") else ""))
        rep.table(["layer", "kind", "units", "kept", "pruned"],
                  [[r["group"], r["kind"], r.get("size", "-"), r.get("kept", "-"), len(r["pruned_units"])] for r in p["plan"]])
    t = run.section("transfer")
    if t:
        src = t["source"]
        rep.h("Transfer", 3)
        rep.p(f"Transferred from `{src['run']}` (variant {src['variant']}, sha256 {src['sha256'][:16]}..., "
              f"{src['model']} trained on {src['dataset'].get('source')} classes {src['dataset'].get('classes') or 'all'}); "
              f"freeze {t['freeze']} ({len(t['frozen_layers'])} layers, {t['frozen_params']:,} params, unchanged), head "
              f"{t['head']}; {t['train_rows']} training rows, {t['epochs_run']} epochs. Accuracy "
              f"{fmt_acc(t['transferred_accuracy'])}" + (f" vs {fmt_acc(t['scratch_accuracy'])} from scratch: "
                                                          f"{delta_words(t['gain_vs_scratch'])}." if "scratch_accuracy" in t else "."))


def _limits_section(rep: Report, run: Run) -> None:
    info = run.section("bench")
    if not info:
        return
    rep.h("The machine's limits")
    mach = info.get("machine", {})
    rep.p(f"CPU {mach.get('cpu', '-')}, {mach.get('usable_cpus', '-')} usable cores, flags "
          f"{', '.join(mach.get('flags', [])) or '-'}; device {info['settings'].get('device', 'cpu')}. "
          f"Method: {info.get('method', '-')}.")
    rows = []
    for threads, lim in info.get("limits", {}).items():
        for b, x in lim.get("by_batch", {}).items():
            rows.append([threads, b, f"{x['fp32_gflops']:.1f}", f"{x['int8_gops']:.1f}",
                         f"{1000 * x['overhead_ms']:.1f}", f"{1000 * x['torch_overhead_ms']:.1f}"])
    rep.table(["threads", "in the batch-N rounds", "FP32 matmul GFLOP/s", "INT8 matmul GOP/s",
               "ORT per-call overhead us", "torch per-call overhead us"], rows)


def _profile_sections(rep: Report, run: Run) -> None:
    """Where the time goes (bench's profiles) and the selected variant against the machine's limit."""
    from . import report_profile as rp

    if not run.section("bench"):
        return
    rep.h("Against the limit")
    rows = rp.limit_rows(run)
    if rows:
        rep.table(rp.LIMIT_COLUMNS, rows)
        for v, t, b, cell in rp.limit_cells(run):
            rep.p(rp.reading(run, v, t, b, cell))
    else:
        rep.p("The selected variant has no bench cells: run `onnxpipe select` then `onnxpipe bench RUN`.")
    rep.h("Where the time goes")
    rows = rp.profile_rows(run)
    if not rows:
        rep.p("No profile recorded: run `onnxpipe bench RUN --profile` (every variant) or `onnxpipe bench RUN` "
              "(the selected one and torch, the default).")
        return
    rep.table(rp.PROFILE_COLUMNS, rows)
    rep.p("From ONNX Runtime's profiler (the graph it really ran, after its fusions) or torch.profiler (self CPU "
          "time per aten op), each cell profiled alone after the timed rounds. The op shares add up to the "
          "measured call; \"(between kernels)\" is time no kernel accounts for. on >1 thread: the share of "
          "kernel time in which an intra-op sub-thread ran.")
    fig = rp.plot_profiles(run, _pyplot())
    if fig is not None:
        rep.figure(Figure("profile.png", _png(fig), "Where the time goes: each op type's share of one call per "
                          "profiled variant and thread count, at its largest profiled batch; the call's median "
                          "ms at the bar's end."))
    nodes = rp.top_node_rows(run)
    if nodes:
        rep.h("The slowest nodes", 3)
        rep.table(rp.TOP_NODE_COLUMNS, nodes)


def _parity_section(rep: Report, run: Run) -> None:
    parity = run.parity()
    rep.h("Parity")
    if not parity:
        rep.p("No parity checks recorded yet (`onnxpipe verify RUN`).")
        return
    refs = list(dict.fromkeys(p["reference"] for p in parity))
    cands = list(dict.fromkeys(p["candidate"] for p in parity))
    by_pair = {(p["reference"], p["candidate"]): p for p in parity}

    def verdict(p):
        if p is None:
            return ""
        mark = entry_verdict(p)
        if p["rule"] == "tensor":
            return f"{mark} max|d| {p['max_abs']:.1e}"
        return f"{mark} agree {p['agreement']:.3f}, drop {p['accuracy_drop']:.2f} pt" + (
            "" if p.get("uncertainty", {}).get("distinguishable", True) else " (n.d.)")

    rep.h("Matrix (rows: reference, columns: candidate)", 3)
    rep.table(["reference"] + cands, [[r] + [verdict(by_pair.get((r, c))) for c in cands] for r in refs])
    rows = []
    for p in parity:
        rows.append([p["reference"], p["candidate"], p["rule"], entry_verdict(p), f"{p['max_abs']:.3g}",
                     None if p.get("agreement") is None else f"{p['agreement']:.4f}",
                     None if p.get("accuracy_drop") is None else f"{p['accuracy_drop']:.2f}",
                     delta_words(p.get("uncertainty"), signed=False) if p["rule"] == "task" else None,
                     len(p.get("shapes", [])), "; ".join(p.get("notes", []))])
    rep.table(["reference", "candidate", "rule", "result", "max abs", "agreement", "acc drop pt",
               "drop: 95% CI, McNemar", "shapes", "notes"], rows)
    rep.p("Drops of lossy variants carry a 95% paired bootstrap interval over the test rows (seeded) and the exact "
          "McNemar p-value on the rows where the two disagree about correctness; \"not distinguishable from 0\" "
          "(n.d. in the matrix) where the interval holds 0 or p >= 0.05. The budgets decide the verdict.")


def _packages_section(rep: Report, run: Run) -> None:
    """`onnxpipe package`: what was written for the edge, its parity, and the page in a real browser."""
    packages = run.section("packages") or {}
    if not packages:
        return
    rep.h("Edge packages")
    rows = []
    for key, p in packages.items():
        lat = p.get("latency_b1") or {}
        rss = p.get("peak_rss_mb") or {}
        parity = p.get("parity") or []
        verdict = "not run in a browser" if p["target"] == "web" and not p.get("checked_in_browser") else \
            ("pass" if parity and all(parity) else "FAIL")
        rows.append([p["target"], p["variant"], f"{p['bytes'] / 1024:.1f}", f"{p['model_bytes'] / 1024:.1f}",
                     verdict, rss.get("ort"), rss.get("onnx"), fmt_ms(lat.get("browser_wasm_ms")),
                     fmt_ms(lat.get("native_cpu_ms")), p["out"]])
    rep.table(["target", "variant", "package KiB", "model KiB", "parity", "peak RSS MB (.ort)", "peak RSS MB (.onnx)",
               "browser WASM ms b1", "native CPU ms b1", "folder"], rows)
    rep.p("ort: the `.ort` file (loaded as a minimal build runs it) against the `.onnx` over the shape grid, and every "
          "node listed in required_operators.config; peak RSS of a fresh process that loads the file and runs one row "
          "on one thread. web: every reference input run in headless Chromium (onnxruntime-web, WASM, one thread) "
          "against the CPU execution provider; latency at batch 1 is the median of calls timed in the page, beside "
          "the same file on the native CPU provider with the same thread count.")
    for key, p in packages.items():
        if not p.get("screenshot"):
            continue
        path = run.file(p["screenshot"], what="package screenshot")
        if not path.is_file():
            rep.p(f"(missing screenshot {p['screenshot']}: run `onnxpipe package ... --target web --check` again)")
            continue
        rep.figure(Figure(Path(p["screenshot"]).name, path.read_bytes(),
                          f"The web package of {p['variant']} in {p.get('browser', 'headless Chromium')}, after "
                          "running the first reference input.", source_path=p["screenshot"]))


def _explain_section(rep: Report, run: Run) -> None:
    info = run.section("explain")
    if not info:
        return
    rep.h("Explanations")
    rep.p(f"{info['method']} on variant torch, for its predicted class; {info['samples']} test samples, "
          "misclassified ones first. Run `onnxpipe explain RUN` to refresh.")
    for group in info.get("groups", []):
        path = run.file(group["png"], what="explain image")  # inside the run folder, or an error
        if not path.is_file():
            rep.p(f"(missing image {group['png']}: run `onnxpipe explain` again)")
            continue
        title = group["title"]
        if group.get("variant"):
            rep.h(f"{group['variant']}: where it disagrees with torch", 3)
        else:
            rep.h(title, 3)
        rep.figure(Figure(Path(group["png"]).name, path.read_bytes(), title, source_path=group["png"]))


# --- rendering ------------------------------------------------------------------------------------

def to_markdown(rep: Report, assets: str = ASSETS) -> str:
    out = [f"# {rep.title}", ""]
    for kind, b in rep.blocks:
        if kind.startswith("h"):
            out += ["#" * int(kind[1:]) + " " + b, ""]
        elif kind == "p":
            out += [b, ""]
        elif kind == "table":
            out.append("| " + " | ".join(b.columns) + " |")
            out.append("|" + "---|" * len(b.columns))
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b.rows]
            out.append("")
        elif kind == "figure":
            target = b.source_path or f"{assets}/{b.name}"
            out += [f"![{b.caption}]({target})", "", f"*{b.caption}*", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}code{background:#f3f3f3;padding:0 3px}details pre{font-size:11px;overflow:auto}"""


def _inline(text: str) -> str:
    """Escape, then the two bits of markdown the paragraphs use: `code` and **bold**."""
    import re

    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def to_html(rep: Report, manifest: dict, source: str = "manifest.json (the source of every number above)") -> str:
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(rep.title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(rep.title)}</h1>"]
    for kind, b in rep.blocks:
        if kind.startswith("h"):
            out.append(f"<{kind}>{html.escape(b)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(b)}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode(b.png).decode()
            out.append(f"<figure><img alt='{html.escape(b.caption, quote=True)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    out.append(f"<details><summary>{html.escape(source)}</summary><pre>"
               + html.escape(json.dumps(manifest, indent=1)) + "</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run: Run) -> tuple[Path, Path]:
    """Write report.md (+ report_files/*.png) and report.html into the run folder; return their paths."""
    rep = build_report(run)
    for fig in rep.figures():
        if fig.source_path is None:
            write_bytes(run.root / ASSETS / fig.name, fig.png)
    md, page = run.root / REPORT_MD, run.root / REPORT_HTML
    write_bytes(md, to_markdown(rep).encode())
    write_bytes(page, to_html(rep, run.manifest).encode())
    return page, md
