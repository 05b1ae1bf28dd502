"""The one measurement path: the timing loop, the usable cores and the default thread count.

Used by select, bench, the serving self-check and every script in benchmarks/. Method: monotonic
clock, warm-up discarded, runs interleaved across candidates (A B C A B C ...) so that machine noise
hits all alike; percentiles and spread are reported, never the best run. Sessions being timed side
by side must not spin (ONNX Runtime's idle threads would steal the cores from the next candidate):
`load_predictor(..., spinning=False)`."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads(threads: int | None = None) -> int:
    """The intra-op thread count when none is asked for: every usable core (the one place this is decided)."""
    return threads if threads is not None else usable_cores()


def thread_candidates(limit: int | None = None) -> tuple[int, ...]:
    """The intra-op thread counts worth timing: 1, 2, 4, ... up to and including the usable cores (or `limit`)."""
    top = max(1, limit if limit is not None else usable_cores())
    out, t = [], 1
    while t < top:
        out.append(t)
        t *= 2
    return tuple(out + [top])


# A choice that costs more (more threads, spinning, a float block that makes the file bigger) must be more
# than this much faster to be taken: timings closer than that are noise on a shared machine.
NEAR_TIE = 0.03


@dataclass
class Latency:
    """Per-call latency statistics in milliseconds for one candidate at one batch size."""

    batch: int
    runs: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float

    @property
    def throughput(self) -> float:
        """Rows per second at the median latency."""
        return self.batch / (self.p50 / 1000.0) if self.p50 > 0 else float("inf")

    def to_json(self) -> dict:
        return {"batch": self.batch, "runs": self.runs, "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99,
                "mean_ms": self.mean, "std_ms": self.std, "throughput_rows_s": self.throughput}


def summarize(samples_ms: list[float] | np.ndarray, batch: int) -> Latency:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return Latency(batch=batch, runs=len(a), p50=float(p50), p90=float(p90), p99=float(p99),
                   mean=float(a.mean()), std=float(a.std()))


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, batch: int, warmup: int = 5, runs: int = 30,
                     min_seconds: float = 0.0, block: int = 1) -> dict[str, Latency]:
    """Time each zero-argument callable, interleaved round by round; returns Latency per name.

    `min_seconds` keeps adding rounds (beyond `runs`) until that much time has passed, for very fast calls.
    `block` > 1 runs each candidate that many times per round (A A A B B B ...): the first call of a block
    re-warms the caches the other candidates evicted and is not timed, the other block - 1 are. Use it to
    time the warm, back-to-back calls of a deployment while keeping the rounds interleaved."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.monotonic()
    rounds = 0
    while rounds < runs or (time.monotonic() - start) < min_seconds:
        for n in names:
            if block > 1:
                fns[n]()  # re-warm after the other candidates
            for _ in range(max(1, block - 1)):
                t0 = time.perf_counter()
                fns[n]()
                samples[n].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
        if rounds >= 100 * max(runs, 1):
            break
    return {n: summarize(samples[n], batch) for n in names}


def time_predictors(predictors: Mapping[str, Callable[..., object]], inputs: Mapping[int, Sequence[np.ndarray]], *,
                    warmup: int = 5, runs: int = 30, min_seconds: float = 0.0, block: int = 3,
                    extra: Mapping[str, Callable[[], object]] | None = None) -> dict[int, dict[str, Latency]]:
    """{batch: {name: Latency}}: every predictor called on `inputs[batch]`, interleaved per batch size,
    with the `extra` zero-argument calls (machine-limit probes) timed in the same rounds."""
    out: dict[int, dict[str, Latency]] = {}
    for batch, x in inputs.items():
        calls = {name: (lambda f=f, x=x: f(*x)) for name, f in predictors.items()}
        calls.update(extra or {})
        out[batch] = time_interleaved(calls, batch=batch, warmup=warmup, runs=runs, min_seconds=min_seconds,
                                      block=block)
    return out
