"""The report's "Where the time goes" and "Against the limit" content, from bench's records (layer 3).

Pure over the manifest: rows, sentences and one matplotlib figure; report.py lays them out. The profiles
are bench's (metrics[v]["bench"]["profile"][threads][batch], core/profile.py's summary for ONNX variants,
torch.profiler's op table for torch eager); the limit cells are bench's latency cells (achieved G(FL)OP/s
over the matmul peak of the same kind measured in the same rounds).

The reading of each selected cell is produced by rules, not written by hand, so it stays true as the
numbers move: it names the slowest op type and its share, the Q/DQ share where it is large, the kernels
that ran on one thread while others sat idle, and whether the call is bound by compute or by overhead."""
from __future__ import annotations

from ..core.profile import BETWEEN, op_shares
from ..runfolder import Run

SEGMENTS = 5               # op types per stacked bar; the rest is "other"
LOW_PEAK = 0.40            # below this fraction of peak, the reading names what holds the variant back
BIG_QDQ = 0.15             # a Q/DQ share of the kernel time worth naming
IDLE_THREADS = 0.50        # with >1 thread, below this parallel share the serial kernels are named


def profiled_cells(run: Run) -> list[tuple[str, str, str, dict]]:
    """[(variant, threads, batch, profile)] in the manifest's order, every profiled cell."""
    out = []
    for v in (run.section("bench") or {}).get("profiled", []):
        for t, by_batch in ((run.metrics(v).get("bench") or {}).get("profile") or {}).items():
            for b, prof in by_batch.items():
                out.append((v, t, b, prof))
    return out


def _ms(prof: dict) -> float:
    return prof.get("run_ms") or prof.get("total_ms") or 0.0


def profile_rows(run: Run) -> list[list]:
    """One row per profiled cell: call ms, the slowest op types with their shares, Q/DQ, reorder, threads."""
    rows = []
    for v, t, b, prof in profiled_cells(run):
        tops = ", ".join(f"{op} {100 * s:.0f} %" for op, s in op_shares(prof, 3))
        sh = prof.get("shares")
        rows.append([v, t, b, f"{_ms(prof):.3f}", tops,
                     "-" if sh is None else f"{100 * sh['qdq']:.0f}",
                     "-" if sh is None else f"{100 * sh['reorder_transpose']:.0f}",
                     "-" if sh is None or int(t) == 1 else f"{100 * prof['parallel_share']:.0f}",
                     "ORT profiler" if sh is not None else "torch.profiler"])
    return rows


PROFILE_COLUMNS = ["variant", "threads", "batch", "call ms", "slowest op types (share of the call)", "Q/DQ %",
                   "reorder/transpose %", "on >1 thread %", "source"]


def top_node_rows(run: Run, top: int = 5) -> list[list]:
    """The slowest nodes of each profiled ONNX variant at its largest profiled batch and most threads."""
    rows = []
    best: dict[str, tuple[str, str, dict]] = {}
    for v, t, b, prof in profiled_cells(run):
        if "top_nodes" in prof and (v not in best or (int(b), int(t)) >= (int(best[v][1]), int(best[v][0]))):
            best[v] = (t, b, prof)
    for v, (t, b, prof) in best.items():
        for n in prof["top_nodes"][:top]:
            rows.append([v, t, b, n["node"], n["op"], f"{n['ms']:.3f}", f"{100 * n['ms'] / max(_ms(prof), 1e-12):.0f}"])
    return rows


TOP_NODE_COLUMNS = ["variant", "threads", "batch", "node", "op", "ms per call", "% of the call"]


def limit_cells(run: Run) -> list[tuple[str, str, str, dict]]:
    """[(variant, threads, batch, latency cell)] of the selected variant at its largest benched batch
    (64 where measured), one per thread count."""
    v = run.selected
    if not v or not run.has(v):
        return []
    latency = (run.metrics(v).get("bench") or {}).get("latency") or {}
    out = []
    for t, per_batch in latency.items():
        if per_batch:
            b = "64" if "64" in per_batch else max(per_batch, key=int)
            out.append((v, t, b, per_batch[b]))
    return out


def reading(run: Run, variant: str, threads: str, batch: str, cell: dict) -> str:
    """A sentence on where the cell sits against the machine's limit and why, from its numbers."""
    kind = ((run.metrics(variant).get("bench") or {}).get("flops") or {}).get("kind", "fp32")
    unit, peak_name = ("GOP/s", "INT8") if kind == "int8" else ("GFLOP/s", "FP32")
    frac = cell.get("fraction_of_peak")
    head = f"{variant} at {threads} thread(s), batch {batch}: {cell['p50_ms']:.3f} ms"
    if frac is None:
        return head + "; no FLOP count, so no fraction of peak."
    parts = [f"{head}, {cell['gflops']:.1f} {unit}, {100 * frac:.0f} % of the {peak_name} matmul peak"]
    if cell.get("limit") == "overhead":
        parts.append(f"bound by overhead: one near-empty call takes {cell['overhead_ms']:.3f} ms, more than the "
                     f"compute floor of {cell['compute_floor_ms']:.3f} ms, so a bigger batch, not a faster kernel, "
                     "moves it")
    prof = (((run.metrics(variant).get("bench") or {}).get("profile") or {}).get(threads) or {}).get(batch)
    if prof is None:
        parts.append("no profile of this cell (run `onnxpipe bench RUN --profile`)")
        return "; ".join(parts) + "."
    tops = op_shares(prof, 2)
    if tops:
        parts.append("the time goes to " + " and ".join(f"{op} ({100 * s:.0f} %)" for op, s in tops))
    sh = prof.get("shares")
    if sh is not None and sh["qdq"] >= BIG_QDQ:
        parts.append(f"Q/DQ nodes take {100 * sh['qdq']:.0f} % of the kernel time (quantization boundaries ORT "
                     "did not fuse away)")
    if sh is not None and int(threads) > 1 and prof["parallel_share"] < IDLE_THREADS:
        serial = ", ".join(f"{op} {ms:.3f} ms" for op, ms in list(prof.get("serial_by_op", {}).items())[:2])
        parts.append(f"only {100 * prof['parallel_share']:.0f} % of the kernel time ran on more than one thread; "
                     f"the kernels that held the others idle: {serial or '-'}")
    if frac < LOW_PEAK and cell.get("limit") != "overhead" and tops:
        parts.append(f"held back by {tops[0][0]}: below {100 * LOW_PEAK:.0f} % of peak, it is the kernel to look at")
    if BETWEEN in prof.get("by_op", {}) and _ms(prof) and prof["by_op"][BETWEEN] / _ms(prof) >= 0.2:
        parts.append(f"{100 * prof['by_op'][BETWEEN] / _ms(prof):.0f} % of the call falls between kernels "
                     "(scheduling and copies)")
    return "; ".join(parts) + "."


def limit_rows(run: Run) -> list[list]:
    rows = []
    for v, t, b, c in limit_cells(run):
        frac = c.get("fraction_of_peak")
        rows.append([v, t, b, f"{c['p50_ms']:.3f}", "-" if c.get("gflops") is None else f"{c['gflops']:.1f}",
                     "-" if frac is None else f"{100 * frac:.0f}", c.get("limit") or "-",
                     "-" if c.get("compute_floor_ms") is None else f"{c['compute_floor_ms']:.3f}"])
    return rows


LIMIT_COLUMNS = ["variant", "threads", "batch", "p50 ms", "G(FL)OP/s", "% of peak", "limit", "compute floor ms"]


def plot_profiles(run: Run, plt):
    """A stacked bar per profiled (variant, threads) at its largest batch: each op type's share of the call,
    the call's ms written at the bar's end. None when nothing was profiled."""
    cells: dict[tuple[str, str], tuple[str, dict]] = {}
    for v, t, b, prof in profiled_cells(run):
        if (v, t) not in cells or int(b) > int(cells[(v, t)][0]):
            cells[(v, t)] = (b, prof)
    if not cells:
        return None
    segments = [dict(op_shares(prof, SEGMENTS)) for _, prof in cells.values()]   # each bar's own top op types
    ops = list(dict.fromkeys(op for seg in segments for op in seg))
    labels = [f"{v} @{t}t b{b}" for (v, t), (b, _) in cells.items()]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(cells) + 1.6))
    left = [0.0] * len(cells)
    cmap = plt.get_cmap("tab20")
    for i, op in enumerate(ops + ["other"]):
        widths = [100 * (1 - sum(seg.values())) if op == "other" else 100 * seg.get(op, 0.0) for seg in segments]
        ax.barh(labels, widths, left=left, color=cmap(i % 20), label=op)
        left = [a + w for a, w in zip(left, widths)]
    for y, (b, prof) in enumerate(cells.values()):
        ax.text(101, y, f"{_ms(prof):.3f} ms", va="center", fontsize=8)
    ax.set_xlim(0, 118)
    ax.set_xlabel("share of the call (%)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.invert_yaxis()
    fig.tight_layout()
    return fig
