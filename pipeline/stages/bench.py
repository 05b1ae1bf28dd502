"""Bench stage: every variant of a run side by side, with PyTorch eager as the reference.

For each thread count and batch size, all variants are timed interleaved (A B C A B C ..., see
pipeline.timing) with ORT thread pools not spinning between calls, so that noise and the cores hit
every variant alike; each cell is the median (and p90 / p99) of its own runs, never a best-of.

Per variant the manifest gets metrics[v]["bench"]:

    bytes, accuracy (from the manifest), flops (per row, pipeline.flops), peak_rss_mb / import_rss_mb
    (a fresh process loading and running the variant, pipeline.memprobe), and
    latency[threads][batch] = {p50_ms, p90_ms, p99_ms, mean_ms, std_ms, runs, throughput_rows_s,
        speedup_vs_torch, gflops, fraction_of_peak, compute_floor_ms, overhead_ms, limit}
    profile[threads][batch] (the variants BenchConfig.profile names; default the selected one and torch):
        where the time goes, core/profile.py's summary (ONNX) or torch.profiler's op table (torch)

and manifest["bench"] holds the settings, the machine and its measured limits (pipeline.peak).
`limit` says which floor is higher for that cell: "compute" (work / peak) or "overhead" (one near-empty
call); a batch-1 latency far above both is neither machine limit but the runtime's own inefficiency."""
from __future__ import annotations

import datetime as _dt
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.predictors import load_predictor
from ..core.timing import time_predictors
from ..errors import ConfigError
from ..runfolder import Run
from .configs import BenchConfig
from .select import example_batches, input_signature

log = logging.getLogger("onnxpipe")

REFERENCE = "torch"


TORCH_EMPTY = "@torch_empty_call"


def _torch_empty_call(threads: int) -> Callable[[], object]:
    """A near-empty torch module called the way a torch variant's predictor calls its model."""
    import torch

    from ..core.predictors import torch_predictor

    fn = torch_predictor(torch.nn.Linear(1, 1), device="cpu", threads=threads)
    x = np.zeros((1, 1), np.float32)
    return lambda: fn(x)



def _warn(msg: str, say: Callable[[str], None]) -> None:
    """A step bench could not do as asked: a warning on the log and a line on the progress output."""
    log.warning(msg)
    say(msg)

def _torch_device(device: str, say: Callable[[str], None]) -> str:
    """torch eager runs on the bench device when torch has it; else on the CPU, printed and recorded."""
    if device != "cuda":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    _warn("this torch build has no CUDA: torch eager (the reference) is timed on the CPU; speedup_vs_torch "
          "compares across devices", say)
    return "cpu"


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    import os

    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cell(lat, flops, peak, overhead_ms: float, reference_p50: float | None) -> dict:
    cell = lat.to_json()
    cell["speedup_vs_torch"] = reference_p50 / lat.p50 if reference_p50 and lat.p50 > 0 else None
    cell["overhead_ms"] = overhead_ms
    if flops is not None and flops.total > 0 and lat.p50 > 0:
        work = flops.total * lat.batch
        peak_rate = peak.for_kind(flops.kind)
        cell["gflops"] = work / (lat.p50 / 1000.0) / 1e9
        cell["fraction_of_peak"] = cell["gflops"] / peak_rate if peak_rate else None
        cell["compute_floor_ms"] = work / (peak_rate * 1e9) * 1000.0 if peak_rate else None
        floor = cell["compute_floor_ms"] or 0.0
        cell["limit"] = "overhead" if overhead_ms > floor else "compute"
    else:
        cell.update(gflops=None, fraction_of_peak=None, compute_floor_ms=None, limit=None)
    return cell


def bench(run: Run, cfg: BenchConfig, data=None, *, log: Callable[[str], None] | None = None) -> dict:
    """Measure every variant; write metrics[v]["bench"] and the bench section; return the section."""
    from ..core.flops import count_variant_flops
    from ..core.memprobe import measure_in_fresh_process
    from ..core.peak import EMPTY, limit_probes, machine_info, peak_for, peak_from

    from ..core.runtime import resolve_providers

    say = log or (lambda msg: None)
    resolve_providers(cfg.device)  # a missing CUDA provider is an error before anything is measured
    torch_device = _torch_device(cfg.device, say)
    variants = list(cfg.variants or run.variants())
    unknown = [v for v in variants if not run.has(v)]
    if unknown:
        raise ConfigError(f"run {run.root} has no variant(s) {', '.join(unknown)} (it has: {', '.join(run.variants())})")
    if run.has(REFERENCE) and REFERENCE not in variants:
        variants.insert(0, REFERENCE)
    groups: dict[tuple, list[str]] = {}
    for v in variants:  # variants with the same inputs are timed in the same rounds
        groups.setdefault(input_signature(run, v), []).append(v)
    inputs = {sig: example_batches(run, members[0], cfg.batches) for sig, members in groups.items()}
    flops = {v: count_variant_flops(run, v) for v in variants}

    import torch  # torch predictors set the process-wide intra-op pool: restore it when done

    saved_threads = torch.get_num_threads()
    load_before = _load_average()
    latency: dict[str, dict[str, dict[str, dict]]] = {v: {} for v in variants}
    limits: dict[str, dict] = {}
    providers: dict[str, list[str]] = {}
    for threads in cfg.thread_counts():
        say(f"machine limits at {threads} thread(s): matmul sizes where the kernels peak (scanned once per process)")
        scan = peak_for(threads, cfg.device)
        probes = limit_probes(threads, device=cfg.device, fp32_sizes=(scan.fp32_size,),
                              int8_sizes=(scan.int8_size,) if scan.int8_size else ())
        # torch variants honour threads and device through the same predictor interface as ONNX ones
        fns = {v: load_predictor(run, v, device=torch_device if run.artifact(v).format == "torch" else cfg.device,
                                 threads=threads, spinning=False) for v in variants}
        providers.update({v: list(getattr(fn, "providers", [])) for v, fn in fns.items()})
        limits[str(threads)] = {"scan": scan.to_json(), "by_batch": {}}
        # The limits are timed in the same rounds, so a fraction of peak is a side-by-side ratio.
        extra = {name: p.call for name, p in probes.items()}
        extra[TORCH_EMPTY] = _torch_empty_call(threads)
        for sig, members in groups.items():
            say(f"timing {len(members)} variant(s) and the machine's limits at batches "
                f"{', '.join(map(str, cfg.batches))}, {threads} thread(s)")
            timed = time_predictors({v: fns[v] for v in members}, inputs[sig], warmup=cfg.warmup, runs=cfg.runs,
                                    min_seconds=cfg.min_seconds, block=cfg.block, extra=extra)
            for batch, lats in timed.items():
                peak = peak_from(lats, probes, threads, cfg.device)
                torch_overhead = lats[TORCH_EMPTY].p50
                limits[str(threads)]["by_batch"][str(batch)] = {
                    "fp32_gflops": peak.fp32_gflops, "int8_gops": peak.int8_gops, "overhead_ms": peak.overhead_ms,
                    "torch_overhead_ms": torch_overhead, "fp32_size": peak.fp32_size, "int8_size": peak.int8_size}
                ref = lats[REFERENCE].p50 if REFERENCE in members else None
                for v in members:
                    overhead = torch_overhead if run.artifact(v).format == "torch" else lats[EMPTY].p50
                    latency[v].setdefault(str(threads), {})[str(batch)] = _cell(lats[v], flops[v], peak, overhead, ref)
        del fns, probes

    profiles = profile_variants(run, cfg, groups, inputs, torch_device, say)
    torch.set_num_threads(saved_threads)

    memory: dict[str, dict] = {}
    if cfg.memory:
        with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-") as tmp:
            biggest = max(cfg.batches)
            for sig, members in groups.items():
                for v in members:
                    say(f"peak memory of a fresh process running {v}")
                    device = torch_device if run.artifact(v).format == "torch" else cfg.device
                    memory[v] = measure_in_fresh_process(run.root, v, inputs[sig][biggest],
                                                         threads=max(cfg.thread_counts()), device=device,
                                                         tmp=Path(tmp))

    section = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(cfg) | {"threads": list(cfg.thread_counts()), "batches": list(cfg.batches)},
        "variants": variants, "machine": machine_info(), "limits": limits,
        # Other processes' load: a multi-thread cell on cores that were busy says more about them than the model.
        "load_average": {"before": load_before, "after": _load_average()},
        "method": "interleaved rounds, warm-up discarded, monotonic clock, ORT spinning off; median per cell",
        "profiled": sorted(profiles),
    }
    with run.batch():
        for v in variants:
            art = run.artifact(v)
            run.set_metrics(v, bench={
                "providers": providers.get(v), "bytes": art.bytes, "accuracy": run.metrics(v).get("accuracy"),
                "flops": flops[v].to_json() if flops[v] else None,
                "peak_rss_mb": memory.get(v, {}).get("peak_rss_mb"),
                "import_rss_mb": memory.get(v, {}).get("import_rss_mb"),
                "latency": latency[v],
                **({"profile": profiles[v]} if v in profiles else {}),
            })
        run.set_section("bench", section)
    return section


def profile_variants(run: Run, cfg: BenchConfig, groups: dict[tuple, list[str]], inputs: dict, torch_device: str,
                     say: Callable[[str], None]) -> dict[str, dict]:
    """{variant: {threads: {batch: profile}}} (core/profile.py) for the variants `cfg.profile` names: ONNX
    Runtime's profiler for ONNX variants, torch.profiler's op table for torch eager. Each cell is profiled
    alone, after the interleaved timing, so the profiler's own cost never touches the timed numbers."""
    from ..core.profile import profile_session, profile_torch

    if cfg.profile == "none":
        return {}
    wanted = [v for members in groups.values() for v in members
              if cfg.profile == "all" or v in (run.selected, REFERENCE)]
    if cfg.device != "cpu":
        _warn(f"profiles are taken on the CPU only; bench --device {cfg.device} times {', '.join(wanted)} there "
              "but records no profile for them", say)
        return {}
    out: dict[str, dict] = {}
    for sig, members in groups.items():
        for v in (m for m in members if m in wanted):
            say(f"profiling {v} (where its time goes) at {', '.join(map(str, cfg.thread_counts()))} thread(s)")
            torch_kind = run.artifact(v).format == "torch"
            for threads in cfg.thread_counts():
                fn = load_predictor(run, v, device=torch_device, threads=threads) if torch_kind else None
                for batch in cfg.batches:
                    x = inputs[sig][batch]
                    prof = (profile_torch(fn, x, runs=max(3, cfg.profile_runs // 2)) if torch_kind else
                            profile_session(run.path(v), x, threads=threads, runs=cfg.profile_runs))
                    out.setdefault(v, {}).setdefault(str(threads), {})[str(batch)] = prof
    return out


def bench_rows(run: Run) -> list[dict]:
    """One row per (variant, threads, batch) from the manifest's bench metrics (for tables and the report)."""
    rows = []
    info = run.section("bench") or {}
    for v in info.get("variants", []):
        b = run.metrics(v).get("bench")
        if not b:
            continue
        for threads, per_batch in b["latency"].items():
            for batch, c in per_batch.items():
                rows.append({
                    "variant": v, "threads": int(threads), "batch": int(batch),
                    "p50_ms": c["p50_ms"], "p90_ms": c["p90_ms"], "p99_ms": c["p99_ms"],
                    "rows_s": c["throughput_rows_s"], "x_torch": c.get("speedup_vs_torch"),
                    "gflops": c.get("gflops"), "pct_peak": None if c.get("fraction_of_peak") is None else 100 * c["fraction_of_peak"],
                    "limit": c.get("limit"), "kind": (b.get("flops") or {}).get("kind"),
                    "flops_per_row": (b.get("flops") or {}).get("total"),
                    "size_kib": b["bytes"] / 1024, "rss_mb": b.get("peak_rss_mb"), "accuracy": b.get("accuracy"),
                    "selected": run.selected == v,
                })
    return rows
