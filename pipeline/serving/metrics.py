"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms are updated from the event loop and the worker threads, so every
update takes one lock (cheap next to a request). With `--workers N` every worker keeps its own
numbers; `snapshot()` turns them into plain data and `render(others)` adds the other workers'
snapshots in: counters and histograms are summed, each gauge is combined by its own rule (queue
depths and requests in flight add up, readiness is the lowest, the shadow's agreement the lowest
and its max-abs the highest), so one scrape of any worker describes the whole server."""
from __future__ import annotations

import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    parts = []
    for n, v in zip(names, values):
        escaped = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{n}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...], lock: threading.Lock):
        self.name, self.help, self.label_names, self._lock = name, help, labels, lock

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a):
        super().__init__(*a)
        self.values: dict[tuple, float] = {}

    def inc(self, *labels, by: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + by

    def snapshot(self) -> list:
        with self._lock:
            return [[list(k), v] for k, v in self.values.items()]

    def merged(self, others: list[list]) -> dict[tuple, float]:
        out = dict(self.values)
        for snap in others:
            for k, v in snap:
                out[tuple(k)] = out.get(tuple(k), 0.0) + v
        return out

    def render(self, others: list[list] = ()) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
                                for k, v in sorted(self.merged(list(others)).items())]


class Gauge(_Metric):
    """A value per label set; `combine` says how the workers' values make one: sum, min or max."""

    kind = "gauge"

    def __init__(self, name, help, labels, lock, combine: str = "sum", always: bool = True):
        super().__init__(name, help, labels, lock)
        self.combine = combine
        self.values: dict[tuple, float] = {(): 0.0} if always and not labels else {}

    def set(self, v: float, *labels) -> None:
        self.values[labels] = float(v)  # one dict store: atomic under the GIL

    def add(self, v: float, *labels) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + v

    def remove(self, *labels) -> None:
        self.values.pop(labels, None)

    def get(self, *labels) -> float | None:
        return self.values.get(labels)

    def snapshot(self) -> list:
        return [[list(k), v] for k, v in list(self.values.items())]

    def merged(self, others: list[list]) -> dict[tuple, float]:
        fn = {"sum": lambda a, b: a + b, "min": min, "max": max}[self.combine]
        out = dict(self.values)
        for snap in others:
            for k, v in snap:
                k = tuple(k)
                out[k] = fn(out[k], v) if k in out else v
        return out

    def render(self, others: list[list] = ()) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
                                for k, v in sorted(self.merged(list(others)).items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labels, lock, buckets):
        super().__init__(name, help, labels, lock)
        self.buckets = tuple(buckets)
        self.series: dict[tuple, list] = {}   # labels -> [counts per bucket..., sum, count]

    def observe(self, value: float, *labels) -> None:
        with self._lock:
            s = self.series.get(labels)
            if s is None:
                s = self.series[labels] = [0] * len(self.buckets) + [0.0, 0]
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def snapshot(self) -> list:
        with self._lock:
            return [[list(k), list(s)] for k, s in self.series.items()]

    def merged(self, others: list[list]) -> dict[tuple, list]:
        out = {k: list(s) for k, s in self.series.items()}
        for snap in others:
            for k, s in snap:
                k = tuple(k)
                out[k] = [a + b for a, b in zip(out[k], s)] if k in out else list(s)
        return out

    def render(self, others: list[list] = ()) -> list[str]:
        out = self.header()
        for key, s in sorted(self.merged(list(others)).items()):
            names = self.label_names + ("le",)
            for b, c in zip(self.buckets, s):
                out.append(f"{self.name}_bucket{_labels(names, key + (_num(b),))} {c}")
            out.append(f"{self.name}_bucket{_labels(names, key + ('+Inf',))} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {s[-1]}")
        return out


class ServerMetrics:
    """What /metrics shows. Server-wide: requests by route and status, latency, batch sizes, queue depth,
    readiness; per model and version: state, queue, rows, refusals, dropped work, shadow parity; gRPC."""

    def __init__(self):
        lock = threading.Lock()
        M = ("model", "version")
        self.requests = Counter("onnxpipe_requests_total", "HTTP requests by route and status code.",
                                ("route", "code"), lock)
        self.latency = Histogram("onnxpipe_request_duration_seconds", "HTTP request latency, receipt to last byte.",
                                 ("route",), lock, LATENCY_BUCKETS)
        self.batch_rows = Histogram("onnxpipe_batch_size", "Rows per ONNX Runtime call (dynamic batching), all models.",
                                    (), lock, BATCH_BUCKETS)
        self.inference_seconds = Histogram("onnxpipe_inference_duration_seconds",
                                           "Time of one ONNX Runtime call, all models.", (), lock, LATENCY_BUCKETS)
        self.queue_depth = Gauge("onnxpipe_queue_depth", "Inference requests admitted and not answered yet (reading, queued or running), all models.", (), lock)
        self.in_flight = Gauge("onnxpipe_requests_in_flight", "HTTP requests being handled now.", (), lock)
        self.ready = Gauge("onnxpipe_model_ready", "1 once every loaded model passed its sha256 check and self-test.",
                           (), lock, combine="min")
        self.inflight_bytes = Gauge("onnxpipe_inflight_bytes", "Request body bytes held by requests not yet answered "
                                    "(bounded by --max-inflight-mb).", (), lock)
        self.workers = Gauge("onnxpipe_workers", "Worker processes whose numbers this scrape adds up.", (), lock)
        self.model_ready = Gauge("onnxpipe_model_version_ready", "1: this version passed its sha256 check and "
                                 "self-test and answers requests.", M, lock, combine="min")
        self.model_queue = Gauge("onnxpipe_model_queue_depth", "Requests admitted for this version and not answered "
                                 "yet (bounded by --max-queue).", M, lock)
        self.model_requests = Counter("onnxpipe_model_requests_total", "Inference requests by model, version, "
                                      "protocol and status code.", (*M, "protocol", "code"), lock)
        self.model_rows = Counter("onnxpipe_model_rows_total", "Rows run by ONNX Runtime.", M, lock)
        self.model_calls = Counter("onnxpipe_model_calls_total", "ONNX Runtime calls (batches).", M, lock)
        self.rejected = Counter("onnxpipe_rejected_total", "Requests refused at once with 503 and Retry-After: "
                                "queue_full (--max-queue) or inflight_bytes (--max-inflight-mb).", ("model", "reason"),
                                lock)
        self.dropped = Counter("onnxpipe_dropped_total", "Admitted requests whose queued work was dropped: deadline "
                               "(--timeout-ms, answered 504) or disconnect (the client went away).", ("model", "reason"),
                               lock)
        self.loads = Counter("onnxpipe_model_loads_total", "Loads and reloads of a version, by result.",
                             (*M, "result"), lock)
        self.shadow_rows = Counter("onnxpipe_shadow_rows_total", "Rows also run on the FP32 parent (--shadow-rate).",
                                   M, lock)
        self.shadow_agree = Counter("onnxpipe_shadow_agreeing_rows_total", "Shadowed rows whose answer agreed with "
                                    "the parent by the variant's rule.", M, lock)
        self.shadow_skipped = Counter("onnxpipe_shadow_skipped_total", "Sampled requests not shadowed because the "
                                      "shadow worker was busy (the answer is never delayed).", M, lock)
        self.shadow_agreement = Gauge("onnxpipe_shadow_agreement", "Rolling agreement with the FP32 parent over the "
                                      "last shadowed rows.", M, lock, combine="min")
        self.shadow_max_abs = Gauge("onnxpipe_shadow_max_abs", "Largest |served - parent| output difference over the "
                                    "rolling window.", M, lock, combine="max")
        self.shadow_budget = Gauge("onnxpipe_shadow_budget", "The agreement the variant's budget asks for.", M, lock,
                                   combine="max")
        self.shadow_within = Gauge("onnxpipe_shadow_within_budget", "1 while the rolling agreement meets the budget.",
                                   M, lock, combine="min")
        self.loop_lag = Histogram("onnxpipe_event_loop_lag_seconds", "How late the event loop ran a timer due every "
                                  "50 ms: the wait any request (a health probe too) can have before it is read.", (),
                                  lock, LATENCY_BUCKETS)
        self.grpc_requests = Counter("onnxpipe_grpc_requests_total", "gRPC calls by method and status code.",
                                     ("method", "code"), lock)
        self.grpc_latency = Histogram("onnxpipe_grpc_request_duration_seconds", "gRPC call latency in the handler.",
                                      ("method",), lock, LATENCY_BUCKETS)
        self.workers.set(1)

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def snapshot(self) -> dict:
        """Plain data for another worker's render()."""
        self._derive()
        return {m.name: m.snapshot() for m in self.all()}

    def _derive(self) -> None:
        self.queue_depth.set(sum(self.model_queue.values.values()))
        states = list(self.model_ready.values.values())
        self.ready.set(1 if states and min(states) >= 1 else 0)

    def render(self, others: list[dict] = ()) -> str:
        self._derive()
        lines: list[str] = []
        for m in self.all():
            lines += m.render([o[m.name] for o in others if m.name in o])
        return "\n".join(lines) + "\n"
