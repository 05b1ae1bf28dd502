"""Latency measurement shared by variant selection and `onnxpipe bench`.

Method: monotonic clock, warm-up discarded, runs interleaved across candidates (A B C A B C ...)
so that machine noise hits all alike; percentiles and spread are reported, never the best run."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np


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
