"""The one place that builds ONNX Runtime sessions.

The execution provider is chosen explicitly (auto | cpu | cuda) and read back from the
session: a CUDA request that ORT cannot honour is an error, never a silent CPU run."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ConfigError, DeviceError
from .timing import default_threads

OPT_LEVELS = ("disable", "basic", "extended", "layout", "all")

ORT_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}

EXECUTION_MODES = ("sequential", "parallel")

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(device: str) -> list[str]:
    """Providers to ask ORT for, in order. Raises DeviceError when CUDA is asked for and absent."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    have = available_providers()
    if device == "cpu":
        return [CPU_EP]
    if device == "cuda":
        if CUDA_EP not in have:
            raise DeviceError(
                f"--device cuda was requested but ONNX Runtime has no CUDA provider here (available: {', '.join(have)}); "
                "install onnxruntime-gpu (pip install -e \".[cuda]\") on a machine with an NVIDIA GPU, or use --device cpu"
            )
        return [CUDA_EP, CPU_EP]
    return [CUDA_EP, CPU_EP] if CUDA_EP in have else [CPU_EP]


@dataclass(frozen=True)
class SessionSetting:
    """How one session runs: intra-op threads, the execution mode (parallel runs independent branches of
    the graph at once, on as many inter-op threads) and whether idle threads spin between calls.

    Chosen by measurement in `onnxpipe select` (stages/select.best_setting) and used by serve and
    export-triton unless told otherwise."""

    threads: int
    execution_mode: str = "sequential"
    spinning: bool = False

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads must be a whole number >= 1, got {self.threads!r}")
        if self.execution_mode not in EXECUTION_MODES:
            raise ConfigError(f"execution_mode must be one of {', '.join(EXECUTION_MODES)}, got {self.execution_mode!r}")

    @property
    def key(self) -> str:
        """'2t/parallel/spin': a stable name for tables and the manifest."""
        return f"{self.threads}t/{self.execution_mode}/{'spin' if self.spinning else 'no-spin'}"

    @property
    def cost(self) -> tuple:
        """What the setting takes from the machine, for breaking near-ties: fewer threads first, then
        sequential before parallel, then not spinning (idle threads left to other work)."""
        return (self.threads, self.execution_mode == "parallel", self.spinning)

    def to_json(self) -> dict:
        return {"threads": self.threads, "execution_mode": self.execution_mode, "spinning": self.spinning}

    @classmethod
    def from_json(cls, d: dict) -> "SessionSetting":
        if not isinstance(d, dict) or "threads" not in d:
            raise ArtifactError(f"a recorded session setting must be an object with threads, got {d!r}")
        return cls(threads=d["threads"], execution_mode=d.get("execution_mode", "sequential"),
                   spinning=bool(d.get("spinning", False)))


ORT_DEFAULT_SEVERITY = 2          # ONNX Runtime's own default (warnings); it has no getter, so we track ours
_severity = [ORT_DEFAULT_SEVERITY]


@contextlib.contextmanager
def ort_log_severity(level: int):
    """Set ONNX Runtime's process-wide log severity for a block and restore it afterwards."""
    import onnxruntime as ort

    before = _severity[0]
    ort.set_default_logger_severity(level)
    _severity[0] = level
    try:
        yield
    finally:
        ort.set_default_logger_severity(before)
        _severity[0] = before


@dataclass
class Session:
    """An ORT InferenceSession plus what it really runs on."""

    inner: object
    path: Path
    providers: list[str]
    device: str
    threads: int
    opt_level: str
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    input_types: list[str] = field(default_factory=list)

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Outputs for the inputs given in the graph's input order (each cast to the type the graph declares)."""
        if len(inputs) != len(self.input_names):
            raise ArtifactError(f"{self.path.name} takes {len(self.input_names)} input(s) "
                                f"({', '.join(self.input_names)}), got {len(inputs)}")
        feeds = {name: np.ascontiguousarray(x, dtype=ORT_NP_TYPES.get(kind, np.float32))
                 for name, kind, x in zip(self.input_names, self.input_types, inputs)}
        return self.inner.run(self.output_names, feeds)

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        """The first output (logits) as float32."""
        return np.asarray(self.run(*inputs)[0], dtype=np.float32)


def make_session(path: str | Path, *, device: str = "auto", threads: int | None = None,
                 opt_level: str = "all", optimized_model_path: str | Path | None = None,
                 spinning: bool | None = None, execution_mode: str = "sequential",
                 profile_prefix: str | Path | None = None) -> Session:
    """Build a session for the ONNX file at `path` (whose sha256 the caller has checked).

    `spinning=False` stops idle intra-op threads from busy-waiting after a run: needed when several
    sessions (or torch) take turns on the same cores, as in interleaved timing. None keeps ORT's default.
    `execution_mode="parallel"` runs independent branches at once, on `threads` inter-op threads.
    `profile_prefix` turns ONNX Runtime's profiler on (its JSON goes to `<prefix>_<time>.json`, named by
    `session.inner.end_profiling()`)."""
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise ConfigError(f"unknown graph optimization level {opt_level!r}; use one of {', '.join(OPT_LEVELS)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if execution_mode not in EXECUTION_MODES:
        raise ConfigError(f"unknown execution mode {execution_mode!r}; use one of {', '.join(EXECUTION_MODES)}")
    providers = resolve_providers(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "layout": getattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    n = default_threads(threads)
    so.intra_op_num_threads = n
    so.inter_op_num_threads = n if execution_mode == "parallel" else 1
    if execution_mode == "parallel":
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    so.log_severity_level = 3  # errors only: ORT's warnings are not actionable for users here
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    try:
        inner = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        msg = str(e).splitlines()[0][:300]
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {msg}; the file is corrupt or not an ONNX model") from None
    got = list(inner.get_providers())
    if device == "cuda" and got[0] != CUDA_EP:
        raise DeviceError(
            f"--device cuda was requested but the session runs on {got[0]} (CUDA failed to initialize: check the "
            "CUDA/cuDNN libraries onnxruntime-gpu needs); use --device cpu to run on the CPU"
        )
    return Session(
        inner=inner, path=Path(path), providers=got, device="cuda" if got[0] == CUDA_EP else "cpu",
        threads=n, opt_level=opt_level,
        input_names=[i.name for i in inner.get_inputs()],
        output_names=[o.name for o in inner.get_outputs()],
        input_types=[i.type for i in inner.get_inputs()],
    )
