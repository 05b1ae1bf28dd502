"""Select stage: time every ONNX variant on this machine and make the fastest one within budget the
run's `selected` variant.

Rules (choose() is a pure function over recorded timings, so they are testable without a clock):
  - a variant takes part only if it has a passing verdict against its parent (tensor rule for lossless
    steps, accuracy budget for lossy ones), no failing verdict, and every ancestor takes part too;
    so distillation students compete the moment their verdicts are recorded;
  - a lossy variant slower than its parent at any timed batch size is kept on disk, marked
    `slower_than_parent`, and never selected (it would trade accuracy for nothing);
  - edge limits (`max_bytes`, `max_rss_mb`): a variant whose model file is larger, or whose fresh process
    (load, one row, one thread) peaks above the memory limit, is excluded; when nothing is left, the
    variant closest to the limits is named with how far it misses;
  - among the rest the lowest score wins; the default score is the geometric mean of the p50
    latencies over the batch sizes, so a 2x gain at batch 1 counts as much as a 2x gain at batch 64;
  - each variant is timed at every session setting (intra-op threads 1, 2, 4, ... up to the usable
    cores; the parallel execution mode too where its graph has independent compute branches), all in
    the same interleaved rounds, and competes with its best one (best_setting, also pure: the cheapest
    setting within 3 % of the fastest); the selected variant is then timed with spinning on and off.
The chosen setting per variant (and the best one per batch size) is recorded in metrics[v]
["session_setting"] / ["best_setting_by_batch"]; serve and export-triton start from the selected one.
The machine's CPU features and ONNX Runtime's settings are recorded beside the timings."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..core.predictors import load_predictor
from ..core.runtime import SessionSetting
from ..core.timing import NEAR_TIE, thread_candidates, time_predictors
from ..errors import ArtifactError
from ..runfolder import Run
from .configs import SelectConfig

log = logging.getLogger("onnxpipe")

TIMING_BLOCK = 3   # per round, each variant runs 3 times back to back; the first re-warms caches, untimed


@dataclass
class Selection:
    selected: str | None
    scores: dict[str, float] = field(default_factory=dict)            # ms; lower is better
    ranking: list[str] = field(default_factory=list)                  # eligible variants, best first
    excluded: dict[str, str] = field(default_factory=dict)            # variant -> why it cannot be selected
    slower_than_parent: dict[str, list[str]] = field(default_factory=dict)   # variant -> batch sizes
    over_limits: dict[str, dict[str, float]] = field(default_factory=dict)   # variant -> {limit: how far over}
    closest: str | None = None       # nothing fits the edge limits: the variant nearest to fitting them
    why_none: str = ""               # why nothing was selected, in one sentence

    def to_json(self) -> dict:
        d = {"selected": self.selected, "scores_ms": {k: round(v, 5) for k, v in self.scores.items()},
             "ranking": self.ranking, "excluded": self.excluded, "slower_than_parent": self.slower_than_parent}
        if self.over_limits:
            d["over_limits"] = self.over_limits
        return d


def score(latency_ms: dict[str, float], objective: str = "geomean") -> float:
    if objective == "geomean":
        return math.exp(sum(math.log(max(t, 1e-9)) for t in latency_ms.values()) / len(latency_ms))
    return latency_ms[objective]


def _over(v: dict, max_bytes: int | None, max_rss_mb: float | None) -> dict[str, float]:
    """{limit: amount over it} for one variant (a memory limit with no measurement counts as missed)."""
    over = {}
    if max_bytes is not None and v.get("bytes", 0) > max_bytes:
        over["max_bytes"] = float(v["bytes"] - max_bytes)
    if max_rss_mb is not None:
        rss = v.get("peak_rss_mb")
        if rss is None:
            over["max_rss_mb"] = math.inf
        elif rss > max_rss_mb:
            over["max_rss_mb"] = float(rss - max_rss_mb)
    return over


def _limit_parts(v: dict, max_bytes: int | None, max_rss_mb: float | None) -> str:
    """'110,759 bytes (10,759 over --max-bytes 100,000, 11%) and a peak RSS of ...' for one variant."""
    parts = []
    if max_bytes is not None:
        b = v.get("bytes", 0)
        parts.append(f"{b:,} bytes ({b - max_bytes:,} over --max-bytes {max_bytes:,}, {100 * (b / max_bytes - 1):.0f}%)"
                     if b > max_bytes else f"{b:,} bytes (within --max-bytes)")
    if max_rss_mb is not None:
        rss = v.get("peak_rss_mb")
        if rss is None:
            parts.append("no measured peak RSS")
        else:
            parts.append(f"a peak RSS of {rss:.1f} MB ({rss - max_rss_mb:.1f} MB over --max-rss-mb {max_rss_mb:g})"
                         if rss > max_rss_mb else f"a peak RSS of {rss:.1f} MB (within --max-rss-mb)")
    return " and ".join(parts)


def choose(variants: dict[str, dict], objective: str = "geomean", *, max_bytes: int | None = None,
           max_rss_mb: float | None = None) -> Selection:
    """Pick the fastest eligible variant from recorded numbers.

    `variants[name]` = {"latency_ms": {"1": p50, "64": p50}, "eligible": bool, "why": str (when not
    eligible), "parent": str | None, "lossy": bool, "bytes": int, "peak_rss_mb": float (with max_rss_mb)}."""
    sel = Selection(selected=None)
    for name, v in variants.items():
        parent = variants.get(v.get("parent") or "")
        if v.get("lossy") and parent is not None:
            worse = sorted((b for b, t in v["latency_ms"].items()
                            if b in parent["latency_ms"] and t > parent["latency_ms"][b]), key=int)
            if worse:
                sel.slower_than_parent[name] = worse
    for name, v in variants.items():
        if not v.get("eligible", False):
            sel.excluded[name] = v.get("why") or "no passing verdict"
        elif name in sel.slower_than_parent:
            sel.excluded[name] = (f"slower than its parent {v['parent']} at batch "
                                  f"{', '.join(sel.slower_than_parent[name])}")
        elif not v.get("latency_ms"):
            sel.excluded[name] = "not timed"
        elif over := _over(v, max_bytes, max_rss_mb):
            sel.over_limits[name] = over
            sel.excluded[name] = "over the edge limits: " + _limit_parts(v, max_bytes, max_rss_mb)
        else:
            sel.scores[name] = score(v["latency_ms"], objective)
    sel.ranking = sorted(sel.scores, key=lambda n: (sel.scores[n], n))
    sel.selected = sel.ranking[0] if sel.ranking else None
    if sel.selected is None and sel.over_limits:
        def misfit(n: str) -> tuple:  # the worst overshoot relative to its limit, then the file size
            v = variants[n]
            ratios = [v.get("bytes", 0) / max_bytes] if max_bytes is not None else []
            if max_rss_mb is not None:
                ratios.append(math.inf if v.get("peak_rss_mb") is None else v["peak_rss_mb"] / max_rss_mb)
            return max(ratios), v.get("bytes", 0), n

        sel.closest = min(sel.over_limits, key=misfit)
        limits = " and ".join(x for x in (max_bytes is not None and f"--max-bytes {max_bytes:,}",
                                          max_rss_mb is not None and f"--max-rss-mb {max_rss_mb:g}") if x)
        sel.why_none = (f"no variant within budget fits {limits}: "
                        f"the smallest, {sel.closest}, has {_limit_parts(variants[sel.closest], max_bytes, max_rss_mb)}; "
                        "raise the "
                        "limit, or make a smaller variant (onnxpipe quantize, onnxpipe distill)")
    elif sel.selected is None:
        sel.why_none = "no ONNX variant may be selected: " + "; ".join(f"{v}: {why}" for v, why in sel.excluded.items())
    return sel


def best_setting(timed: dict[str, dict[str, float]], settings: dict[str, SessionSetting], objective: str = "geomean",
                 *, margin: float = NEAR_TIE) -> tuple[str, dict[str, str]]:
    """(the chosen setting's key, {batch: the fastest setting's key at that batch}) from recorded p50s.

    `timed[key][batch]` = p50 ms of one variant at one session setting (`settings[key]`). The chosen
    setting has the lowest score (`score`, the same objective as the variant choice) among those within
    `margin` of the fastest, taking the cheapest (SessionSetting.cost: fewer threads, sequential, no spin)
    so that noise between near-equal settings never buys threads for nothing."""
    scored = {k: score(t, objective) for k, t in timed.items() if t}
    if not scored:
        raise ValueError("no timed setting to choose from")

    def cheapest_near_fastest(ms: dict[str, float]) -> str:
        low = min(ms.values())
        return min((k for k, v in ms.items() if v <= low * (1 + margin)), key=lambda k: (settings[k].cost, ms[k], k))

    batches = sorted({b for t in timed.values() for b in t}, key=int)
    per_batch = {b: cheapest_near_fastest({k: t[b] for k, t in timed.items() if b in t}) for b in batches}
    return cheapest_near_fastest(scored), per_batch


# --- verdicts from the manifest -------------------------------------------------------------------------

def verdict(run: Run, variant: str, _seen: frozenset = frozenset()) -> tuple[bool, str]:
    """(may take part, why not): a passing check against the parent, no failing check, and the same
    for every ancestor. The root (no parent) is the reference itself."""
    art = run.artifact(variant)
    if art.parent is None:
        return True, ""
    entries = run.parity(candidate=variant)
    failing = [p for p in entries if not p["passed"]]
    if failing:
        p = failing[0]
        return False, f"failed its {p['rule']} check against {p['reference']}"
    if not any(p["reference"] == art.parent for p in entries):
        return False, f"no verdict against its parent {art.parent}: run `onnxpipe verify`"
    if art.parent in _seen or not run.has(art.parent):
        return True, ""
    ok, why = verdict(run, art.parent, _seen | {variant})
    return (True, "") if ok else (False, f"its parent {art.parent} is not eligible ({why})")


def branch_speedup(run: Run, branch: str) -> dict:
    """Per timed batch size: the teacher's fastest ONNX variant (lineage through no other torch variant than
    the root), the fastest variant of `branch` (a torch variant such as `student` or `pruned`, and the ONNX
    variants made from it) eligible for `selected` (within budget, passing its checks), and the speedup;
    from the select stage's recorded timings."""
    timed = {v: run.metrics(v)["latency_ms"] for v in run.variants()
             if run.artifact(v).format == "onnx" and run.metrics(v).get("latency_ms")}

    def torch_ancestors(v: str) -> list[str]:
        chain = run.lineage(v)
        return [a for a in chain[:-1] if run.artifact(a).format == "torch"]

    teacher = [v for v in timed if not torch_ancestors(v)]
    ours = [v for v in timed if branch in run.lineage(v) and verdict(run, v)[0]]
    out = {}
    for b in sorted({b for lat in timed.values() for b in lat}, key=int):
        t = min((v for v in teacher if b in timed[v]), key=lambda v: timed[v][b], default=None)
        s_ = min((v for v in ours if b in timed[v]), key=lambda v: timed[v][b], default=None)
        out[b] = {"teacher_best": t, "teacher_ms": timed[t][b] if t else None,
                  f"{branch}_best": s_, f"{branch}_ms": timed[s_][b] if s_ else None,
                  "speedup": timed[t][b] / timed[s_][b] if t and s_ else None}
    return out


# --- timing on this machine -----------------------------------------------------------------------------

def machine_record(chosen: SessionSetting, swept: list[str]) -> dict:
    """The CPU features and ORT session settings that the timings depend on: the selected variant's
    chosen setting, and every setting that was timed."""
    import onnxruntime as ort

    from ..core.cpu import cpu_features
    from ..core.timing import usable_cores

    return {
        "cpu": cpu_features(),
        "usable_cores": usable_cores(),
        "onnxruntime": {
            "version": ort.__version__,
            "providers": ["CPUExecutionProvider"],
            "intra_op_num_threads": chosen.threads,
            "inter_op_num_threads": chosen.threads if chosen.execution_mode == "parallel" else 1,
            "execution_mode": chosen.execution_mode,
            "allow_spinning": chosen.spinning,   # while timing the variants: off (sessions take turns on the cores)
            "graph_optimization_level": "all",   # applied at load; saved files stay portable
            "settings_timed": swept,
        },
    }


def input_signature(run: Run, variant: str) -> tuple:
    """What the variant's inputs look like (name, per-sample shape, dtype): variants alike are timed together."""
    specs = run.spec_of(variant).input_specs(run.model_config_of(variant))
    return tuple((s.name, tuple(s.shape), s.dtype) for s in specs)


def example_batches(run: Run, variant: str, batches) -> dict[int, list[np.ndarray]]:
    """Random inputs of the variant's own network at its trained shape, per batch size."""
    spec, cfg = run.spec_of(variant), run.model_config_of(variant)
    return {b: [np.ascontiguousarray(t.numpy()) for t in spec.example_inputs(cfg, batch=b).values()] for b in batches}


def candidate_settings(run: Run, names: list[str], cfg: SelectConfig) -> dict[str, list[SessionSetting]]:
    """{variant: the session settings to time}: every thread count of the sweep (or the one asked for),
    sequential, not spinning; plus the parallel execution mode at each count above 1 where the graph has
    independent compute branches (onnxgraph.parallel_branches)."""
    import onnx

    from ..core.onnxgraph import parallel_branches

    counts = (cfg.threads,) if cfg.threads is not None else thread_candidates()
    out = {}
    for v in names:
        graph = onnx.load(str(run.path(v)), load_external_data=False).graph
        branches = parallel_branches(graph) > 1
        out[v] = [SessionSetting(t) for t in counts] + [SessionSetting(t, "parallel") for t in counts
                                                        if branches and t > 1]
    return out


def time_variants(run: Run, settings: dict[str, list[SessionSetting]], cfg: SelectConfig
                  ) -> dict[str, dict[str, dict[str, object]]]:
    """{variant: {setting key: {batch (str): Latency}}} for ONNX variants, every variant at every one of
    its settings interleaved in the same rounds per batch size.

    Variants of one input signature are timed in the same rounds; a student of another model (other
    inputs) gets its own rounds."""
    # Spinning off: the sessions take turns on the same cores, and an idle session's busy-waiting
    # threads would otherwise slow whichever variant runs next.
    names = list(settings)
    groups: dict[tuple, list[str]] = {}
    for v in names:
        groups.setdefault(input_signature(run, v), []).append(v)
    out: dict[str, dict[str, dict[str, object]]] = {v: {s.key: {} for s in settings[v]} for v in names}
    for members in groups.values():
        fns = {(v, s.key): load_predictor(run, v, device="cpu", threads=s.threads, spinning=False,
                                          execution_mode=s.execution_mode)
               for v in members for s in settings[v]}
        inputs = example_batches(run, members[0], cfg.batches)
        lat = time_predictors({f"{v}@{k}": f for (v, k), f in fns.items()}, inputs, warmup=cfg.warmup, runs=cfg.runs,
                              min_seconds=cfg.min_seconds, block=TIMING_BLOCK)
        for b, per_candidate in lat.items():
            for (v, k) in fns:
                out[v][k][str(b)] = per_candidate[f"{v}@{k}"]
        del fns
    return out


SPIN_BLOCK = 6   # spinning on vs off, back-to-back calls per round: the first absorbs the other's idle spin


def time_spinning(run: Run, variant: str, setting: SessionSetting, cfg: SelectConfig) -> dict[str, dict[str, float]]:
    """{"no-spin" | "spin": {batch: p50 ms}} for one variant at one setting, the two sessions taking turns
    in blocks (a spinning session cannot be interleaved call by call: its idle threads hold the cores)."""
    fns = {name: load_predictor(run, variant, device="cpu", threads=setting.threads, spinning=spin,
                                execution_mode=setting.execution_mode)
           for name, spin in (("no-spin", False), ("spin", True))}
    lat = time_predictors(fns, example_batches(run, variant, cfg.batches), warmup=cfg.warmup, runs=cfg.runs,
                          min_seconds=cfg.min_seconds, block=SPIN_BLOCK)
    return {name: {str(b): lat[b][name].p50 for b in lat} for name in fns}


def row_independence(run: Run, names: list[str]) -> dict[str, tuple[bool, float]]:
    """{variant: (rows independent, how far row 0 moved)}: whether a variant may be batched across callers."""
    from ..core.parity import rows_are_independent
    from ..core.policy import POLICY

    out = {}
    for v in names:
        fn = load_predictor(run, v, device="cpu")
        out[v] = rows_are_independent(fn, example_batches(run, v, (8,))[8], POLICY.tensor)
    return out


EDGE_ROWS, EDGE_THREADS = 1, 1     # the memory an edge deployment pays: one row at a time, one thread


def edge_memory(run: Run, names: list[str]) -> dict[str, dict]:
    """{variant: memory record}: peak RSS of a fresh process that loads the variant and runs one row on one
    thread; a record measured on the same file (sha256) is reused, the others are measured now."""
    import tempfile
    from pathlib import Path

    from ..core.memprobe import measure_in_fresh_process

    out = {}
    with tempfile.TemporaryDirectory(prefix="onnxpipe-select-") as tmp:
        for v in names:
            rec = run.metrics(v).get("edge_memory")
            if not (isinstance(rec, dict) and rec.get("sha256") == run.artifact(v).sha256):
                probe = measure_in_fresh_process(run.root, v, example_batches(run, v, (EDGE_ROWS,))[EDGE_ROWS],
                                                 threads=EDGE_THREADS, device="cpu", tmp=Path(tmp))
                rec = {"peak_rss_mb": probe["peak_rss_mb"], "import_rss_mb": probe["import_rss_mb"], "rows": EDGE_ROWS,
                       "threads": EDGE_THREADS, "sha256": run.artifact(v).sha256}
            out[v] = rec
    return out


def select(run: Run, cfg: SelectConfig, data=None, *, log_line=None) -> "Selection":
    """Time the run's ONNX variants at each session setting, choose the variant with its best setting,
    and record timings, settings, marks and the choice in the manifest."""
    say = log_line or (lambda msg: None)
    names = [v for v in run.variants() if run.artifact(v).format == "onnx"]
    if not names:
        raise ArtifactError(f"run {run.root} has no ONNX variant to select from; run `onnxpipe export` first")
    settings = candidate_settings(run, names, cfg)
    keyed = {v: {s.key: s for s in settings[v]} for v in names}
    say(f"timing {len(names)} variant(s) at {len({s.key for ss in settings.values() for s in ss})} session setting(s) "
        f"(threads {', '.join(str(t) for t in sorted({s.threads for ss in settings.values() for s in ss}))}), "
        f"batches {', '.join(map(str, cfg.batches))}")
    timings = time_variants(run, settings, cfg)
    table, chosen, per_batch = {}, {}, {}
    for v in names:
        art = run.artifact(v)
        ok, why = verdict(run, v)
        p50 = {k: {b: lat.p50 for b, lat in per.items()} for k, per in timings[v].items()}
        chosen[v], per_batch[v] = best_setting(p50, keyed[v], cfg.objective)
        table[v] = {"latency_ms": p50[chosen[v]], "eligible": ok, "why": why,
                    "parent": art.parent, "lossy": art.lossy, "bytes": art.bytes}
    memory = edge_memory(run, [v for v in names if table[v]["eligible"]]) if cfg.max_rss_mb is not None else {}
    for v, rec in memory.items():
        table[v]["peak_rss_mb"] = rec["peak_rss_mb"]
    sel = choose(table, cfg.objective, max_bytes=cfg.max_bytes, max_rss_mb=cfg.max_rss_mb)
    if memory:
        with run.batch():
            for v, rec in memory.items():
                run.set_metrics(v, edge_memory=rec)
    if sel.selected is None:
        raise ArtifactError(sel.why_none)
    # spinning on or off, for the selected variant alone at its chosen setting
    base = keyed[sel.selected][chosen[sel.selected]]
    spin = time_spinning(run, sel.selected, base, cfg)
    spin_on = best_setting(spin, {"no-spin": base, "spin": SessionSetting(base.threads, base.execution_mode, True)},
                           cfg.objective)[0] == "spin"
    final = SessionSetting(base.threads, base.execution_mode, spin_on)
    say(f"selected {sel.selected} at {final.key} (timed: " + ", ".join(
        f"{k} {score(table_v, cfg.objective):.3f} ms" for k, table_v in
        ((k, {b: lat.p50 for b, lat in per.items()}) for k, per in timings[sel.selected].items())) + ")")
    rows = row_independence(run, names)
    notes = []
    if not rows[sel.selected][0]:
        notes.append(f"{sel.selected} computes over the whole batch (row 0's logits moved by "
                     f"{rows[sel.selected][1]:.3g} when the other rows changed: dynamic INT8 quantizes activations "
                     "per call), so `onnxpipe serve` runs each caller's request alone instead of batching callers")
        log.warning(notes[-1])
    with run.batch():
        for v in names:
            setting = final if v == sel.selected else keyed[v][chosen[v]]
            values = {"latency_ms": table[v]["latency_ms"],
                      "latency_detail": {b: lat.to_json() for b, lat in timings[v][chosen[v]].items()},
                      "session_setting": setting.to_json(),
                      "settings_timed": {k: {b: lat.p50 for b, lat in per.items()} for k, per in timings[v].items()},
                      "best_setting_by_batch": {b: keyed[v][k].to_json() for b, k in per_batch[v].items()},
                      "row_independent": rows[v][0], "row_dependence_max_abs": rows[v][1]}
            if table[v]["lossy"] and run.has(table[v]["parent"] or "") and table[v]["parent"] in table:
                values["slower_than_parent"] = v in sel.slower_than_parent
            run.set_metrics(v, **values)
        run.set_section("machine", machine_record(final, sorted({s.key for ss in settings.values() for s in ss})))
        run.set_selected(sel.selected, selection={
            **sel.to_json(), "objective": cfg.objective, "batches": [str(b) for b in cfg.batches],
            "session_setting": final.to_json(), "spinning_ms": spin,
            "timing": {"method": f"interleaved rounds, blocks of {TIMING_BLOCK} (first untimed), p50; every variant "
                                 f"at every session setting in the same rounds; spinning on/off for the selected "
                                 f"variant alone, blocks of {SPIN_BLOCK}",
                       "warmup": cfg.warmup, "runs": cfg.runs, "min_seconds": cfg.min_seconds,
                       "inputs": "random, trained shape", "near_tie": NEAR_TIE},
            "row_independent": rows[sel.selected][0], "notes": notes,
            "limits": {"max_bytes": cfg.max_bytes, "max_rss_mb": cfg.max_rss_mb,
                       "memory": f"fresh process, {EDGE_ROWS} row, {EDGE_THREADS} thread" if memory else None}})
    return sel
