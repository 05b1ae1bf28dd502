"""Serving benchmark: `onnxpipe serve` on loopback, side by side in one run.

    python benchmarks/serving.py RUN [RUN ...] [--parts latency,batching,codec,workers] [--write]

For each run folder, in this process (the load generator; each server is an `onnxpipe serve` subprocess):

- latency: batch-1 requests one after another on one keep-alive connection (REST JSON, REST binary,
  gRPC with raw_input_contents), in blocks interleaved with blocks of raw `session.run` on the same file,
  so that the machine's noise hits all alike. Targets: gRPC p50 <= REST p50; both <= raw p50 + 1 ms.
- batching: `--clients` closed-loop connections (pipeline/serving/loadgen.py) sending batch-1 requests to
  a server with dynamic batching (--max-batch 32) and one without (--max-batch 1), in alternating rounds,
  binary and JSON.
- codec: the same JSON load on the server as it is (orjson) and on the server with the standard library's
  json in its place (benchmarks/stdlib_json_server.py), alternating rounds: what orjson buys, in
  requests/s and server CPU per request; plus the decode of one request body by itself.
- workers: `--workers 1` against `--workers 2` at `--worker-clients` clients (the base-size CNN is the
  target's model: compute-bound).

Server CPU per request (user + system time of the server's processes / answered requests) is given beside
the wall-clock rate because it is far less sensitive to the other tenants' load. --write puts the tables
into benchmarks/RESULTS.md between the onnxpipe-serving-scale markers. Never collected by pytest.
"""
from __future__ import annotations

import argparse
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

from onnxpipe.core.runtime import make_session  # noqa: E402
from onnxpipe.core.timing import time_interleaved  # noqa: E402
from onnxpipe.runfolder import Run  # noqa: E402
from onnxpipe.serving import loadgen  # noqa: E402

HERE = Path(__file__).resolve().parent
# every server starts from these (later flags win), so that a run's `onnxpipe tune` record changes nothing here
BASE = ["--max-batch", "32", "--max-delay-ms", "2", "--workers", "1"]


# --- the server ----------------------------------------------------------------------------------------

class Server:
    """`onnxpipe serve` (or another command line) in a subprocess, its log in a temporary file."""

    def __init__(self, run_dir: str, *extra: str, command: list[str] | None = None, workers: int = 1):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = command or [sys.executable, "-m", "onnxpipe.cli", "serve"]
        self.proc = subprocess.Popen([*cmd, run_dir, "--port", "0", "--device", "cpu", "--no-access-log", *BASE, *extra],
                                     stderr=self.log, stdout=subprocess.DEVNULL)
        self.port = self.grpc_port = None
        self.workers = workers
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {text[-2000:]}")
            if self.port is None and (m := re.search(r"on http://127\.0\.0\.1:(\d+)/", text)):
                self.port = int(m.group(1))
            if self.grpc_port is None and (m := re.search(r"gRPC \S+ on 127\.0\.0\.1:(\d+)", text)):
                self.grpc_port = int(m.group(1))
            if self.port is not None:
                metrics = self.get("/metrics")
                if re.search(rf"^onnxpipe_workers {workers}$", metrics, re.M) and \
                        re.search(r"^onnxpipe_model_ready 1$", metrics, re.M):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready: {Path(self.log.name).read_text()[-2000:]}")

    def get(self, path: str) -> str:
        return loadgen.get("127.0.0.1", self.port, path)[1].decode(errors="replace")

    def pids(self) -> list[int]:
        found = re.search(r"worker pids: ([\d, ]+)", Path(self.log.name).read_text())
        return [self.proc.pid] + ([int(p) for p in found.group(1).split(",")] if found else [])

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def rows_calls(self) -> np.ndarray:
        text = self.get("/metrics")
        return np.array([sum(float(v) for v in re.findall(rf"^onnxpipe_model_{k}_total\{{[^}}]*\}} (\S+)$", text, re.M))
                         for k in ("rows", "calls")])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        os.unlink(self.log.name)
        return code


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_round(server: Server, request: bytes, clients: int, seconds: float) -> dict:
    cpu0 = server.cpu_seconds()
    rc0 = server.rows_calls()
    r = loadgen.run_load("127.0.0.1", server.port, request, clients, seconds)
    rows, calls = server.rows_calls() - rc0
    out = r.to_json()
    out["cpu_ms"] = (server.cpu_seconds() - cpu0) * 1000 / max(r.ok, 1)
    out["rows_per_call"] = rows / max(calls, 1)
    return out


def alternate(servers: dict[str, Server], request: bytes, clients: int, seconds: float, rounds: int) -> dict[str, list[dict]]:
    for s in servers.values():  # warm-up
        loadgen.run_load("127.0.0.1", s.port, request, clients, min(seconds, 0.5))
    out = {k: [] for k in servers}
    for _ in range(rounds):
        for k, s in servers.items():
            out[k].append(load_round(s, request, clients, seconds))
    return out


def median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def summary_table(results: dict[str, list[dict]], title: str) -> list[str]:
    lines = [title, "", "| server | req/s (median) | per round | p50 ms | p99 ms | rows per ORT call | server CPU ms/request "
             "| errors (non-200) |", "|---|---|---|---|---|---|---|---|"]
    for k, rows in results.items():
        per_round = ", ".join(f"{r['rps']:.0f}" for r in rows)
        lines.append(f"| {k} | {median(rows, 'rps'):.0f} | {per_round} | "
                     f"{median(rows, 'p50_ms'):.2f} | {median(rows, 'p99_ms'):.2f} | {median(rows, 'rows_per_call'):.1f} | "
                     f"{median(rows, 'cpu_ms'):.3f} | {sum(r['errors'] for r in rows)} ({sum(r['non_200'] for r in rows)}) |")
    return lines


def ratio_line(results: dict[str, list[dict]], a: str, b: str) -> str:
    pairs = [x["rps"] / y["rps"] for x, y in zip(results[a], results[b]) if y["rps"] > 0]
    cpu = median(results[b], "cpu_ms") / max(median(results[a], "cpu_ms"), 1e-9)
    return (f"{a} / {b}: {median(results[a], 'rps') / max(median(results[b], 'rps'), 1e-9):.2f}x requests/s (medians; "
            f"per pair of rounds {np.median(pairs):.2f}x, range {min(pairs):.2f}-{max(pairs):.2f}x); "
            f"server CPU per request {b} / {a}: {cpu:.2f}x")


# --- the parts ------------------------------------------------------------------------------------------

def grpc_caller(port: int, model: str, input_name: str, x: np.ndarray):
    import grpc

    from onnxpipe.serving.oip import PACKAGE, SERVICE, messages

    M = messages()
    req = M.ModelInferRequest(model_name=model, raw_input_contents=[np.ascontiguousarray(x, "<f4").tobytes()])
    req.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    payload = req.SerializeToString()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(f"/{PACKAGE}.{SERVICE}/ModelInfer", request_serializer=lambda b: b,
                               response_deserializer=M.ModelInferResponse.FromString)
    live = channel.unary_unary(f"/{PACKAGE}.{SERVICE}/ServerLive", request_serializer=lambda b: b,
                               response_deserializer=M.ServerLiveResponse.FromString)
    call(payload)
    return (lambda: call(payload)), (lambda: live(b"")), channel


def part_latency(run_dir: str, run: Run, x: np.ndarray, args) -> list[str]:
    session = make_session(run.path(run.selected), device="cpu", threads=args.threads, spinning=False)
    feeds = {session.input_names[0]: x}
    server = Server(run_dir, "--grpc-port", "0", "--threads", str(args.threads))
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")

        def http(req: bytes):
            sock.sendall(req)
            status = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            if b" 200 " not in status:
                raise RuntimeError(status)

        name = session.input_names[0]
        rest = {k: loadgen.infer_request(run.model_name, name, x, binary=k == "binary") for k in ("json", "binary")}
        grpc_call, grpc_live, channel = grpc_caller(server.grpc_port, run.model_name, name, x)
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: bench\r\n\r\n"
        calls = {"raw session.run": lambda: session.inner.run(None, feeds),
                 "REST JSON": lambda: http(rest["json"]), "REST binary": lambda: http(rest["binary"]),
                 "gRPC (raw_input_contents)": grpc_call,
                 "REST GET /v2/health/live (no model)": lambda: http(live),
                 "gRPC ServerLive (no model)": grpc_live}
        lat = time_interleaved(calls, batch=1, warmup=50, runs=-(-args.requests // 49), block=50)
        channel.close()
        sock.close()
    finally:
        server.stop()
    raw = lat["raw session.run"].p50
    lines = [f"Batch-1 latency, one connection, requests one after another ({args.requests} per kind, blocks of 50 "
             f"interleaved; server --threads {args.threads}):", "",
             "| call | p50 ms | p90 ms | p99 ms | p50 - raw p50 |", "|---|---|---|---|---|"]
    for k, s in lat.items():
        lines.append(f"| {k} | {s.p50:.3f} | {s.p90:.3f} | {s.p99:.3f} | {s.p50 - raw:+.3f} |")
    g, b = lat["gRPC (raw_input_contents)"].p50, lat["REST binary"].p50
    lines += ["", f"gRPC p50 <= REST binary p50: {'met' if g <= b else 'missed'} ({g:.3f} vs {b:.3f} ms); "
              f"within raw + 1 ms: {'met' if max(g, b, lat['REST JSON'].p50) <= raw + 1 else 'missed'}. "
              f"The no-model calls are each protocol's floor on this server and client (a round trip that does "
              f"nothing): gRPC {lat['gRPC ServerLive (no model)'].p50:.3f} ms, REST "
              f"{lat['REST GET /v2/health/live (no model)'].p50:.3f} ms."]
    return lines


def part_batching(run_dir: str, run: Run, x: np.ndarray, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    servers = {"--max-batch 32": Server(run_dir, "--max-batch", "32", "--threads", str(args.threads)),
               "--max-batch 1": Server(run_dir, "--max-batch", "1", "--threads", str(args.threads))}
    lines = []
    try:
        for kind in ("binary", "json"):
            req = loadgen.infer_request(run.model_name, name, x, binary=kind == "binary")
            res = alternate(servers, req, args.clients, args.seconds, args.rounds)
            lines += summary_table(res, f"{args.clients} clients, batch-1 {kind} requests, {args.rounds} alternating "
                                        f"rounds of {args.seconds:g} s:") + ["", ratio_line(res, "--max-batch 32", "--max-batch 1"), ""]
    finally:
        for s in servers.values():
            s.stop()
    return lines


def part_codec(run_dir: str, run: Run, x: np.ndarray, args) -> list[str]:
    import json as std_json

    import orjson

    from onnxpipe.serving.protocol import parse_infer_request

    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    body = loadgen.infer_request(run.model_name, name, x, binary=False).split(b"\r\n\r\n", 1)[1]
    n = 2000
    t_or = min(_timeit(lambda: orjson.loads(body), n) for _ in range(3))
    t_std = min(_timeit(lambda: std_json.loads(body), n) for _ in range(3))
    t_parse = min(_timeit(lambda: parse_infer_request(body), n) for _ in range(3))
    servers = {"orjson (as shipped)": Server(run_dir, "--threads", str(args.threads)),
               "standard json": Server(run_dir, "--threads", str(args.threads),
                                       command=[sys.executable, str(HERE / "stdlib_json_server.py"), "serve"])}
    try:
        req = loadgen.infer_request(run.model_name, name, x, binary=False)
        res = alternate(servers, req, args.clients, args.seconds, args.rounds)
    finally:
        for s in servers.values():
            s.stop()
    return [f"JSON request body of {len(body) / 1024:.1f} KB ({x.size} numbers): decode alone, best of 3 x {n}: "
            f"standard json {t_std * 1000:.3f} ms, orjson {t_or * 1000:.3f} ms ({t_std / t_or:.1f}x); the whole "
            f"parse_infer_request with orjson {t_parse * 1000:.3f} ms.", ""] + \
        summary_table(res, f"{args.clients} clients, batch-1 JSON requests, {args.rounds} alternating rounds of "
                           f"{args.seconds:g} s:") + ["", ratio_line(res, "orjson (as shipped)", "standard json"), ""]


def _timeit(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def part_workers(run_dir: str, run: Run, x: np.ndarray, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    servers = {"--workers 2": Server(run_dir, "--workers", "2", "--threads", "1", workers=2),
               "--workers 1": Server(run_dir, "--workers", "1", "--threads", "1")}
    try:
        req = loadgen.infer_request(run.model_name, name, x, binary=True)
        res = alternate(servers, req, args.worker_clients, args.seconds, args.rounds)
    finally:
        for s in servers.values():
            s.stop()
    w2, w1 = median(res["--workers 2"], "rps"), median(res["--workers 1"], "rps")
    return summary_table(res, f"{args.worker_clients} clients, batch-1 binary requests, one ONNX Runtime thread per "
                              f"worker, {args.rounds} alternating rounds of {args.seconds:g} s (machine: "
                              f"{os.cpu_count()} CPUs, the load generator on the same cores):") + \
        ["", ratio_line(res, "--workers 2", "--workers 1"),
         f"target --workers 2 >= 1.6x one worker: {'met' if w2 >= 1.6 * w1 else 'missed'} ({w2 / max(w1, 1e-9):.2f}x)", ""]


PARTS = {"latency": part_latency, "batching": part_batching, "codec": part_codec, "workers": part_workers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each needs a selected ONNX variant and reference.npz)")
    p.add_argument("--parts", default="latency,batching,codec", help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--requests", type=int, default=1000, help="latency samples per kind")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one throughput round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--worker-clients", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="the servers' --threads (ONNX Runtime intra-op threads)")
    p.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = p.parse_args()
    parts = [s for s in args.parts.split(",") if s]
    out = [f"`python benchmarks/serving.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs, "
           f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} at the start."]
    for run_dir in args.runs:
        run = Run.open(run_dir)
        x = np.load(Path(run_dir) / "reference.npz")["inputs"][:1].astype(np.float32)
        out += ["", f"### {run.model_name} ({run_dir}, variant {run.selected}, input {list(x.shape)})", ""]
        for part in parts:
            lines = PARTS[part](run_dir, run, x, args)
            print("\n".join(lines), flush=True)
            out += lines + [""]
    out.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    text = "\n".join(out)
    print(text)
    if args.write:
        from results_md import write_section

        write_section(f"onnxpipe-serving-{'-'.join(parts)}", "\n".join(["## Serving at scale: " + ", ".join(parts), "", text]))


if __name__ == "__main__":
    main()
