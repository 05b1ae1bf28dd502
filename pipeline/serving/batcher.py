"""Dynamic batching: concurrent requests become one ONNX Runtime call, on a worker thread.

The event loop only parses requests and enqueues them; one worker thread forms batches and runs
the model (ORT releases the GIL, so the loop keeps accepting while it runs). Policy:

- the worker takes the oldest request and every queued request with the same per-row shapes
  (sequence models: same length) while the batch has at most `max_batch` rows;
- it waits for more, up to `max_delay` after the batch started, only while other requests are
  already being received (`arriving`), so a lone request runs at once and adds no delay;
- a request larger than `max_batch` runs alone, in one call;
- if a merged call fails, each request is retried alone, so one bad request cannot fail others.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger("onnxpipe.serve")

RunBatch = Callable[[list[np.ndarray]], list[np.ndarray]]


class InferenceError(Exception):
    """ONNX Runtime failed on a request: the client gets a 500 with this message."""


@dataclass
class _Pending:
    inputs: list[np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


def _resolve(future: asyncio.Future, value, error: BaseException | None) -> None:
    if future.done():  # the client went away and its handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int = 32, max_delay_s: float = 0.002, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._arriving = 0
        self._collecting = False   # the worker is waiting for arrivals to join a batch
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="onnxpipe-batcher", daemon=True)

    # --- event-loop side -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def arriving(self) -> "_Arrival":
        """Context for a request being received: the worker may wait a little for it to join a batch."""
        return _Arrival(self)

    async def submit(self, inputs: list[np.ndarray], arrival: "_Arrival | None" = None) -> list[np.ndarray]:
        """Queue one request (arrays with a batch axis first) and wait for its rows of every output.
        `arrival` (from `arriving()`) ends in the same step, so the worker never sees the request in neither place."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = tuple((a.shape[1:], a.dtype.str) for a in inputs)
        pending = _Pending(inputs, int(inputs[0].shape[0]), key, future, loop)
        with self._cond:
            if self._stopping:
                raise InferenceError("the server is shutting down")
            self._queue.append(pending)
            if arrival is not None:
                arrival.close_locked()
            self._depth_changed()
            self._wake_locked()
        return await future

    # --- worker side ---------------------------------------------------------------------------------
    def _wake_locked(self) -> None:
        """Wake the worker when it can act: it is idle, or it is collecting a batch and nothing more is
        arriving. Waking it for every arrival while it collects would only trade the GIL back and forth."""
        if not self._collecting or self._arriving == 0:
            self._cond.notify()

    def _depth_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _take(self) -> list[_Pending] | None:
        """The next batch, or None when stopping with nothing left. Called with the lock held."""
        while not self._queue:
            if self._stopping:
                return None
            self._cond.wait()
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_batch:
            kept: deque[_Pending] = deque()
            while self._queue:
                p = self._queue.popleft()
                if p.key == first.key and rows + p.rows <= self.max_batch:
                    batch.append(p)
                    rows += p.rows
                else:
                    kept.append(p)
            self._queue = kept
            remaining = deadline - time.perf_counter()
            if rows >= self.max_batch or self._arriving == 0 or remaining <= 0 or self._stopping:
                break
            self._collecting = True
            self._cond.wait(remaining)
            self._collecting = False
        self._depth_changed()
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        inputs = (batch[0].inputs if len(batch) == 1 else
                  [np.concatenate([p.inputs[i] for p in batch]) for i in range(len(batch[0].inputs))])
        rows = sum(p.rows for p in batch)
        t0 = time.perf_counter()
        try:
            outputs = self.run_batch(inputs)
            bad = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != rows]
            if bad:
                raise InferenceError(f"the model returned outputs shaped {bad} for a batch of {rows} rows")
        except Exception as e:  # ORT's own error types; each caller gets a 500 with the message
            if len(batch) > 1:
                for p in batch:  # isolate: only the request that breaks the model should fail
                    self._run([p])
                return
            msg = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
            log.error("inference failed on a request of %d rows: %s", rows, msg)
            self._deliver(batch[0], None, InferenceError(f"inference failed in ONNX Runtime: {msg}"))
            return
        if self.metrics is not None:
            self.metrics.batch_rows.observe(rows)
            self.metrics.inference_seconds.observe(time.perf_counter() - t0)
        start = 0
        for p in batch:
            self._deliver(p, [o[start:start + p.rows] for o in outputs], None)
            start += p.rows

    @staticmethod
    def _deliver(p: _Pending, value, error: BaseException | None) -> None:
        try:
            p.loop.call_soon_threadsafe(_resolve, p.future, value, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.warning("dropped a result: the event loop has closed")


class _Arrival:
    def __init__(self, batcher: DynamicBatcher):
        self.batcher = batcher
        self.open = False

    def close_locked(self) -> None:
        if self.open:
            self.open = False
            self.batcher._arriving -= 1

    def __enter__(self) -> "_Arrival":
        with self.batcher._cond:
            self.batcher._arriving += 1
            self.open = True
        return self

    def __exit__(self, *exc) -> bool:
        with self.batcher._cond:
            if self.open:  # the request failed before it was queued
                self.close_locked()
                self.batcher._wake_locked()
        return False
