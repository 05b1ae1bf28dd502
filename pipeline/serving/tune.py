"""`onnxpipe tune RUN`: deployment settings from a measured sweep, written into the run.

For every setting of the grid (intra-op threads x workers x max batch x max delay; the delay only
matters with batching), a real `onnxpipe serve` of the run's selected variant is started on
loopback, warmed up, and driven by the bounded closed-loop load generator (loadgen.py) at each
concurrency: requests per second, p50/p90/p99 latency, errors, and the rows ONNX Runtime ran per
call. A point qualifies when its p99 kept `--p99-ms` with no error and no refusal. One short
measurement on a shared machine can be lucky, so the best `--confirm` qualifying settings are
measured once more at their best concurrency, each on a fresh server; the chosen one has the
highest throughput counting the lower of its two measurements, and both p99s within the target
(ties go to fewer workers, then fewer threads).

It is written into the run (section `serving`): `onnxpipe serve RUN` then starts with it (its
start-up log says so, flags still win), `onnxpipe export-triton` turns it into config.pbtxt
(instance count, preferred batch size, queue delay, intra-op threads), and the report plots
throughput against p99 for every setting. The load generator runs in this process, beside the
server, so on a small machine it takes some of the cores the server could use: the numbers are
those of this machine with this client, which is what the choice is for.
"""
from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, OnnxpipeError
from ..runfolder import Run
from .config import TuneConfig
from .loadgen import get, infer_request, run_load


def grid(cfg: TuneConfig) -> list[dict]:
    """Every setting once: the delay is only varied where batching is on (max batch > 1)."""
    out = []
    for threads, workers, max_batch in itertools.product(cfg.threads, cfg.workers, cfg.max_batch):
        delays = sorted(set(cfg.max_delay_ms)) if max_batch > 1 else [0.0]
        for delay in delays:
            out.append({"threads": int(threads), "workers": int(workers), "max_batch": int(max_batch),
                        "max_delay_ms": float(delay)})
    return out


class _Server:
    """`onnxpipe serve` for one setting, in a subprocess, its log in a temporary file."""

    def __init__(self, run_dir: Path, setting: dict, device: str):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="onnxpipe-tune-", delete=False)
        args = [sys.executable, "-m", "onnxpipe.cli", "serve", str(run_dir), "--port", "0", "--device", device,
                "--no-access-log", "--threads", str(setting["threads"]), "--workers", str(setting["workers"]),
                "--max-batch", str(setting["max_batch"]), "--max-delay-ms", str(setting["max_delay_ms"])]
        self.proc = subprocess.Popen(args, stderr=self.log, stdout=subprocess.DEVNULL)
        self.port, self.workers = None, setting["workers"]

    def text(self) -> str:
        return Path(self.log.name).read_text()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"`onnxpipe serve` exited with status {self.proc.returncode}: {self.text()[-1500:]}")
            if self.port is None and (m := re.search(r"on http://127\.0\.0\.1:(\d+)/", self.text())):
                self.port = int(m.group(1))
            if self.port is not None:
                status, body = get("127.0.0.1", self.port, "/metrics")
                text = body.decode(errors="replace")
                if status == 200 and re.search(rf"^onnxpipe_workers {self.workers}$", text, re.M) and \
                        re.search(r"^onnxpipe_model_ready 1$", text, re.M):
                    return
            time.sleep(0.1)
        raise ConfigError(f"the server did not become ready within {timeout:g} s: {self.text()[-1500:]}")

    def rows_and_calls(self) -> np.ndarray:
        _, body = get("127.0.0.1", self.port, "/metrics")
        text = body.decode(errors="replace")
        return np.array([sum(float(v) for v in re.findall(rf"^onnxpipe_model_{k}_total\{{[^}}]*\}} (\S+)$", text, re.M))
                         for k in ("rows", "calls")])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)


def choose(points: list[dict], p99_ms: float) -> dict | None:
    """The best point that kept the p99 target with no error or refusal (a pure function of the measurements)."""
    ok = [p for p in points if p["errors"] == 0 and p["non_200"] == 0 and p["ok"] > 0 and p["p99_ms"] <= p99_ms]
    if not ok:
        return None
    return max(ok, key=lambda p: (p["rps"], -p["setting"]["workers"], -p["setting"]["threads"]))


def confirmed(first: dict, again: dict) -> dict:
    """One setting's two measurements at the same concurrency as one: the lower throughput, the higher p99."""
    both = [first, again]
    return {**first, "rps": min(p["rps"] for p in both), "p50_ms": max(p["p50_ms"] for p in both),
            "p99_ms": max(p["p99_ms"] for p in both), "errors": sum(p["errors"] for p in both),
            "non_200": sum(p["non_200"] for p in both), "ok": min(p["ok"] for p in both),
            "measurements": [{k: p[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "non_200")} for p in both]}


def _measure(run_root: Path, setting: dict, device: str, request: bytes, concurrency: list[int], cfg: TuneConfig,
             ) -> list[dict]:
    server = _Server(run_root, setting, device)
    try:
        server.wait_ready()
        run_load("127.0.0.1", server.port, request, max(concurrency), cfg.warmup_s)
        out = []
        for c in concurrency:
            before = server.rows_and_calls()
            result = run_load("127.0.0.1", server.port, request, c, cfg.seconds)
            rows, calls = server.rows_and_calls() - before
            out.append({"setting": setting, **result.to_json(), "rows_per_call": round(rows / max(calls, 1), 2)})
        return out
    finally:
        server.stop()


def tune(run: Run, cfg: TuneConfig = TuneConfig(), *, device: str = "cpu",
         progress: Callable[[str], None] = lambda s: None) -> dict:
    """Sweep the grid; returns the record (also written into the run when cfg.write and a setting qualified)."""
    from ..core.timing import usable_cores

    variant = run.selected
    if not variant or run.artifact(variant).format != "onnx":
        raise ConfigError(f"run {run.root} has no selected ONNX variant to tune; run `onnxpipe select {run.root}`")
    with np.load(run.file(run.section("reference")["path"], what="reference file"), allow_pickle=False) as z:
        x = z["inputs"][:cfg.batch].astype(np.float32)
    from .model import ServedModel

    probe = ServedModel.prepare(run, variant, device=device)  # the input's name, and the same refusals as serve
    from ..core.runtime import make_session

    input_name = make_session(run.path(variant), device="cpu", threads=1).input_names[0]
    request = infer_request(probe.name, input_name, x, binary=cfg.binary)
    settings = grid(cfg)
    points = []
    started = time.monotonic()
    def describe(tag: str, point: dict) -> str:
        s = point["setting"]
        bad = point["errors"] + point["non_200"]
        return (f"{tag} threads {s['threads']} workers {s['workers']} max batch {s['max_batch']} delay "
                f"{s['max_delay_ms']:g} ms, {point['concurrency']} clients: {point['rps']:.0f} req/s, p50 "
                f"{point['p50_ms']:.2f} ms, p99 {point['p99_ms']:.2f} ms" + (f", {bad} errors" if bad else ""))

    for i, setting in enumerate(settings, 1):
        try:
            for point in _measure(run.root, setting, device, request, list(cfg.concurrency), cfg):
                points.append(point)
                progress(describe(f"[{i}/{len(settings)}]", point))
        except OnnxpipeError as e:
            progress(f"[{i}/{len(settings)}] {setting}: the server could not be measured: {e}")
            points.append({"setting": setting, "concurrency": None, "rps": 0.0, "p50_ms": None, "p90_ms": None,
                           "p99_ms": None, "ok": 0, "non_200": 0, "errors": 1, "failure": str(e)[:500]})
    measured = [p for p in points if p.get("p99_ms") is not None]
    best = choose(measured, cfg.p99_ms)
    confirmation = []
    if best is not None and cfg.confirm > 0:
        ranked, seen = [], set()
        for p in sorted(measured, key=lambda p: -p["rps"]):  # the best qualifying point of each setting
            key = tuple(sorted(p["setting"].items()))
            if key not in seen and choose([p], cfg.p99_ms) is not None:
                seen.add(key)
                ranked.append(p)
        for j, p in enumerate(ranked[:cfg.confirm], 1):
            try:
                (again,) = _measure(run.root, p["setting"], device, request, [p["concurrency"]], cfg)
            except OnnxpipeError as e:
                progress(f"[confirm {j}] {p['setting']}: the server could not be measured: {e}")
                continue
            progress(describe(f"[confirm {j}/{min(cfg.confirm, len(ranked))}]", again))
            confirmation.append(confirmed(p, again))
        best = choose(confirmation, cfg.p99_ms) if confirmation else best
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "variant": variant,
              "p99_ms": cfg.p99_ms, "device": device, "cores": usable_cores(), "seconds": round(time.monotonic() - started, 1),
              "load": {"batch": cfg.batch, "binary": cfg.binary, "seconds": cfg.seconds, "concurrency": list(cfg.concurrency),
                       "client": "onnxpipe loadgen (closed loop, raw HTTP/1.1, in the tuning process)"},
              "config": asdict(cfg), "sweep": points, "confirmation": confirmation}
    if best is not None:
        record["settings"] = dict(best["setting"])
        record["chosen"] = {k: best[k] for k in ("concurrency", "rps", "p50_ms", "p99_ms", "rows_per_call")}
    if cfg.write:
        if best is not None:
            run.set_section("serving", record)
        else:
            old = run.section("serving") or {}
            run.set_section("serving", {**{k: v for k, v in old.items() if k in ("settings", "chosen", "when")},
                                        "last_sweep": record})
    if best is None:
        fastest = min((p for p in points if p.get("p99_ms") is not None), key=lambda p: p["p99_ms"], default=None)
        hint = (f"; the lowest p99 measured was {fastest['p99_ms']:.2f} ms ({fastest['setting']}, {fastest['concurrency']} "
                "clients)") if fastest else ""
        raise ConfigError(f"no setting kept p99 <= {cfg.p99_ms:g} ms without errors{hint}; raise --p99-ms or lower "
                          "--concurrency (the sweep is recorded in the run, no settings were changed)")
    return record
