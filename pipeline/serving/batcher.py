"""Dynamic batching: concurrent requests become one ONNX Runtime call, run on a worker thread.

Batches are formed on the event loop (no locks: everything but the model call is loop-side), and
only the model call (concatenate + ORT, which releases the GIL) runs on one worker thread, so the
loop keeps accepting and parsing requests while the model runs. Policy:

- the next batch is the oldest request plus every queued request with the same per-row shapes
  (sequence models: same length), at most `max_batch` rows in all;
- it waits for more, up to `max_delay` after the batch started, only while other requests whose
  bodies have fully arrived are being decoded (`arriving`), so a lone request runs at once and a
  client that is slow to send its body delays nobody;
- requests that arrive while the model runs wait for the next batch (one model call at a time);
- a request larger than `max_batch` runs alone, in calls of at most `max_batch` rows whose outputs are
  put back together (so the model's working memory stays that of `max_batch` rows, whatever a request
  holds); a batch-dependent model (below) runs it in one call, as its answer must be its solo answer;
- a request whose caller stopped waiting (its deadline passed, or the client disconnected: its future
  is done) is dropped from the queue unrun;
- if a merged call fails, each request is retried alone, so one bad request cannot fail others;
- a model whose outputs for one row depend on the other rows of its batch (dynamic INT8: one activation
  scale per call; found by the load-time check in model.py) is never batched across callers
  (`merge_callers = False`): an answer depends only on its own request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int = 32, max_delay_s: float = 0.002, metrics=None,
                 labels: tuple[str, str] = ("", "")):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self.labels = labels        # (model, version) for the per-model metrics
        self._queue: deque[_Pending] = deque()
        self._arriving = 0
        self._wake: asyncio.Event | None = None
        self._busy = False          # a batch is being formed or run
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="onnxpipe-model")
        self.merge_callers = True   # False: every request is its own model call (a batch-dependent model)

    # --- lifecycle (on the event loop) ---------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="onnxpipe-batcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued or running, then end."""
        deadline = time.monotonic() + timeout
        while (self._queue or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    # --- requests ------------------------------------------------------------------------------------
    def arriving(self) -> "_Arrival":
        """Context for a request being received: the batcher may wait a little for it to join a batch."""
        return _Arrival(self)

    def enqueue(self, inputs: list[np.ndarray], arrival: "_Arrival | None" = None) -> asyncio.Future:
        """Queue one request (arrays with a batch axis first); the future gets its rows of every output.
        Cancel the future (or set its exception) to drop the request: a queued one is never run."""
        future = asyncio.get_running_loop().create_future()
        key = tuple((a.shape[1:], a.dtype.str) for a in inputs)
        self._queue.append(_Pending(inputs, int(inputs[0].shape[0]), key, future))
        if arrival is not None:
            arrival.close()
        self._wake.set()
        return future

    async def submit(self, inputs: list[np.ndarray], arrival: "_Arrival | None" = None) -> list[np.ndarray]:
        """Queue one request and wait for its outputs."""
        return await self.enqueue(inputs, arrival)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- the dispatcher ------------------------------------------------------------------------------
    def _fill(self, batch: list[_Pending], rows: int) -> int:
        """Move queued requests that fit (same key, row budget) into the batch; returns its rows."""
        if not self.merge_callers:
            return rows
        kept: deque[_Pending] = deque()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():  # its caller stopped waiting: drop it
                continue
            if p.key == batch[0].key and rows + p.rows <= self.max_batch:
                batch.append(p)
                rows += p.rows
            else:
                kept.append(p)
        self._queue = kept
        return rows

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._busy = False
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            self._busy = True
            first = self._queue.popleft()
            if first.future.done():  # dropped while queued (deadline, disconnect)
                continue
            batch = [first]
            rows = self._fill(batch, batch[0].rows)
            deadline = loop.time() + self.max_delay_s
            while self.merge_callers and rows < self.max_batch and self._arriving > 0 and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    pass
                rows = self._fill(batch, rows)
            batch = [p for p in batch if not p.future.done()]  # a caller may have gone while we waited
            if batch:
                await self._run(batch, sum(p.rows for p in batch))

    async def _run(self, batch: list[_Pending], rows: int) -> None:
        t0 = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._call, [p.inputs for p in batch], rows)
        except Exception as e:  # ORT's own error types; each caller gets a 500 with the message
            if len(batch) > 1:
                for p in batch:  # isolate: only the request that breaks the model should fail
                    await self._run([p], p.rows)
                return
            msg = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
            log.error("inference failed on a request of %d rows: %s", rows, msg)
            if not batch[0].future.done():
                batch[0].future.set_exception(InferenceError(f"inference failed in ONNX Runtime: {msg}"))
            return
        if self.metrics is not None:
            self.metrics.batch_rows.observe(rows)
            self.metrics.inference_seconds.observe(time.perf_counter() - t0)
            self.metrics.model_rows.inc(*self.labels, by=rows)
            self.metrics.model_calls.inc(*self.labels)
        start = 0
        for p in batch:
            if not p.future.done():  # done: the client went away and its handler was cancelled
                p.future.set_result([o[start:start + p.rows] for o in outputs])
            start += p.rows

    def _call(self, per_request: list[list[np.ndarray]], rows: int) -> list[np.ndarray]:
        """On the worker thread: merge the requests' inputs, run the model, check the batch axis."""
        inputs = per_request[0] if len(per_request) == 1 else [
            np.concatenate([r[i] for r in per_request]) for i in range(len(per_request[0]))]
        if rows > self.max_batch and self.merge_callers:  # one large request: in max_batch-row calls
            parts = [self.run_batch([a[start:start + self.max_batch] for a in inputs])
                     for start in range(0, rows, self.max_batch)]
            outputs = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        else:
            outputs = self.run_batch(inputs)
        bad = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != rows]
        if bad:
            raise InferenceError(f"the model returned outputs shaped {bad} for a batch of {rows} rows")
        return outputs


class _Arrival:
    def __init__(self, batcher: DynamicBatcher):
        self.batcher = batcher
        self.open = False

    def close(self) -> None:
        if self.open:
            self.open = False
            self.batcher._arriving -= 1
            if self.batcher._arriving == 0 and self.batcher._wake is not None:
                self.batcher._wake.set()  # a batch that waits for arrivals need not wait any more

    def __enter__(self) -> "_Arrival":
        self.batcher._arriving += 1
        self.open = True
        return self

    def __exit__(self, *exc) -> bool:
        self.close()  # the request failed before it was queued
        return False
