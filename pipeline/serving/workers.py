"""`onnxpipe serve --workers N`: N server processes on the same ports, so a multi-core machine serves more than one
core's worth (one process runs Python on one core at a time).

Each worker is a whole server (its own sessions, batchers, self-tests) listening on the shared REST and gRPC
ports with SO_REUSEPORT: the kernel spreads new connections over the workers. The parent only reserves the
ports, starts the workers, forwards SIGTERM and restarts a worker that dies after it started (one that dies
while starting stops them all: the same error would repeat). Each worker also listens on a private Unix
socket, through which the others reach it: a scrape of /metrics on any worker adds up every worker's numbers
(metrics.py says how each one combines), and a repository call (load, unload) is carried out on every worker
before it is answered. Readiness is each worker's own: a probe that reaches a worker tells whether that
worker can answer.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import orjson

log = logging.getLogger("onnxpipe.serve")

RESTART_GRACE_S = 10.0   # a worker that dies sooner than this after starting stops the server


class Peers:
    """The other workers, over their Unix sockets (HTTP/1.1, one request per connection)."""

    def __init__(self, folder: Path, index: int, count: int):
        self.folder, self.index, self.count = Path(folder), index, count

    def _sockets(self) -> list[tuple[int, Path]]:
        return [(i, self.folder / f"worker-{i}.sock") for i in range(self.count) if i != self.index]

    async def _request(self, path: Path, method: str, url: str, body: bytes = b"", timeout: float = 120.0):
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
        try:
            writer.write(f"{method} {url} HTTP/1.1\r\nHost: worker\r\nX-Onnxpipe-Forwarded: 1\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            data = await (reader.readexactly(length) if length is not None else reader.read())
            return status, orjson.loads(data) if data else {}
        finally:
            writer.close()

    async def snapshots(self) -> list[dict]:
        """The other workers' metrics (a worker that does not answer within 2 s is left out)."""
        async def one(path):
            try:
                status, data = await self._request(path, "GET", "/onnxpipe/worker/metrics", timeout=2.0)
                return data if status == 200 else None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                return None

        got = await asyncio.gather(*(one(p) for _, p in self._sockets()))
        return [g for g in got if g is not None]

    async def forward(self, method: str, url: str, body: bytes) -> list[tuple[int, int, dict]]:
        """The same repository call on every other worker: [(worker, status, answer)]."""
        async def one(i, path):
            try:
                status, data = await self._request(path, method, url, body)
                return i, status, data
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                return i, 503, {"error": f"worker {i} did not answer ({type(e).__name__})"}

        return list(await asyncio.gather(*(one(i, p) for i, p in self._sockets())))


def _worker(index: int, plan, folder: str, reserved: dict) -> None:
    """A worker process: its own models and server on the shared ports plus its private socket."""
    from .app import bind, configure_logging, serve

    configure_logging(prefix=f"onnxpipe[{index}]")
    cfg = replace(plan.cfg, port=reserved["port"], grpc_port=reserved.get("grpc_port"))
    sock = bind(cfg.host, cfg.port, reuse_port=True)
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(folder) / f"worker-{index}.sock"
    private.bind(str(path))
    private.listen(64)
    models = plan.models()
    code = serve(models, cfg, sources=plan.sources, tuned=plan.tuned, sockets=[sock, private],
                 peers=Peers(Path(folder), index, cfg.workers), worker=index, quiet_start=index > 0)
    sys.exit(code)


def _reserve(host: str, port: int | None) -> tuple[socket.socket | None, int | None]:
    """Hold a port (0: a free one) with SO_REUSEPORT and without listening: the workers bind it too."""
    if port is None:
        return None, None
    from .app import bind

    sock = bind(host, port, reuse_port=True, listen=False)
    return sock, sock.getsockname()[1]


def supervise(plan, models) -> int:
    """Start plan.cfg.workers workers; returns 0 after a graceful shutdown (SIGTERM / Ctrl-C)."""
    from .app import configure_logging, describe

    configure_logging()
    cfg = plan.cfg
    held = []
    rest, port = _reserve(cfg.host, cfg.port)
    held.append(rest)
    grpc_sock, grpc_port = _reserve(cfg.host, cfg.grpc_port)
    held.append(grpc_sock)
    reserved = {"port": port, "grpc_port": grpc_port}
    folder = tempfile.mkdtemp(prefix="onnxpipe-serve-")
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, tuple] = {}

    def start(i: int) -> None:
        path = Path(folder) / f"worker-{i}.sock"
        path.unlink(missing_ok=True)
        p = ctx.Process(target=_worker, args=(i, plan, folder, reserved), name=f"onnxpipe-worker-{i}", daemon=False)
        p.start()
        procs[i] = (p, time.monotonic())

    stopping = {"flag": False}

    def stop(signum, frame):
        stopping["flag"] = True
        for p, _ in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    for line in describe(models, cfg, cfg.host, port, grpc_port, plan.tuned):
        log.info("%s", line)
    log.info("%d workers (pids follow), each with %s ONNX Runtime thread(s) per model; ports shared with SO_REUSEPORT",
             cfg.workers, cfg.threads)
    try:
        for i in range(cfg.workers):
            start(i)
        log.info("worker pids: %s", ", ".join(str(p.pid) for p, _ in procs.values()))
        failed = False
        while True:
            time.sleep(0.2)
            if stopping["flag"]:
                break
            for i, (p, started) in list(procs.items()):
                if p.is_alive():
                    continue
                if time.monotonic() - started < RESTART_GRACE_S or p.exitcode == 0:
                    log.error("worker %d exited with status %s while starting; stopping the server", i, p.exitcode)
                    failed = True
                    stop(None, None)
                    break
                log.error("worker %d (pid %d) died with status %s; starting a new one", i, p.pid, p.exitcode)
                start(i)
            if failed:
                break
        codes = []
        for p, _ in procs.values():
            p.join(cfg.graceful_timeout_s + 10)
            if p.is_alive():
                p.kill()
                p.join()
            codes.append(p.exitcode)
        if failed or any(c != 0 for c in codes):
            log.error("workers exited with %s", codes)
            return 1
        log.info("shut down cleanly")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in held:
            if s is not None:
                s.close()
        shutil.rmtree(folder, ignore_errors=True)
