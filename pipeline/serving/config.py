"""Settings of the server, of the Triton export and of the deployment sweep: defaults, help text and checks
(light: the CLI's `--help` reads them without importing the web stack).

Settings flow one way: these defaults, then the settings `onnxpipe tune` measured and wrote into the
run (section `serving.settings`; used when one run is served), then the flags given."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..stages.configs import setting

KINDS = {"auto": None, "cpu": "KIND_CPU", "cuda": "KIND_GPU"}

# What `onnxpipe tune` may set in a run (the rest of ServeConfig is about the deployment, not the model).
TUNED = ("threads", "workers", "max_batch", "max_delay_ms")


def _finite(**values) -> None:
    for name, v in values.items():
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")


@dataclass(frozen=True)
class ServeConfig:
    host: str = setting("127.0.0.1", "Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
    port: int = setting(8000, "TCP port of the REST endpoints (0: any free port, printed at start).")
    grpc_port: int | None = setting(None, "TCP port of the KServe v2 gRPC service (inference.GRPCInferenceService; "
                                          "0: any free port; unset: no gRPC).")
    max_batch: int = setting(32, "Most rows merged into one ONNX Runtime call; 1 turns dynamic batching off.")
    max_delay_ms: float = setting(2.0, "Longest a request waits for others to join its batch (only while others "
                                       "are arriving).")
    threads: int | None = setting(None, "ONNX Runtime intra-op threads per model (default: the cores this process "
                                        "may use, divided among the workers).")
    workers: int = setting(1, "Server processes sharing the ports (SO_REUSEPORT), each with its own sessions; "
                              "/metrics and the repository API cover all of them.")
    max_body_mb: float = setting(32.0, "Largest request body accepted; larger ones get 413.")
    max_queue: int = setting(256, "Most requests per model version admitted and not yet answered; more get 503 "
                                  "with Retry-After at once.")
    max_inflight_mb: float = setting(64.0, "Most request-body megabytes held by unanswered requests (JSON bodies "
                                           "count 4x: what decoding them takes); more get 503 with Retry-After at "
                                           "once. A request always passes when nothing else is in flight.")
    timeout_ms: float = setting(0.0, "Deadline of a request, from its arrival to its answer: past it the request "
                                     "is answered 504 and its queued work dropped (0: no deadline; a gRPC "
                                     "client's own deadline also counts).")
    header_timeout_s: float = setting(10.0, "A connection that has not sent a request's complete headers this long "
                                            "after it opened (or after the request's first byte) is closed.")
    body_timeout_s: float = setting(60.0, "A request body not complete this long after its headers is answered "
                                          "408 and the connection closed.")
    shadow_rate: float = setting(0.0, "Fraction of requests also run on the served variant's FP32 parent, after "
                                      "the answer is sent; agreement and max-abs go to /metrics (0: off).")
    shadow_window: int = setting(512, "Rows the shadow's rolling agreement is computed over.")
    poll_s: float = setting(0.0, "Check the served run folders this often (seconds) and reload a version whose "
                                 "selected artifact changed (0: only on POST /v2/repository/models/NAME/load).")
    access_log: bool = setting(True, "One JSON line per request on stderr.")
    graceful_timeout_s: float = setting(30.0, "On SIGTERM, how long requests in flight may take to finish.")

    def __post_init__(self):
        _finite(max_delay_ms=self.max_delay_ms, max_body_mb=self.max_body_mb, graceful_timeout_s=self.graceful_timeout_s,
                max_inflight_mb=self.max_inflight_mb, timeout_ms=self.timeout_ms, header_timeout_s=self.header_timeout_s,
                body_timeout_s=self.body_timeout_s, shadow_rate=self.shadow_rate, poll_s=self.poll_s)
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_delay_ms <= 1000:
            raise ConfigError(f"--max-delay-ms must be in [0, 1000], got {self.max_delay_ms}")
        if self.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        for name in ("port", "grpc_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be in 0..65535, got {v}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"--workers must be in 1..256, got {self.workers}")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be >= 1, got {self.max_queue}")
        for name in ("max_inflight_mb", "header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("timeout_ms", "poll_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0: off), got {getattr(self, name)}")
        if not 0 <= self.shadow_rate <= 1:
            raise ConfigError(f"--shadow-rate must be in [0, 1], got {self.shadow_rate}")
        if self.shadow_window < 1:
            raise ConfigError(f"--shadow-window must be >= 1, got {self.shadow_window}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * (1 << 20))


@dataclass(frozen=True)
class TritonConfig:
    name: str | None = setting(None, "Model name in the repository (default: the run's model).")
    max_batch: int = setting(32, "Triton max_batch_size (0: no batching).")
    max_delay_ms: float = setting(2.0, "Triton dynamic batching queue delay.")
    preferred_batch: tuple[int, ...] = setting((), "Triton preferred_batch_size list (empty: none).")
    device: str = setting("auto", "Instance kind: auto (Triton decides), cpu, or cuda.")
    instances: int = setting(1, "Model instances Triton runs.")
    threads: int | None = setting(None, "ONNX Runtime intra-op threads per instance (Triton's intra_op_thread_count; "
                                        "unset: what `onnxpipe select` chose for the variant, else the backend's default).")
    execution_mode: str = setting("sequential", "sequential or parallel (Triton's execution_mode 0/1; parallel runs "
                                                "independent branches at once on --threads inter-op threads).")
    force: bool = setting(False, "Replace OUT_DIR/NAME if it exists.")

    def __post_init__(self):
        if isinstance(self.preferred_batch, list):
            object.__setattr__(self, "preferred_batch", tuple(self.preferred_batch))
        _finite(max_delay_ms=self.max_delay_ms)
        if self.max_batch < 0:
            raise ConfigError(f"--max-batch must be >= 0 (0 turns Triton's batching off), got {self.max_batch}")
        if self.max_delay_ms < 0:
            raise ConfigError(f"--max-delay-ms must be >= 0, got {self.max_delay_ms}")
        if self.device not in KINDS:
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.instances < 1:
            raise ConfigError(f"--instances must be >= 1, got {self.instances}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.execution_mode not in ("sequential", "parallel"):
            raise ConfigError(f"--execution-mode must be sequential or parallel, got {self.execution_mode!r}")
        if any(not isinstance(b, int) or b < 1 or b > max(self.max_batch, 1) for b in self.preferred_batch):
            raise ConfigError(f"--preferred-batch sizes must be in 1..max_batch ({self.max_batch}), "
                              f"got {list(self.preferred_batch)}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"bad model name {self.name!r}: use letters, digits, '-' or '_'")


@dataclass(frozen=True)
class TuneConfig:
    p99_ms: float = setting(10.0, "The p99 latency a setting must keep (at the concurrency it is judged at) to be "
                                  "chosen.")
    threads: tuple[int, ...] = setting((1, 2), "ONNX Runtime intra-op thread counts to try (per worker).")
    workers: tuple[int, ...] = setting((1, 2), "Worker process counts to try.")
    max_batch: tuple[int, ...] = setting((1, 8, 32), "--max-batch values to try.")
    max_delay_ms: tuple[float, ...] = setting((0.0, 2.0), "--max-delay-ms values to try (only with batching).")
    concurrency: tuple[int, ...] = setting((1, 8, 32), "Concurrent closed-loop clients the load generator drives "
                                                       "each setting with.")
    seconds: float = setting(2.0, "Length of one measurement (one setting at one concurrency).")
    warmup_s: float = setting(0.5, "Untimed load before each setting's measurements.")
    binary: bool = setting(True, "Binary tensors (Triton's extension) rather than JSON in the load.")
    batch: int = setting(1, "Rows per request in the load.")
    confirm: int = setting(3, "The best settings of the sweep measured once more, each on a fresh server, before "
                              "one is chosen: by the lower of its two throughputs, and only if both p99s met the "
                              "target (0: choose from the sweep alone).")
    write: bool = setting(True, "Write the chosen setting into the run (serve's and export-triton's defaults).")

    def __post_init__(self):
        for name in ("threads", "workers", "max_batch", "max_delay_ms", "concurrency"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
                v = getattr(self, name)
            if not v or any(not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in v):
                raise ConfigError(f"--{name.replace('_', '-')} needs one or more numbers >= 0, got {list(v)}")
        for name in ("threads", "workers", "max_batch", "concurrency"):
            if min(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} values must be >= 1, got {list(getattr(self, name))}")
        _finite(p99_ms=self.p99_ms, seconds=self.seconds, warmup_s=self.warmup_s)
        if self.confirm < 0:
            raise ConfigError(f"--confirm must be >= 0, got {self.confirm}")
        if self.p99_ms <= 0 or self.seconds <= 0 or self.warmup_s < 0 or self.batch < 1:
            raise ConfigError("--p99-ms and --seconds must be > 0, --warmup-s >= 0 and --batch >= 1")
