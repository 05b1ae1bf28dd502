"""The machine's own limits, measured through ONNX Runtime at a given thread count.

  fp32_gflops   FP32 MatMul of square matrices
  int8_gops     U8 x S8 MatMulInteger (ORT's integer matmul, what int8 variants run on; CPU only)
  overhead_ms   one call of a near-empty session (one Add of a 1x1 tensor) through the same
                Session path the variants use: the floor under every batch-1 latency

`measure_peak` scans a few sizes (timed interleaved) and keeps the size where each kernel runs best:
the peak is a property of the machine, the size only finds it. `limit_probes` then gives those
calls as plain callables, so `bench` can time them in the same interleaved rounds as the variants:
on a shared machine a fraction of peak is only meaningful when both were measured side by side."""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .timing import Latency, time_interleaved

SIZES = (256, 512, 1024)
FP32, INT8, EMPTY = "@fp32_matmul", "@int8_matmul", "@empty_call"


@dataclass
class Peak:
    threads: int
    fp32_gflops: float
    int8_gops: float
    overhead_ms: float
    fp32_size: int = 512
    int8_size: int = 512
    device: str = "cpu"
    by_size: dict[str, float] = field(default_factory=dict)   # "fp32@512" -> G(FL)OP/s at the median

    def for_kind(self, kind: str) -> float:
        """The peak a variant of this arithmetic kind ('fp32' or 'int8') is held to."""
        return self.int8_gops if kind == "int8" else self.fp32_gflops

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Probe:
    call: Callable[[], object]
    ops: float          # arithmetic per call (0 for the near-empty call)


def _matmul_model(n: int, integer: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        weight = rng.integers(-128, 128, (n, n), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        weight = rng.standard_normal((n, n)).astype(np.float32)
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], f"matmul{n}", [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _near_empty_model():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "empty",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
                              [numpy_helper.from_array(np.ones((1, 1), np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def limit_probes(threads: int, *, device: str = "cpu", fp32_sizes: tuple[int, ...] = (512,),
                 int8_sizes: tuple[int, ...] = (512,)) -> dict[str, Probe]:
    """Sessions for the matmul kernels (one per size, named "@fp32_matmul@512") and the near-empty call.

    int8 is measured on the CPU only: ORT's CUDA MatMulInteger is not the kernel int8 variants run on there."""
    import onnx

    from .runtime import make_session

    rng = np.random.default_rng(1)
    probes: dict[str, Probe] = {}
    with tempfile.TemporaryDirectory(prefix="onnxpipe-peak-") as tmp:
        def session(name, model):
            path = Path(tmp) / f"{name.strip('@').replace('@', '_')}.onnx"
            onnx.save(model, path)
            return make_session(path, device=device, threads=threads, opt_level="all", spinning=False)

        for kind, sizes in ((FP32, fp32_sizes), (INT8, int8_sizes if device == "cpu" else ())):
            for n in sizes:
                s = session(f"{kind}@{n}", _matmul_model(n, kind == INT8))
                a = (rng.integers(0, 256, (n, n), dtype=np.uint8) if kind == INT8
                     else rng.standard_normal((n, n)).astype(np.float32))
                probes[f"{kind}@{n}"] = Probe(lambda s=s, a=a: s.inner.run(None, {"a": a}), 2.0 * n ** 3)
        empty = session(EMPTY, _near_empty_model())
        x = np.zeros((1, 1), np.float32)
        probes[EMPTY] = Probe(lambda: empty(x), 0.0)
    return probes


def peak_from(latencies: Mapping[str, Latency], probes: Mapping[str, Probe], threads: int, device: str) -> Peak:
    """The limits from timed probes: the best size's median rate per kernel, the empty call's median."""
    rates = {name.lstrip("@").replace("_matmul", ""): probes[name].ops / (latencies[name].p50 / 1000.0) / 1e9
             for name in probes if name != EMPTY}

    def best(kind: str) -> tuple[float, int]:
        hits = [(v, int(k.split("@")[1])) for k, v in rates.items() if k.startswith(kind + "@")]
        return max(hits, default=(0.0, 0))

    (fp32, fp32_n), (int8, int8_n) = best("fp32"), best("int8")
    return Peak(threads=threads, fp32_gflops=fp32, int8_gops=int8, overhead_ms=latencies[EMPTY].p50,
                fp32_size=fp32_n, int8_size=int8_n, device=device, by_size={k: round(v, 2) for k, v in rates.items()})


def measure_peak(threads: int, *, device: str = "cpu", sizes: tuple[int, ...] = SIZES, runs: int = 10,
                 warmup: int = 2, min_seconds: float = 0.5) -> Peak:
    """Scan matmul sizes and time the near-empty call at `threads` threads, all interleaved."""
    probes = limit_probes(threads, device=device, fp32_sizes=sizes, int8_sizes=sizes)
    lat = time_interleaved({k: p.call for k, p in probes.items()}, batch=1, warmup=warmup, runs=runs,
                           min_seconds=min_seconds)
    return peak_from(lat, probes, threads, device)


def machine_info() -> dict:
    """CPU model, its kernel-relevant features (pipeline.cpu), cores, memory: what a latency number depends on."""
    import os
    import platform

    from .cpu import cpu_features

    cpu = cpu_features()
    mem_gib = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu["model"], "flags": [name for name, present in cpu["features"].items() if present],
            "logical_cpus": cpu["logical_cpus"], "usable_cpus": cpu["usable_cpus"], "memory_gib": mem_gib,
            "platform": platform.platform()}


_CACHE: dict[tuple[int, str], Peak] = {}


def peak_for(threads: int, device: str = "cpu") -> Peak:
    """measure_peak, once per (threads, device) per process: the benchmarks script benches many runs."""
    if (threads, device) not in _CACHE:
        _CACHE[threads, device] = measure_peak(threads, device=device)
    return _CACHE[threads, device]
