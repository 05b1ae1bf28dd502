"""Live parity: a sampled fraction of real requests also runs on the served variant's FP32 parent.

The served answer is never delayed: after the batcher has the outputs, `offer` draws the sample and
hands inputs and outputs to one worker thread with its own single-threaded ONNX Runtime session
of the parent; when that worker is busy the sample is skipped (and counted). Each shadowed row is
judged by the rule verify used for this step:

- a lossy variant (INT8, FP16, a student's children): its top-1 class equals the parent's, held to
  the budget recorded along its lineage (`min_agreement`, the same number as the self-test's);
- a lossless variant (an optimized graph): every output element within the tensor tolerance,
  held to 1.0 (every row).

The rolling agreement over the last `window` rows and the largest |served - parent| difference go
to /metrics per model and version. When the agreement falls below the budget (judged once the
window holds at least min(window, 50) rows) the model's metadata says "below budget" and the log
warns; readiness does not change (README, "Live parity"): the variant passed its self-test, and
what moved is the traffic, which taking the model out of rotation would not fix.
"""
from __future__ import annotations

import logging
import random
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..core.policy import POLICY
from ..core.runtime import make_session
from ..errors import ConfigError
from ..runfolder import Run

log = logging.getLogger("onnxpipe.serve")

MAX_PENDING = 4       # shadow jobs waiting or running; beyond this a sample is skipped


def fp32_parent(run: Run, variant: str) -> str:
    """The nearest ancestor of `variant` that is an FP32 ONNX graph (not made by a lossy step)."""
    for v in run.lineage(variant)[1:]:
        art = run.artifact(v)
        if art.format == "onnx" and not art.lossy:
            return v
    raise ConfigError(f"variant {variant!r} has no FP32 ONNX ancestor to shadow against (its lineage is "
                      f"{' <- '.join(run.lineage(variant))}); --shadow-rate needs a compressed or optimized variant")


class Shadow:
    def __init__(self, run: Run, variant: str, *, rate: float, window: int, metrics=None,
                 labels: tuple[str, str] = ("", "")):
        self.variant, self.rate, self.window = variant, rate, window
        self.parent = fp32_parent(run, variant)
        self.lossy = run.is_lossy(self.parent, variant)
        self.tolerance = POLICY.tensor
        self.budget = POLICY.budget_between(run, self.parent, variant).min_agreement if self.lossy else 1.0
        self.rule = "top-1 agreement" if self.lossy else "tensor tolerance"
        # the parent's file is sha256-checked like the served one; one thread, no spinning: it must stay light
        self.session = make_session(run.path(self.parent), device="cpu", threads=1, spinning=False)
        self.input_names = [i.name for i in self.session.inner.get_inputs()]
        self.metrics, self.labels = metrics, labels
        self.rows: deque[tuple[bool, float]] = deque(maxlen=window)
        self.total = 0
        self.below = False
        self._pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onnxpipe-shadow")
        if metrics is not None:
            metrics.shadow_budget.set(self.budget, *labels)
        log.info("shadow on: %.3g of %s %s requests also run on its FP32 parent %s (%s, budget %g)", rate,
                 labels[0], variant, self.parent, self.rule, self.budget)

    @property
    def min_rows(self) -> int:
        return min(self.window, 50)

    def offer(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        """On the event loop, after the answer is known: maybe queue a comparison. Never blocks."""
        if random.random() >= self.rate:
            return
        with self._lock:
            if self._pending >= MAX_PENDING:
                if self.metrics is not None:
                    self.metrics.shadow_skipped.inc(*self.labels)
                return
            self._pending += 1
        self._pool.submit(self._compare, inputs, outputs[0])

    def _compare(self, inputs: list[np.ndarray], served: np.ndarray) -> None:
        try:
            ref = np.asarray(self.session.inner.run(None, dict(zip(self.input_names, inputs)))[0], np.float64)
            got = np.asarray(served, np.float64)
            diff = np.abs(ref - got).reshape(len(ref), -1)
            row_max = diff.max(axis=1)
            if self.lossy:
                ok = ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)
            else:
                ok = (diff <= self.tolerance.atol + self.tolerance.rtol * np.abs(ref).reshape(len(ref), -1)).all(1)
            self._record(ok, row_max)
        except Exception as e:  # a comparison that cannot run must not hurt serving; it is logged
            log.warning("shadow comparison for %s failed: %s", self.variant, str(e).splitlines()[0][:300])
        finally:
            with self._lock:
                self._pending -= 1

    def _record(self, ok: np.ndarray, row_max: np.ndarray) -> None:
        with self._lock:
            self.rows.extend(zip(ok.tolist(), row_max.tolist()))
            self.total += len(ok)
            agreement, max_abs = self._stats()
        if self.metrics is not None:
            m, labels = self.metrics, self.labels
            m.shadow_rows.inc(*labels, by=len(ok))
            m.shadow_agree.inc(*labels, by=int(ok.sum()))
            m.shadow_agreement.set(agreement, *labels)
            m.shadow_max_abs.set(max_abs, *labels)
            m.shadow_within.set(0 if self._judged_below(agreement) else 1, *labels)
        below = self._judged_below(agreement)
        if below and not self.below:
            log.warning("model %s version %s (variant %s): live agreement with its FP32 parent %s is %.3f over the "
                        "last %d rows, below its budget %g (%s); the model stays ready: check the traffic and the "
                        "variant (README, 'Live parity')", *self.labels, self.variant, self.parent, agreement,
                        len(self.rows), self.budget, self.rule)
        elif self.below and not below:
            log.info("model %s version %s: live agreement with %s is back within budget (%.3f >= %g)", *self.labels,
                     self.parent, agreement, self.budget)
        self.below = below

    def _stats(self) -> tuple[float, float]:
        if not self.rows:
            return 1.0, 0.0
        return sum(ok for ok, _ in self.rows) / len(self.rows), max(m for _, m in self.rows)

    def _judged_below(self, agreement: float) -> bool:
        return len(self.rows) >= self.min_rows and agreement < self.budget

    def status(self) -> dict:
        with self._lock:
            agreement, max_abs = self._stats()
            rows = len(self.rows)
        state = "warming up" if rows < self.min_rows else ("below budget" if agreement < self.budget else "within budget")
        return {"parent": self.parent, "rate": self.rate, "rule": self.rule, "budget": self.budget, "window": self.window,
                "rows": rows, "rows_total": self.total, "agreement": agreement, "max_abs": max_abs, "status": state}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
