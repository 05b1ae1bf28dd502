"""A bounded load generator for the KServe v2 REST endpoints: closed-loop clients over raw HTTP/1.1 sockets.

`concurrency` connections each send a request, read the whole answer and send the next, for
`seconds`; nothing is queued client-side, so the load can never run away (each connection has one
request in flight, and each request a timeout). Every answer's status and latency is recorded. The request
is one fixed request, or a function that gives each next request with its own answer callback (a mix of
requests, each answer checked against its own request: benchmarks/battery.py); an answer that says
`connection: close` is followed by a new connection.
Speaking HTTP over sockets keeps the client's own cost (a few tens of microseconds a request) out of
the numbers; `onnxpipe tune` and benchmarks/serving.py use it.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")
_CLOSE = re.compile(rb"(?im)^connection:\s*close")

OnAnswer = Callable[[int, bytes, bytes], None]   # (status, head, body) of every answer to one request
# one fixed request, or a function giving each next request and the callback its answer goes to
Requests = Union[bytes, Callable[[], "tuple[bytes, OnAnswer | None]"]]


def infer_request(model: str, input_name: str, x: np.ndarray, *, binary: bool = True, version: str | None = None,
                  host: str = "loadgen", request_id: str | None = None) -> bytes:
    """The raw HTTP request for one input tensor (FP32), JSON or binary (binary answers too); `request_id`
    is the request's `id`, which the answer echoes."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    ident = {"id": request_id} if request_id is not None else {}
    if binary:
        blob = np.ascontiguousarray(x, "<f4").tobytes()
        head = json.dumps({**ident, "inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                                "parameters": {"binary_data_size": len(blob)}}],
                           "parameters": {"binary_data_output": True}}).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(blob)}\r\n\r\n"
                ).encode() + head + blob
    body = json.dumps({**ident, "inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                            "data": x.ravel().tolist()}]}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)   # of the 200 answers
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0                                           # connections broken, timeouts

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def to_json(self) -> dict:
        return {"concurrency": self.concurrency, "rps": round(self.rps, 1), "p50_ms": round(self.percentile(50), 3),
                "p90_ms": round(self.percentile(90), 3), "p99_ms": round(self.percentile(99), 3), "ok": self.ok,
                "non_200": sum(n for s, n in self.statuses.items() if s != 200), "errors": self.errors}


_HEADER_LENGTH = re.compile(rb"(?im)^inference-header-content-length:\s*(\d+)")


async def read_answer(reader) -> tuple[int, bytes]:
    status, _, body = await read_full(reader)
    return status, body


_CHUNKED = re.compile(rb"(?im)^transfer-encoding:\s*chunked")


async def read_full(reader) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one answer: a Content-Length body or a chunked one."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = _LENGTH.search(head)
    if m:
        return status, head, await reader.readexactly(int(m.group(1)))
    if not _CHUNKED.search(head):
        return status, head, b""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, head, b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def split_answer(head: bytes, body: bytes) -> tuple[dict, bytes]:
    """(the answer's JSON, the binary outputs after it) of a KServe v2 infer answer."""
    m = _HEADER_LENGTH.search(head)
    n = int(m.group(1)) if m else len(body)
    return json.loads(body[:n]), body[n:]


async def _connect(host: str, port: int, timeout: float):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _client(host: str, port: int, request: Requests, stop_at: float, result: LoadResult, timeout: float,
                  check=None) -> None:
    writer = None
    try:
        reader, writer = await _connect(host, port, timeout)
        while time.perf_counter() < stop_at:
            raw, on_answer = request() if callable(request) else (request, None)
            t0 = time.perf_counter()
            writer.write(raw)
            status, head, body = await asyncio.wait_for(read_full(reader), timeout)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                if check is not None:
                    check(head, body)
            if on_answer is not None:
                on_answer(status, head, body)
            if status in (503, 504):
                await asyncio.sleep(0.001)
            if _CLOSE.search(head):  # the server ends this connection: go on with a new one
                writer.close()
                writer = None
                reader, writer = await _connect(host, port, timeout)
    except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        result.errors += 1
    finally:
        if writer is not None:
            writer.close()


async def drive(host: str, port: int, request: Requests, concurrency: int, seconds: float, *, timeout: float = 30.0,
                check=None) -> LoadResult:
    """`concurrency` closed-loop clients for `seconds` (on the running event loop); check(head, body) is called
    with every 200 answer, and a request function's callback with every answer to its request. A client whose
    connection breaks (or whose answer does not come within `timeout`) stops and counts one error."""
    result = LoadResult(concurrency, seconds)
    t0 = time.perf_counter()
    await asyncio.gather(*[_client(host, port, request, t0 + seconds, result, timeout, check)
                           for _ in range(concurrency)])
    result.seconds = time.perf_counter() - t0
    return result


def run_load(host: str, port: int, request: Requests, concurrency: int, seconds: float, **kw) -> LoadResult:
    return asyncio.run(drive(host, port, request, concurrency, seconds, **kw))


def get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a new connection (status, body); (0, b"") when nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: loadgen\r\nConnection: close\r\n\r\n".encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\r\n\r\n" in buf:
                    head, _, body = buf.partition(b"\r\n\r\n")
                    m = _LENGTH.search(head)
                    if m and len(body) >= int(m.group(1)):
                        return int(head.split(b" ", 2)[1]), body[:int(m.group(1))]
            head, _, body = buf.partition(b"\r\n\r\n")
            return (int(head.split(b" ", 2)[1]), body) if head else (0, b"")
    except OSError:
        return 0, b""
