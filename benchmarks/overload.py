"""Overload benchmark: what `onnxpipe serve` does when it gets far more than it can do, with its default limits.

    python benchmarks/overload.py RUN [--seconds 10] [--connections 1024] [--write]

Each part is measured against a fresh `onnxpipe serve RUN` subprocess (default settings: --max-queue 256,
--max-inflight-mb 64, --max-body-mb 32); a separate prober process asks GET /v2/health/live every 50 ms
on a new connection and samples the server's RSS every 20 ms throughout.

1. capacity: 32 closed-loop clients, batch-1 binary requests; then overload: `--connections` closed-loop
   connections with no pause between requests for `--seconds` (the offered rate is what they reach on
   this machine, given as a multiple of the capacity): status counts (zero 5xx other than 503/504 is
   the target), every 200 answer checked against the solo answer, liveness latency.
2. 48 concurrent 30 MB request bodies, binary and JSON: RSS growth (target < 100 MB) and status counts.
3. 3000 connections at once, one request each: how many answered, refused, and the largest queue.
4. 300 concurrent 1 MB JSON requests: liveness latency while they arrive (target: within 50 ms).
5. slow clients: a connection that sends half its headers, one that sends half its body (closed after
   --header-timeout-s / --body-timeout-s); and the latency of a lone request while a half-sent request is
   open (the batcher does not wait for it).
Never collected by pytest.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import Server  # noqa: E402

from onnxpipe.core.runtime import make_session  # noqa: E402
from onnxpipe.runfolder import Run  # noqa: E402
from onnxpipe.serving import loadgen  # noqa: E402

PROBER = r'''
import json, socket, sys, time
port, pid, out, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import os
lat, rss, t_next, t_start = [], [], 0.0, time.monotonic()
def vmrss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
while not os.path.exists(stop):
    now = time.monotonic()
    if now >= t_next:
        t_next = now + 0.05
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            ok = data.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        lat.append(((time.perf_counter() - t0) * 1000, ok, round(now - t_start, 2)))
    try:
        rss.append(vmrss())
    except OSError:
        pass
    time.sleep(0.02)
json.dump({"live_ms": lat, "rss_mb": rss}, open(out, "w"))
'''


class Prober:
    def __init__(self, server: Server):
        self.out = f"/tmp/onnxpipe-prober-{os.getpid()}-{time.monotonic_ns()}.json"
        self.stop_file = self.out + ".stop"
        self.proc = subprocess.Popen([sys.executable, "-c", PROBER, str(server.port), str(server.proc.pid), self.out,
                                      self.stop_file])
        time.sleep(0.3)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:  # finish() was not reached
            self.proc.kill()
            self.proc.wait()
        return False

    def finish(self) -> dict:
        Path(self.stop_file).touch()
        self.proc.wait(30)
        data = json.loads(Path(self.out).read_text())
        Path(self.out).unlink()
        Path(self.stop_file).unlink()
        live = [ms for ms, _, _ in data["live_ms"]]
        slowest = sorted(data["live_ms"], reverse=True)[:3]
        return {"live_max_ms": max(live) if live else None, "live_p99_ms": float(np.percentile(live, 99)) if live else None,
                "live_failed": sum(1 for _, ok, _ in data["live_ms"] if not ok), "live_probes": len(live),
                "live_slowest": [(round(ms, 1), at) for ms, _, at in slowest],
                "rss_start_mb": data["rss_mb"][0] if data["rss_mb"] else None,
                "rss_peak_mb": max(data["rss_mb"]) if data["rss_mb"] else None}


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def answer_checker(want: np.ndarray, counts: dict):
    def check(head: bytes, body: bytes) -> None:
        doc, blob = loadgen.split_answer(head, body)
        out = doc["outputs"][0]
        got = np.asarray(out["data"], np.float32) if "data" in out else np.frombuffer(blob, "<f4")
        counts["checked"] += 1
        if not np.allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5):
            counts["wrong"] += 1
    return check


def part_idle(run_dir, run, x, want, args) -> list[str]:
    """The liveness probe against an idle server: what this machine's other load alone costs a probe."""
    server = Server(run_dir)
    try:
        with Prober(server) as prober:
            time.sleep(args.seconds)
            probe = prober.finish()
    finally:
        server.stop()
    return [f"Baseline, idle server for {args.seconds:g} s: {probe['live_probes']} liveness probes, max "
            f"{probe['live_max_ms']:.1f} ms, p99 {probe['live_p99_ms']:.1f} ms (the machine's other load only)."]


def part_overload(run_dir, run, x, want, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    req = loadgen.infer_request(run.model_name, name, x, binary=True)
    server = Server(run_dir)
    try:
        cap = loadgen.run_load("127.0.0.1", server.port, req, 32, 3.0)
        counts = {"checked": 0, "wrong": 0}
        lag0 = loop_lag(server)
        with Prober(server) as prober:
            res = loadgen.run_load("127.0.0.1", server.port, req, args.connections, args.seconds, timeout=60,
                                   check=answer_checker(want, counts))
            probe = prober.finish()
        lag = loop_lag(server) - lag0
    finally:
        server.stop()
    offered = sum(res.statuses.values()) / res.seconds
    other_5xx = sum(n for s, n in res.statuses.items() if s >= 500 and s not in (503, 504))
    return [f"Capacity: {cap.rps:.0f} req/s (32 clients, batch-1 binary, p99 {cap.percentile(99):.1f} ms). Overload: "
            f"{args.connections} connections without pause for {res.seconds:.1f} s: offered {offered:.0f} req/s "
            f"({offered / max(cap.rps, 1):.1f}x capacity), answered 200: {res.ok} ({res.rps:.0f}/s), statuses "
            f"{dict(sorted(res.statuses.items()))}, connection errors {res.errors}; 5xx other than 503/504: {other_5xx} "
            f"(target 0: {'met' if other_5xx == 0 else 'missed'}); 200 answers checked against the solo answer: "
            f"{counts['checked']}, wrong: {counts['wrong']}; liveness: {probe['live_probes']} probes, max "
            f"{probe['live_max_ms']:.1f} ms, p99 {probe['live_p99_ms']:.1f} ms, failed {probe['live_failed']} "
            f"(target within 50 ms: {'met' if probe['live_max_ms'] <= 50 and not probe['live_failed'] else 'missed'}; "
            f"the slowest (ms, s after the prober started): {probe['live_slowest']}); "
            f"RSS {probe['rss_start_mb']:.0f} -> peak {probe['rss_peak_mb']:.0f} MB; the server's event loop ran "
            f"its 50 ms timer late by more than 10 ms {lag[0]:.0f} times, by more than 50 ms {lag[1]:.0f} times, of "
            f"{lag[2]:.0f}."]


def loop_lag(server: Server) -> np.ndarray:
    """(timer checks late by > 10 ms, by > 50 ms, all checks) from onnxpipe_event_loop_lag_seconds."""
    import re

    text = server.get("/metrics")
    def bucket(le):
        m = re.search(rf'^onnxpipe_event_loop_lag_seconds_bucket\{{le="{re.escape(le)}"\}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0
    total = bucket("+Inf")
    return np.array([total - bucket("0.01"), total - bucket("0.05"), total])


async def _big(port: int, request: bytes) -> int:
    """Send one large request, read the status (0: the connection broke before any answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status = 0
    try:
        writer.write(request)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 300)
        status = int(head.split(b" ", 2)[1])
    except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
    return status


def part_big_bodies(run_dir, run, x, want, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    rows = 30 * 2**20 // x[0].nbytes
    big = np.repeat(x, rows, axis=0)
    lines = []
    per_row_json = len(loadgen.infer_request(run.model_name, name, x, binary=False)) / len(x)
    for kind in ("binary", "json"):
        arr = big if kind == "binary" else big[: max(1, int(30 * 2**20 / per_row_json))]  # ~30 MB of JSON text
        req = loadgen.infer_request(run.model_name, name, arr, binary=kind == "binary")
        server = Server(run_dir)
        try:
            base = rss_mb(server.proc.pid)

            async def main():
                return await asyncio.gather(*[_big(server.port, req) for _ in range(48)])

            with Prober(server) as prober:
                statuses = asyncio.run(main())
                probe = prober.finish()
        finally:
            server.stop()
        growth = probe["rss_peak_mb"] - base
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        lines.append(f"48 concurrent {kind} bodies of {len(req) / 2**20:.1f} MB ({len(arr)} rows each): RSS {base:.0f} -> "
                     f"peak {probe['rss_peak_mb']:.0f} MB (+{growth:.0f} MB; target < 100 MB: "
                     f"{'met' if growth < 100 else 'missed'}); statuses {counts} (0: the server closed the connection "
                     f"after answering 503 before the body was sent); liveness max {probe['live_max_ms']:.1f} ms.")
    return lines


async def _one_shot(port: int, request: bytes, results: list) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        results.append("connect failed")
        return
    try:
        writer.write(request)
        status, _ = await asyncio.wait_for(loadgen.read_answer(reader), 120)
        results.append(status)
    except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        results.append(type(e).__name__)
    finally:
        writer.close()


def part_connections(run_dir, run, x, want, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    req = loadgen.infer_request(run.model_name, name, x, binary=True)
    server = Server(run_dir)
    try:
        import re

        results: list = []
        peak = {"queue": 0}

        async def watch():
            while len(results) < 3000:
                text = await asyncio.get_running_loop().run_in_executor(None, server.get, "/metrics")
                m = re.search(r"^onnxpipe_queue_depth (\S+)$", text, re.M)
                if m:
                    peak["queue"] = max(peak["queue"], float(m.group(1)))
                await asyncio.sleep(0.01)

        async def main():
            w = asyncio.ensure_future(watch())
            await asyncio.gather(*[_one_shot(server.port, req, results) for _ in range(3000)])
            await asyncio.wait_for(w, 10)

        t0 = time.perf_counter()
        asyncio.run(main())
        took = time.perf_counter() - t0
    finally:
        server.stop()
    counts = {str(s): results.count(s) for s in sorted(set(results), key=str)}
    return [f"3000 connections at once, one batch-1 request each: {counts} in {took:.1f} s; largest queue depth seen "
            f"{peak['queue']:.0f} (--max-queue 256)."]


def part_json_liveness(run_dir, run, x, want, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    rows = max(1, (1 << 20) // (x[0].size * 12))
    req = loadgen.infer_request(run.model_name, name, np.repeat(x, rows, axis=0), binary=False)
    server = Server(run_dir)
    try:
        results: list = []

        async def main():
            await asyncio.gather(*[_one_shot(server.port, req, results) for _ in range(300)])

        with Prober(server) as prober:
            t0 = time.perf_counter()
            asyncio.run(main())
            took = time.perf_counter() - t0
            probe = prober.finish()
    finally:
        server.stop()
    counts = {str(s): results.count(s) for s in sorted(set(results), key=str)}
    return [f"300 concurrent JSON requests of {len(req) / 2**20:.2f} MB ({rows} rows): {counts} in {took:.1f} s; "
            f"liveness {probe['live_probes']} probes, max {probe['live_max_ms']:.1f} ms, p99 {probe['live_p99_ms']:.1f} ms "
            f"(target within 50 ms: {'met' if probe['live_max_ms'] <= 50 else 'missed'})."]


def part_slow(run_dir, run, x, want, args) -> list[str]:
    name = make_session(run.path(run.selected), device="cpu", threads=1).input_names[0]
    req = loadgen.infer_request(run.model_name, name, x, binary=True)
    server = Server(run_dir, "--header-timeout-s", "2", "--body-timeout-s", "2")
    out = []
    try:
        path = f"/v2/models/{run.model_name}/infer".encode()
        for what, first in (("half the headers", b"POST " + path + b" HTTP/1.1\r\nHost: a\r\n"),
                            ("half the body", b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 9000\r\n\r\n{")):
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
                s.sendall(first)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            out.append(f"a client that sends {what} and waits: answered {data[:12].decode()!r} and closed after "
                       f"{time.perf_counter() - t0:.1f} s (--header-timeout-s 2 / --body-timeout-s 2 here; defaults 10 / 60).")

        def lone(n=200):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = sock.makefile("rb")
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                sock.sendall(req)
                f.readline()
                length = 0
                while (line := f.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
                times.append((time.perf_counter() - t0) * 1000)
            sock.close()
            return float(np.median(times[20:]))

        alone = lone()
        with socket.create_connection(("127.0.0.1", server.port)) as half:
            half.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 9000\r\n\r\n{")
            time.sleep(0.1)
            beside = lone(150)   # within the 2 s body timeout
        out.append(f"lone batch-1 request p50 {alone:.3f} ms; with a half-sent request open beside it {beside:.3f} ms "
                   "(--max-delay-ms 2: the batcher does not wait for a body that has not arrived).")
    finally:
        server.stop()
    return out


PARTS = {"idle": part_idle, "overload": part_overload, "big": part_big_bodies, "connections": part_connections,
         "json-liveness": part_json_liveness, "slow": part_slow}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder with a selected ONNX variant")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=1024)
    p.add_argument("--write", action="store_true", help="write into benchmarks/RESULTS.md (onnxpipe-serving-overload)")
    args = p.parse_args()
    run = Run.open(args.run)
    x = np.load(Path(args.run) / "reference.npz")["inputs"][:1].astype(np.float32)
    want = make_session(run.path(run.selected), device="cpu", threads=1)(x)
    out = [f"`python benchmarks/overload.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs, "
           f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} at the start; model "
           f"{run.model_name}, variant {run.selected}; server defaults (--max-queue 256, --max-inflight-mb 64, "
           "--max-body-mb 32, one worker, ONNX Runtime threads = all cores).", ""]
    for part in args.parts.split(","):
        lines = PARTS[part](args.run, run, x, want, args)
        print("\n".join(lines), flush=True)
        out += [f"- {line}" for line in lines]
    out.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    if args.write:
        from results_md import write_section

        write_section("onnxpipe-serving-overload", "\n".join(["## Serving under overload (benchmarks/overload.py)", "", *out]))
    print("\n".join(out))


if __name__ == "__main__":
    main()
