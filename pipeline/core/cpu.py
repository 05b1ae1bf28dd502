"""What this CPU can do for inference: the SIMD and integer-dot-product features that decide whether
INT8 is fast here (AVX2, AVX-512, VNNI, AMX), read from /proc/cpuinfo.

Without VNNI or AMX, x86 INT8 kernels multiply through 16-bit intermediates and often lose to FP32;
selection records these features beside its timings so a reader can tell why INT8 won or lost."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from .timing import usable_cores

CPUINFO = Path("/proc/cpuinfo")

# Feature name in the manifest -> the /proc/cpuinfo flags that provide it (any of them).
FEATURES = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_fp16": ("avx512_fp16",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"),
    "arm_dotprod": ("asimddp",),
    "arm_i8mm": ("i8mm",),
}


def parse_cpuinfo(text: str) -> dict:
    """Model name and flag set of the first processor block of a /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "processor name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, "flags": flags}


def features_from_flags(flags: set[str]) -> dict[str, bool]:
    out = {name: any(f in flags for f in alts) for name, alts in FEATURES.items()}
    # An integer dot-product instruction is what makes INT8 GEMM beat FP32 on a CPU.
    out["int8_dot"] = out["avx512_vnni"] or out["avx_vnni"] or out["amx_int8"] or out["arm_dotprod"]
    return out


def cpu_features(cpuinfo: str | None = None) -> dict:
    """{"model", "arch", "logical_cpus", "usable_cpus", "features": {name: bool}, "source"}."""
    source = "given"
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
            source = str(CPUINFO)
        except OSError:  # not Linux: report the architecture, no flags
            cpuinfo, source = "", "unavailable"
    info = parse_cpuinfo(cpuinfo)
    usable = usable_cores()
    return {
        "model": info["model"] or platform.processor() or "unknown",
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "features": features_from_flags(info["flags"]),
        "source": source,
    }
