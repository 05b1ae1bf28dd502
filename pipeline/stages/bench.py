"""Bench stage: every variant of a run side by side, with PyTorch eager as the reference.

For each thread count and batch size, all variants are timed interleaved (A B C A B C ..., see
pipeline.timing) with ORT thread pools not spinning between calls, so that noise and the cores hit
every variant alike; each cell is the median (and p90 / p99) of its own runs, never a best-of.

Per variant the manifest gets metrics[v]["bench"]:

    bytes, accuracy (from the manifest), flops (per row, pipeline.flops), peak_rss_mb / import_rss_mb
    (a fresh process loading and running the variant, pipeline.memprobe), and
    latency[threads][batch] = {p50_ms, p90_ms, p99_ms, mean_ms, std_ms, runs, throughput_rows_s,
        speedup_vs_torch, gflops, fraction_of_peak, compute_floor_ms, overhead_ms, limit}

and manifest["bench"] holds the settings, the machine and its measured limits (pipeline.peak).
`limit` says which floor is higher for that cell: "compute" (work / peak) or "overhead" (one near-empty
call); a batch-1 latency far above both is neither machine limit but the runtime's own inefficiency."""
from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..runfolder import Run
from ..core.runtime import physical_cores
from ..core.timing import time_interleaved

REFERENCE = "torch"


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 64)
    threads: tuple[int, ...] | None = None   # None: 1 and every usable core
    device: str = "cpu"
    warmup: int = 5
    runs: int = 30
    min_seconds: float = 0.0                 # keep adding rounds until this long (for very fast cells)
    block: int = 3                           # calls per variant per round; the first re-warms caches, untimed
    memory: bool = True                      # peak RSS of a fresh process per variant
    variants: tuple[str, ...] | None = None  # None: every variant of the run (torch is always included)

    def __post_init__(self):
        for name in ("batches", "threads", "variants"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))  # lists from a config file
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise ConfigError(f"thread counts must be >= 1, got {list(self.threads)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"bench device must be cpu or cuda, got {self.device!r}")
        if self.warmup < 0 or self.runs < 1 or self.block < 1:
            raise ConfigError(f"need warmup >= 0, runs >= 1 and block >= 1, got warmup={self.warmup}, "
                              f"runs={self.runs}, block={self.block}")

    def thread_counts(self) -> tuple[int, ...]:
        return self.threads or tuple(sorted({1, physical_cores()}))


TORCH_EMPTY = "@torch_empty_call"


def _torch_empty_call() -> Callable[[], object]:
    """A near-empty torch module called the way a torch variant's predictor calls its model."""
    import torch

    module = torch.nn.Linear(1, 1).eval()
    x = np.zeros((1, 1), np.float32)

    def call():
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return call


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


def bench(run: Run, cfg: BenchConfig, *, log: Callable[[str], None] | None = None) -> dict:
    """Measure every variant; write metrics[v]["bench"] and manifest["bench"]; return manifest["bench"]."""
    from ..core.flops import count_variant_flops
    from ..core.memprobe import measure_in_fresh_process
    from ..core.peak import EMPTY, limit_probes, machine_info, peak_for, peak_from
    from ..core.predictors import load_predictor

    say = log or (lambda msg: None)
    variants = list(cfg.variants or run.variants())
    unknown = [v for v in variants if not run.has(v)]
    if unknown:
        raise ConfigError(f"run {run.root} has no variant(s) {', '.join(unknown)} (it has: {', '.join(run.variants())})")
    if run.has(REFERENCE) and REFERENCE not in variants:
        variants.insert(0, REFERENCE)
    spec, model_cfg = run.spec, run.model_config()
    inputs = {b: [t.numpy() for t in spec.example_inputs(model_cfg, batch=b)] for b in cfg.batches}
    flops = {v: count_variant_flops(run, v) for v in variants}

    import torch  # torch variants and the reference share the process-wide intra-op pool

    saved_threads = torch.get_num_threads()
    load_before = _load_average()
    latency: dict[str, dict[str, dict[str, dict]]] = {v: {} for v in variants}
    limits: dict[str, dict] = {}
    providers: dict[str, list[str]] = {}
    try:
        for threads in cfg.thread_counts():
            say(f"machine limits at {threads} thread(s): matmul sizes where the kernels peak (scanned once per process)")
            scan = peak_for(threads, cfg.device)
            probes = limit_probes(threads, device=cfg.device, fp32_sizes=(scan.fp32_size,),
                                  int8_sizes=(scan.int8_size,) if scan.int8_size else ())
            torch.set_num_threads(threads)
            fns = {}
            for v in variants:
                device = "cpu" if run.artifact(v).format == "torch" else cfg.device  # torch is the CPU build here
                fns[v] = load_predictor(run, v, device=device, threads=threads, spinning=False)
                providers[v] = list(getattr(fns[v], "providers", ["torch eager (CPU)"]))
            limits[str(threads)] = {"scan": scan.to_json(), "by_batch": {}}
            for batch in cfg.batches:
                say(f"timing {len(variants)} variants and the machine's limits at batch {batch}, {threads} thread(s)")
                x = inputs[batch]
                calls = {v: (lambda f=fns[v]: f(*x)) for v in variants}
                # The limits are timed in the same rounds, so a fraction of peak is a side-by-side ratio.
                calls.update({name: p.call for name, p in probes.items()})
                calls[TORCH_EMPTY] = _torch_empty_call()
                lats = time_interleaved(calls, batch=batch, warmup=cfg.warmup, runs=cfg.runs,
                                        min_seconds=cfg.min_seconds, block=cfg.block)
                peak = peak_from(lats, probes, threads, cfg.device)
                torch_overhead = lats[TORCH_EMPTY].p50
                limits[str(threads)]["by_batch"][str(batch)] = {
                    "fp32_gflops": peak.fp32_gflops, "int8_gops": peak.int8_gops, "overhead_ms": peak.overhead_ms,
                    "torch_overhead_ms": torch_overhead, "fp32_size": peak.fp32_size, "int8_size": peak.int8_size}
                ref = lats[REFERENCE].p50 if REFERENCE in variants else None
                for v in variants:
                    overhead = torch_overhead if run.artifact(v).format == "torch" else lats[EMPTY].p50
                    latency[v].setdefault(str(threads), {})[str(batch)] = _cell(lats[v], flops[v], peak, overhead, ref)
            del fns, probes
    finally:
        torch.set_num_threads(saved_threads)

    memory: dict[str, dict] = {}
    if cfg.memory:
        with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-") as tmp:
            biggest = max(cfg.batches)
            for v in variants:
                say(f"peak memory of a fresh process running {v}")
                device = "cpu" if run.artifact(v).format == "torch" else cfg.device
                memory[v] = measure_in_fresh_process(run.root, v, inputs[biggest], threads=max(cfg.thread_counts()),
                                                     device=device, tmp=Path(tmp))

    for v in variants:
        art = run.artifact(v)
        run.set_metrics(v, save=False, bench={
            "providers": providers.get(v), "bytes": art.bytes, "accuracy": run.metrics(v).get("accuracy"),
            "flops": flops[v].to_json() if flops[v] else None,
            "peak_rss_mb": memory.get(v, {}).get("peak_rss_mb"), "import_rss_mb": memory.get(v, {}).get("import_rss_mb"),
            "latency": latency[v],
        })
    run.manifest["bench"] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(cfg) | {"threads": list(cfg.thread_counts()), "batches": list(cfg.batches)},
        "variants": variants, "machine": machine_info(), "limits": limits,
        # Other processes' load: a multi-thread cell on cores that were busy says more about them than the model.
        "load_average": {"before": load_before, "after": _load_average()},
        "method": "interleaved rounds, warm-up discarded, monotonic clock, ORT spinning off; median per cell",
    }
    run.save()
    return run.manifest["bench"]


def bench_rows(run: Run) -> list[dict]:
    """One row per (variant, threads, batch) from the manifest's bench metrics (for tables and the report)."""
    rows = []
    info = run.manifest.get("bench") or {}
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
                    "selected": run.manifest.get("selected") == v,
                })
    return rows
