"""Settings of the server and of the Triton export: defaults, help text and checks (light: the CLI's
`--help` reads them without importing the web stack)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..stages.configs import setting

KINDS = {"auto": None, "cpu": "KIND_CPU", "cuda": "KIND_GPU"}


@dataclass(frozen=True)
class ServeConfig:
    host: str = setting("127.0.0.1", "Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
    port: int = setting(8000, "TCP port (0: any free port, printed at start).")
    max_batch: int = setting(32, "Most rows merged into one ONNX Runtime call; 1 turns dynamic batching off.")
    max_delay_ms: float = setting(2.0, "Longest a request waits for others to join its batch (only while others "
                                       "are arriving).")
    max_body_mb: float = setting(32.0, "Largest request body accepted; larger ones get 413.")
    access_log: bool = setting(True, "One JSON line per request on stderr.")
    graceful_timeout_s: float = setting(30.0, "On SIGTERM, how long requests in flight may take to finish.")

    def __post_init__(self):
        for name in ("max_delay_ms", "max_body_mb", "graceful_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_delay_ms <= 1000:
            raise ConfigError(f"--max-delay-ms must be in [0, 1000], got {self.max_delay_ms}")
        if self.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


@dataclass(frozen=True)
class TritonConfig:
    name: str | None = setting(None, "Model name in the repository (default: the run's model).")
    max_batch: int = setting(32, "Triton max_batch_size (0: no batching).")
    max_delay_ms: float = setting(2.0, "Triton dynamic batching queue delay.")
    device: str = setting("auto", "Instance kind: auto (Triton decides), cpu, or cuda.")
    instances: int = setting(1, "Model instances Triton runs.")
    force: bool = setting(False, "Replace OUT_DIR/NAME if it exists.")

    def __post_init__(self):
        if not isinstance(self.max_delay_ms, (int, float)) or not math.isfinite(self.max_delay_ms):
            raise ConfigError(f"--max-delay-ms must be a finite number, got {self.max_delay_ms!r}")
        if self.max_batch < 0:
            raise ConfigError(f"--max-batch must be >= 0 (0 turns Triton's batching off), got {self.max_batch}")
        if self.max_delay_ms < 0:
            raise ConfigError(f"--max-delay-ms must be >= 0, got {self.max_delay_ms}")
        if self.device not in KINDS:
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.instances < 1:
            raise ConfigError(f"--instances must be >= 1, got {self.instances}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"bad model name {self.name!r}: use letters, digits, '-' or '_'")
