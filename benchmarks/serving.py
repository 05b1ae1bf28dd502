"""Serving benchmark: `onnxpipe serve` on loopback against raw ONNX Runtime, side by side.

    python benchmarks/serving.py RUN [RUN ...] [--requests 1500] [--seconds 3] [--rounds 3] [--clients 32]

For each run folder, in this process (the load generator; each server is a subprocess):
1. latency: batch-1 requests one after another on one keep-alive connection (JSON and binary
   tensors), in blocks interleaved with blocks of raw `session.run` on the same file, so that the
   machine's noise hits both alike. Target: HTTP p50 <= raw p50 + 1 ms.
2. throughput: `--clients` concurrent connections sending batch-1 requests (binary tensors) as fast
   as answers come back, to a server with dynamic batching (--max-batch 32) and one without
   (--max-batch 1), in alternating rounds. Target: >= 3x with batching, zero errors.

The client speaks HTTP/1.1 over raw sockets (no client library) to keep its own cost out of the numbers.
Never collected by pytest.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxpipe.runfolder import Run  # noqa: E402
from onnxpipe.core.runtime import make_session  # noqa: E402
from onnxpipe.core.timing import time_interleaved  # noqa: E402


# --- requests ------------------------------------------------------------------------------------------

def payloads(run: Run, x: np.ndarray) -> dict[str, bytes]:
    """Raw HTTP requests for one batch-1 input: JSON and binary tensors."""
    name = run.model_name
    session = make_session(run.path(run.selected), device="cpu", threads=1)
    input_name = session.input_names[0]
    path = f"/v2/models/{name}/infer"
    out = {}
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    out["json"] = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    blob = np.ascontiguousarray(x, "<f4").tobytes()
    head = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    out["binary"] = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                     f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(blob)}\r\n\r\n"
                     ).encode() + head + blob
    return out


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length = int(re.search(r"(?i)content-length:\s*(\d+)", head).group(1))
    while len(buf) < end + length:
        buf += sock.recv(65536)
    body = bytes(buf[end:end + length])
    del buf[:end + length]
    return status, body


# --- the server ----------------------------------------------------------------------------------------

class Server:
    """`onnxpipe serve` in a subprocess, its log in a temporary file."""

    def __init__(self, run_dir: str, *extra: str):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", run_dir, "--port", "0",
                                      "--device", "cpu", *extra], stderr=self.log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None and time.monotonic() < deadline:
            if m := re.search(r"on http://127\.0\.0\.1:(\d+)/", Path(self.log.name).read_text()):
                self.port = int(m.group(1))
            time.sleep(0.05)
        while time.monotonic() < deadline:
            if '"ready":true' in self.get("/v2/health/ready"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"server did not become ready: {Path(self.log.name).read_text()[-2000:]}")

    def get(self, path: str) -> str:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                return read_response(s, bytearray())[1].decode()
        except OSError:
            return ""

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        os.unlink(self.log.name)
        return code


# --- measurements --------------------------------------------------------------------------------------

def latency(server: Server, requests: dict[str, bytes], raw_call, n: int, block: int = 50) -> dict:
    """Blocks of `block` calls, interleaved: raw, json, binary, raw, json, binary, ..."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()

    def http(req: bytes):
        sock.sendall(req)
        status, _ = read_response(sock, buf)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    calls = {"raw session.run": raw_call, **{f"HTTP {k}": (lambda r=r: http(r)) for k, r in requests.items()}}
    # The project's one timing loop: blocks of `block` calls per candidate (the first re-warms, untimed).
    out = time_interleaved(calls, batch=1, warmup=50, runs=-(-n // (block - 1)), block=block)
    sock.close()
    return out


async def _client(port: int, request: bytes, stop_at: float, counts: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while time.perf_counter() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            counts["ok" if status == 200 else "errors"] += 1
    except (ConnectionError, asyncio.IncompleteReadError):
        counts["errors"] += 1
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): a cost that other tenants' load
    on a shared machine barely changes, unlike wall-clock throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(server: "Server", request: bytes, clients: int, seconds: float) -> tuple[float, int, float]:
    """(requests/s, errors, server CPU ms per request) for `clients` closed-loop connections."""
    async def main():
        counts = {"ok": 0, "errors": 0}
        t0 = time.perf_counter()
        await asyncio.gather(*[_client(server.port, request, t0 + seconds, counts) for _ in range(clients)])
        return counts, time.perf_counter() - t0

    cpu0 = cpu_seconds(server.proc.pid)
    counts, elapsed = asyncio.run(main())
    cpu_ms = (cpu_seconds(server.proc.pid) - cpu0) * 1000 / max(counts["ok"], 1)
    return counts["ok"] / elapsed, counts["errors"], cpu_ms


def batch_totals(server: Server) -> np.ndarray:
    """(rows, ONNX Runtime calls) so far, from the server's /metrics."""
    text = server.get("/metrics")
    found = [re.search(rf"^onnxpipe_batch_size_{k} (\S+)$", text, re.M) for k in ("sum", "count")]
    return np.array([float(m.group(1)) if m else 0.0 for m in found])


def bench_run(run_dir: str, args) -> None:
    run = Run.open(run_dir)
    x = np.load(Path(run_dir) / "reference.npz")["inputs"][:1].astype(np.float32)
    requests = payloads(run, x)
    # the server's session settings: all cores, ORT threads not spinning between calls
    session = make_session(run.path(run.selected), device="cpu", spinning=False)
    feeds = {session.input_names[0]: x}
    print(f"\n## {run.model_name} ({run_dir}, variant {run.manifest['selected']}, input {list(x.shape)})", flush=True)

    batching = Server(run_dir, "--max-batch", "32", "--max-delay-ms", str(args.max_delay_ms))
    single = Server(run_dir, "--max-batch", "1")
    try:
        lat = latency(batching, requests, lambda: session.inner.run(None, feeds), args.requests)
        raw = lat["raw session.run"].p50
        print("| call | p50 ms | p90 ms | p99 ms | p50 - raw p50 |\n|---|---|---|---|---|")
        for name, s in lat.items():
            print(f"| {name} | {s.p50:.3f} | {s.p90:.3f} | {s.p99:.3f} | {s.p50 - raw:+.3f} |")
        del session  # free its threads before the throughput rounds
        results: dict[str, list[tuple[float, int]]] = {"--max-batch 32": [], "--max-batch 1": []}
        throughput(batching, requests["binary"], args.clients, 0.5)  # warm-up
        throughput(single, requests["binary"], args.clients, 0.5)
        before = {"--max-batch 32": batch_totals(batching), "--max-batch 1": batch_totals(single)}
        for _ in range(args.rounds):
            for name, server in (("--max-batch 32", batching), ("--max-batch 1", single)):
                results[name].append(throughput(server, requests["binary"], args.clients, args.seconds))
        print(f"\n{args.clients} concurrent clients, batch-1 binary requests, {args.rounds} alternating rounds "
              f"of {args.seconds:g} s:\n")
        print("| server | requests/s (median) | per round | errors | mean rows per ORT call | server CPU ms per request "
              "(median) |\n|---|---|---|---|---|---|")
        med, cpu = {}, {}
        for (name, rows), server in zip(results.items(), (batching, single)):
            med[name] = float(np.median([r for r, _, _ in rows]))
            cpu[name] = float(np.median([c for _, _, c in rows]))
            rows_calls = batch_totals(server) - before[name]
            print(f"| {name} | {med[name]:.0f} | {', '.join(f'{r:.0f}' for r, _, _ in rows)} | "
                  f"{sum(e for _, e, _ in rows)} | {rows_calls[0] / max(rows_calls[1], 1):.1f} | {cpu[name]:.3f} |")
        print(f"\nserver CPU per request, no batching / batching: {cpu['--max-batch 1'] / cpu['--max-batch 32']:.2f}x")
        pairs = [a / b for (a, _, _), (b, _, _) in zip(results["--max-batch 32"], results["--max-batch 1"]) if b > 0]
        print(f"\nratio batching / no batching: {med['--max-batch 32'] / med['--max-batch 1']:.2f}x (medians); "
              f"per adjacent pair of rounds: median {np.median(pairs):.2f}x, range {min(pairs):.2f}-{max(pairs):.2f}x")
    finally:
        codes = (batching.stop(), single.stop())
        print(f"servers exited with {codes[0]} and {codes[1]} after SIGTERM")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each needs a selected ONNX variant and reference.npz)")
    p.add_argument("--requests", type=int, default=1500, help="latency samples per kind")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one throughput round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="the batching server's --max-delay-ms")
    args = p.parse_args()
    print(f"onnxpipe serving benchmark, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    for run_dir in args.runs:
        bench_run(run_dir, args)


if __name__ == "__main__":
    main()
