"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms are updated from the event loop and the batcher's worker thread,
so every update takes one lock (cheap next to an HTTP request)."""
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

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *a):
        super().__init__(*a)
        self.value = 0.0

    def set(self, v: float) -> None:
        self.value = float(v)  # one attribute store: atomic under the GIL

    def add(self, v: float) -> None:
        with self._lock:
            self.value += v

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.value)}"]


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

    def render(self) -> list[str]:
        out = self.header()
        for key, s in sorted(self.series.items()):
            names = self.label_names + ("le",)
            for b, c in zip(self.buckets, s):
                out.append(f"{self.name}_bucket{_labels(names, key + (_num(b),))} {c}")
            out.append(f"{self.name}_bucket{_labels(names, key + ('+Inf',))} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {s[-1]}")
        return out


class ServerMetrics:
    """What /metrics shows: requests by route and status, latency, batch sizes, queue depth."""

    def __init__(self):
        lock = threading.Lock()
        self.requests = Counter("onnxpipe_requests_total", "HTTP requests by route and status code.",
                                ("route", "code"), lock)
        self.latency = Histogram("onnxpipe_request_duration_seconds", "HTTP request latency, receipt to last byte.",
                                 ("route",), lock, LATENCY_BUCKETS)
        self.batch_rows = Histogram("onnxpipe_batch_size", "Rows per ONNX Runtime call (dynamic batching).",
                                    (), lock, BATCH_BUCKETS)
        self.inference_seconds = Histogram("onnxpipe_inference_duration_seconds",
                                           "Time of one ONNX Runtime call.", (), lock, LATENCY_BUCKETS)
        self.queue_depth = Gauge("onnxpipe_queue_depth", "Requests waiting for the batcher.", (), lock)
        self.in_flight = Gauge("onnxpipe_requests_in_flight", "HTTP requests being handled now.", (), lock)
        self.ready = Gauge("onnxpipe_model_ready", "1 once the model passed its sha256 check and self-test.", (), lock)

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.latency, self.batch_rows, self.inference_seconds, self.queue_depth,
                  self.in_flight, self.ready):
            lines += m.render()
        return "\n".join(lines) + "\n"
