"""The HTTP server: KServe v2 REST endpoints (Starlette on uvicorn), access log, metrics, graceful exit.

    GET  /v2                                         server metadata
    GET  /v2/health/live | /v2/health/ready          200 true, 400 false (the protocol's convention)
    GET  /v2/models/{name}[/versions/{v}]            model metadata (+ providers, self-test, shadow)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer      JSON or binary tensors, dynamically batched
    POST /v2/repository/index                        every model and version, with state and reason
    POST /v2/repository/models/{name}/load|unload    load or reload / unload a model (repository extension)
    GET  /metrics                                    Prometheus text (all workers)

Every error is {"error": "..."} with a 4xx (the client's mistake), a 503 with Retry-After (busy:
try again), a 504 (the request's deadline passed) or a 500 (ours); tracebacks go to the server log
only. Models load on a thread after the port opens: live at once, ready only once model.py's sha256
check and self-test passed. gRPC (grpc_server.py) runs on the same event loop, over the same
repository, batchers and metrics.

Backpressure and slow clients (README, "Overload"): a request is admitted before its body is read,
or refused at once with 503 + Retry-After when its model version's queue is full (--max-queue) or
too many body bytes are in flight (--max-inflight-mb); an admitted request's deadline (--timeout-ms)
is answered 504 and its queued work dropped, and so is the work of a client that disconnects;
bodies are decoded on a thread above a size, so health probes answer in milliseconds under load;
headers and bodies that do not arrive in time (--header-timeout-s, --body-timeout-s) close the
connection (408), and the batcher only waits for requests whose bodies are complete.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..errors import ConfigError
from .batcher import InferenceError
from .config import ServeConfig
from .metrics import CONTENT_TYPE, ServerMetrics
from .model import ServedModel
from .protocol import HEADER_LENGTH, NonFiniteOutput, RequestError, encode_infer_response, parse_infer_request
from .repository import OFFLOAD_BYTES, ClientGone, Overloaded, Repository, Source, Sources, deadline as _deadline

log = logging.getLogger("onnxpipe.serve")
access_log = logging.getLogger("onnxpipe.access")

CLIENT_CLOSED = 499      # nginx's code for "client closed the request": logged, never seen by the client
OFFLOAD_JSON = 64 << 10   # JSON parts larger than this are decoded on a thread: the event loop stays responsive
CLOSE_AFTER = 1 << 20     # answering before a body this much larger arrived closes the connection


def _server_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("onnxpipe")
    except md.PackageNotFoundError:
        return "0+unknown"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _error(request: Request | None, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    if request is not None:
        request.scope["onnxpipe.error"] = message  # for the access log
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _route_of(path: str) -> str:
    """A low-cardinality label for metrics: the endpoint, not the URL."""
    if path.startswith("/v2/models/"):
        return "infer" if path.endswith("/infer") else "model_ready" if path.endswith("/ready") else "model_metadata"
    if path.startswith("/v2/repository/"):
        return "repository"
    return {"/v2": "server_metadata", "/v2/health/live": "live", "/v2/health/ready": "ready",
            "/metrics": "metrics"}.get(path, "other")


class Observe:
    """ASGI middleware: metrics and one JSON access-log line per request."""

    def __init__(self, app, metrics: ServerMetrics, log_requests: bool, worker: int | None = None):
        self.app, self.metrics, self.log_requests, self.worker = app, metrics, log_requests, worker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        seen = {"status": 500, "out": 0}

        async def send_observed(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.add(1)
        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.metrics.in_flight.add(-1)
            seconds = time.perf_counter() - t0
            route = _route_of(scope["path"])
            self.metrics.requests.inc(route, seen["status"])
            self.metrics.latency.observe(seconds, route)
            if "onnxpipe.model" in scope:
                self.metrics.model_requests.inc(*scope["onnxpipe.model"], "rest", seen["status"])
            if self.log_requests:
                client = scope.get("client")
                entry = {"ts": round(time.time(), 6), "client": f"{client[0]}:{client[1]}" if client else None,
                         "method": scope["method"], "path": scope["path"], "status": seen["status"],
                         "ms": round(seconds * 1000, 3), "bytes_out": seen["out"]}
                if "onnxpipe.rows" in scope:
                    entry["rows"] = scope["onnxpipe.rows"]
                if "onnxpipe.error" in scope:
                    entry["error"] = scope["onnxpipe.error"]
                if self.worker is not None:
                    entry["worker"] = self.worker
                access_log.info(orjson.dumps(entry).decode())


def _declared_length(request: Request, limit: int) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise RequestError(f"Content-Length must be a number of bytes, got {declared!r}")
    if int(declared) > limit:
        raise RequestError(f"request body of {int(declared)} bytes is over the limit of {limit} bytes; "
                           "send fewer rows per request or start the server with a larger --max-body-mb", 413)
    return int(declared)


async def _read_body(request: Request, limit: int, declared: int | None, ticket) -> bytes | bytearray:
    """The whole body: into one buffer of the declared size (no second copy), else chunk by chunk, each
    chunk charged to the in-flight budget as it arrives."""
    receive = request.receive
    if declared is not None:
        buf, filled = bytearray(declared), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            buf[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
            if not message.get("more_body", False):
                return buf
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes; send fewer rows per request "
                               "or start the server with a larger --max-body-mb", 413)
        if chunk:
            ticket.grow(len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _sources_for(models: Sequence[ServedModel]) -> Sources:
    out = []
    for m in models:
        pinned = m.variant if m.variant != m.run.selected else None
        out.append(Source(m.name, m.version, m.run.root.resolve(), pinned))
    return Sources(out)


def create_app(models: ServedModel | Sequence[ServedModel], cfg: ServeConfig, *, load: Callable[[], None] | None = None,
               on_fatal: Callable[[BaseException], None] | None = None, sources: Sources | None = None,
               peers=None, worker: int | None = None) -> Observe:
    """The ASGI app for one or several models. `load` (default: the first model's load) runs on a thread at
    start-up; `sources` says where load/reload find models (default: the given models' run folders);
    `peers` (workers.py) reaches the other workers for /metrics and the repository API."""
    models = [models] if isinstance(models, ServedModel) else list(models)
    metrics = ServerMetrics()
    metrics.workers.set(1)
    first = models[0] if models else None
    repo = Repository(sources or _sources_for(models), cfg, metrics, models, load=load, on_fatal=on_fatal,
                      device=first.device if first else "auto", threads=cfg.threads)
    server_info = {"name": "onnxpipe", "version": _server_version(),
                   "extensions": ["binary_tensor_data", "model_repository"]}
    decode_pool = ThreadPoolExecutor(2, thread_name_prefix="onnxpipe-decode")
    timeout_s = cfg.timeout_ms / 1000 if cfg.timeout_ms > 0 else None

    def find(request: Request):
        dep = repo.resolve(request.path_params["name"], request.path_params.get("version"))
        request.scope["onnxpipe.model"] = dep.labels
        return dep

    def endpoint(fn):
        async def guarded(request: Request):
            try:
                return await fn(request)
            except Overloaded as e:
                return _error(request, 503, str(e), {"retry-after": str(e.retry_after)})
            except RequestError as e:
                return _error(request, e.status, str(e), {"retry-after": "1"} if e.status == 503 else None)
            except (InferenceError, NonFiniteOutput) as e:
                return _error(request, 500, str(e))
            except ClientDisconnect:  # the client went away mid-request: nobody to answer, nothing broke
                if request.scope.get("onnxpipe.timeout") == "body":
                    return _error(request, 408, f"the request body did not arrive within --body-timeout-s "
                                                f"{cfg.body_timeout_s:g}; the connection was closed")
                log.info("client disconnected during %s %s", request.method, request.url.path)
                return _error(request, CLIENT_CLOSED, "client disconnected before the request was complete")
            except Exception as e:  # a bug of ours: log the traceback here, never send it
                log.exception("internal error on %s %s", request.method, request.url.path)
                return _error(request, 500, f"internal server error ({type(e).__name__}); see the server log")
        return guarded

    @endpoint
    async def server_metadata(request: Request):
        return JSONResponse(server_info)

    @endpoint
    async def live(request: Request):
        return JSONResponse({"live": True})

    @endpoint
    async def ready(request: Request):
        ok, reason = repo.readiness()
        if ok:
            return JSONResponse({"ready": True})
        request.scope["onnxpipe.error"] = reason
        return JSONResponse({"ready": False, "error": reason}, status_code=400)

    @endpoint
    async def model_metadata(request: Request):
        dep = find(request)
        meta = dep.metadata()
        meta["versions"] = repo.versions(dep.model.name)
        return JSONResponse(meta)

    @endpoint
    async def model_ready(request: Request):
        dep = find(request)
        if dep.ready:
            return JSONResponse({"name": dep.model.name, "ready": True})
        reason = repo.not_ready_reason(dep)
        request.scope["onnxpipe.error"] = reason
        return JSONResponse({"name": dep.model.name, "ready": False, "error": reason}, status_code=400)

    def decode(dep, body, header_length):
        req = parse_infer_request(body, header_length)
        return req, dep.model.feeds(req)

    @endpoint
    async def infer(request: Request):
        loop = asyncio.get_running_loop()
        started = loop.time()
        dep = find(request)
        m = dep.model
        if not m.ready:
            raise RequestError(repo.not_ready_reason(dep), 503)
        declared = _declared_length(request, cfg.max_body_bytes)
        header_length = request.headers.get(HEADER_LENGTH)
        try:
            ticket = repo.admit(dep, declared or 0, header_length is None)
        except Overloaded as e:
            close = declared is not None and declared > CLOSE_AFTER
            return _error(request, 503, str(e), {"retry-after": str(e.retry_after), **({"connection": "close"} if close else {})})
        state: dict = {}
        try:
            with ticket:
                async with _deadline(started + timeout_s if timeout_s else None):
                    return await answer(request, dep, declared, header_length, ticket, state)
        except TimeoutError:
            repo.metrics.dropped.inc(m.name, "deadline")
            where = "it was queued or running" if "future" in state else "its body was being read or decoded"
            return _error(request, 504, f"the request's deadline (--timeout-ms {cfg.timeout_ms:g}) passed while {where} "
                                        f"({(loop.time() - started) * 1000:.1f} ms after it arrived); its queued work "
                                        "was dropped: retry later, send fewer rows, or raise --timeout-ms")
        except ClientGone:
            repo.metrics.dropped.inc(m.name, "disconnect")
            log.info("client disconnected while its request to %s was queued or running: dropped", m.name)
            return _error(request, CLIENT_CLOSED, "client disconnected before the answer; its queued work was dropped")

    def offload(body, header_length: str | None) -> bool:
        """Decode on a thread: a large body, or a large JSON part (plain JSON, or a binary request's header)."""
        if len(body) > OFFLOAD_BYTES:
            return True
        if header_length is None:
            return len(body) > OFFLOAD_JSON
        return header_length.isdigit() and int(header_length) > OFFLOAD_JSON

    async def answer(request: Request, dep, declared, header_length, ticket, state: dict) -> Response:
        loop = asyncio.get_running_loop()
        m = dep.model
        body = await _read_body(request, cfg.max_body_bytes, declared, ticket)
        with dep.batcher.arriving() as arrival:  # its body is here: a batch may wait for it
            if offload(body, header_length):
                req, arrays = await loop.run_in_executor(decode_pool, decode, dep, body, header_length)
            else:
                req, arrays = decode(dep, body, header_length)
            request.scope["onnxpipe.rows"] = int(arrays[0].shape[0])
            fut = state["future"] = dep.batcher.enqueue(arrays, arrival)

        def gone():  # called by the connection when the client disconnects
            if not fut.done():
                fut.set_exception(ClientGone())

        request.scope["onnxpipe.on_disconnect"] = gone
        outputs = await fut
        del request.scope["onnxpipe.on_disconnect"]
        if dep.shadow is not None:
            dep.shadow.offer(arrays, outputs)
        wanted = list(req.outputs) if req.outputs is not None else [o.name for o in m.outputs]
        index = {o.name: i for i, o in enumerate(m.outputs)}
        named = [(n, m.outputs[index[n]].datatype, outputs[index[n]]) for n in wanted]
        if sum(a.nbytes for _, _, a in named) > OFFLOAD_BYTES:
            payload, headers = await loop.run_in_executor(decode_pool, encode_infer_response, m.name, m.version, req,
                                                          named)
        else:
            payload, headers = encode_infer_response(m.name, m.version, req, named)
        return Response(payload, headers=headers)

    async def _forward(request: Request, fn):
        """A repository operation on this worker, then on the other workers (--workers)."""
        result = await fn()
        if peers is not None and not request.headers.get("x-onnxpipe-forwarded"):
            body = await request.body()
            for peer, status, data in await peers.forward(request.method, request.url.path, body):
                if status >= 300:
                    raise RequestError(f"worker {peer}: {data.get('error', data)}", status)
        return result

    @endpoint
    async def repository_index(request: Request):
        body = await request.body()
        try:
            params = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(params, dict) or not isinstance(params.get("ready", False), bool):
            raise RequestError('the index request body is {} or {"ready": true|false}')
        return JSONResponse(repo.index(ready_only=params.get("ready", False)))

    @endpoint
    async def repository_load(request: Request):
        name = request.path_params["name"]
        results = await _forward(request, lambda: repo.load(name))
        failed = {v: r for v, r in results.items() if r.startswith("failed")}
        if failed:
            raise RequestError(f"model {name!r}: " + "; ".join(f"version {v} {r}" for v, r in sorted(failed.items())), 400)
        return JSONResponse({"name": name, "versions": results})

    @endpoint
    async def repository_unload(request: Request):
        name = request.path_params["name"]
        await _forward(request, lambda: repo.unload(name))
        return JSONResponse({"name": name, "unloaded": True})

    @endpoint
    async def prometheus(request: Request):
        others = []
        if peers is not None and not request.headers.get("x-onnxpipe-forwarded"):
            others = await peers.snapshots()
        return Response(metrics.render(others), media_type=CONTENT_TYPE)

    @endpoint
    async def snapshot(request: Request):
        return JSONResponse(metrics.snapshot())

    ready_page = {True: orjson.dumps({"ready": True})}
    infer_path = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")

    def fast_lane(method: bytes, path: str, headers: list) -> tuple[int, bytes, dict, bool] | None:
        """Answers the connection gives itself, without the ASGI app: liveness and readiness, and the refusal of
        an infer request that cannot be admitted (full queue, bytes in flight). Under overload these are most
        of the requests; answered here they cost a fraction of a full request, so probes stay fast and the
        requests that are admitted keep the CPU. Returns (status, body, headers, close) or None."""
        t0 = time.perf_counter()
        if method == b"GET" and path == "/v2/health/live":
            status, body, extra, route = 200, b'{"live":true}', {}, "live"
        elif method == b"GET" and path == "/v2/health/ready":
            ok, reason = repo.readiness()
            status, body, extra, route = (200, ready_page[True], {}, "ready") if ok else \
                (400, orjson.dumps({"ready": False, "error": reason}), {}, "ready")
        elif method == b"POST" and (m := infer_path.match(path)):
            try:
                dep = repo.resolve(m.group(1), m.group(2))
            except RequestError:
                return None
            if not dep.ready:
                return None
            found = {k: v for k, v in headers if k in (b"content-length", HEADER_LENGTH.encode())}
            declared = found.get(b"content-length", b"0")
            if not declared.isdigit():
                return None
            refused = repo.refusal(dep, int(declared), HEADER_LENGTH.encode() not in found)
            if refused is None:
                return None
            status, route = 503, "infer"
            body = orjson.dumps({"error": str(refused)})
            extra = {"retry-after": str(refused.retry_after)}
            metrics.model_requests.inc(*dep.labels, "rest", 503)
        else:
            return None
        seconds = time.perf_counter() - t0
        metrics.requests.inc(route, status)
        metrics.latency.observe(seconds, route)
        if cfg.access_log:
            entry = {"ts": round(time.time(), 6), "method": method.decode(), "path": path, "status": status,
                     "ms": round(seconds * 1000, 3), "bytes_out": len(body)}
            if status >= 400:
                entry["error"] = orjson.loads(body)["error"]
            if worker is not None:
                entry["worker"] = worker
            access_log.info(orjson.dumps(entry).decode())
        close = route == "infer" and int(declared) > CLOSE_AFTER
        return status, body, extra, close

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            names = repo.names()
            one = names[0] if names else "NAME"
            msg = (f"no endpoint {request.url.path}; see /v2, /v2/health/live, /v2/health/ready, "
                   f"/v2/models/{one}[/versions/N][/ready|/infer], /v2/repository/index, /metrics")
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return _error(request, exc.status_code, msg)

    grpc_holder = {}

    async def watch_the_loop():
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.05
            await asyncio.sleep(0.05)
            metrics.loop_lag.observe(max(0.0, loop.time() - due))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        repo.start()
        lag = asyncio.get_running_loop().create_task(watch_the_loop())
        if cfg.grpc_port is not None:
            from .grpc_server import start_grpc

            grpc_holder["server"], app.state.grpc_port = await start_grpc(repo, cfg, metrics, server_info)
        yield
        lag.cancel()
        if "server" in grpc_holder:
            await grpc_holder["server"].stop(cfg.graceful_timeout_s)
        await repo.stop(cfg.graceful_timeout_s)  # in-flight requests have finished by now
        decode_pool.shutdown(wait=False)

    routes = [Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/metrics", prometheus), Route("/v2/repository/index", repository_index, methods=["POST"]),
              Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
              Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
              Route("/onnxpipe/worker/metrics", snapshot)]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(base, model_metadata), Route(base + "/ready", model_ready),
                   Route(base + "/infer", infer, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: http_error, 405: http_error})
    app.state.repository, app.state.metrics, app.state.grpc_port = repo, metrics, None
    if models:  # the first model's first deployment (tests and notebooks reach into it)
        dep = repo.table[models[0].name][models[0].version]
        app.state.model, app.state.batcher = dep.model, dep.batcher
    observed = Observe(app, metrics, cfg.access_log, worker)
    observed.state = app.state
    observed.fast_lane = fast_lane
    return observed


# --- the connection: read timeouts and disconnects ----------------------------------------------------------

class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read timeouts (uvicorn has none for headers or bodies: a client
    sending one byte a second held a connection, and a request, forever) and a disconnect callback for the
    request being answered (the app drops its queued work)."""

    header_timeout = 10.0
    body_timeout = 60.0
    fast_lane = None   # create_app's fast_lane: answers given here, without an ASGI task
    _fast = False      # the request being read was answered by the fast lane: its body is discarded

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_timer = self.loop.call_later(self.header_timeout, self._timed_out, "headers")

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._timed_out, what)

    def _disarm(self) -> None:
        timer = getattr(self, "_read_timer", None)
        if timer is not None:
            timer.cancel()
            self._read_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout, "headers")

    def on_headers_complete(self) -> None:
        if self.fast_lane is not None and (self.cycle is None or self.cycle.response_complete) and not self.pipeline:
            import httptools

            path = httptools.parse_url(self.url).path.decode("ascii", "replace")
            answer = self.fast_lane(self.parser.get_method(), path, self.headers)
            if answer is not None:
                status, body, extra, close = answer
                close = close or not self.parser.should_keep_alive()
                head = [STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
                        str(len(body)).encode(), b"\r\n"]
                head += [f"{k}: {v}\r\n".encode() for k, v in extra.items()]
                head.append(b"connection: close\r\n\r\n" if close else b"\r\n")
                self.transport.write(b"".join(head) + body)
                if close:
                    self.transport.close()
                    return
                self._fast = True
                self._arm(self.body_timeout, "body")  # a body still to come is read and discarded, in time
                if status == 503:  # hold the client to its Retry-After: this connection is not read meanwhile,
                    self.flow.pause_reading()  # so a client retrying at once cannot flood the event loop; the
                    # jitter keeps the connections refused together from all coming back in the same instant
                    self.loop.call_later(float(extra.get("retry-after", 1)) * (1 + 0.5 * random.random()),
                                         self.flow.resume_reading)
                return
        super().on_headers_complete()
        self._arm(self.body_timeout, "body")

    def on_body(self, body: bytes) -> None:
        if not self._fast:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if self._fast:
            self._fast = False
            self.server_state.total_requests += 1
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
            return
        super().on_message_complete()

    def _timed_out(self, what: str) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._fast:  # answered already; the rest of its body did not come in time
            self.transport.close()
            return
        cycle = self.cycle
        if what == "body" and cycle is not None and not cycle.response_complete:
            self.scope["onnxpipe.timeout"] = "body"  # the app answers 408 in its log; the client gets it here
        if cycle is None or not cycle.response_started:
            limit = self.header_timeout if what == "headers" else self.body_timeout
            msg = f"request {what} not received within {limit:g} s".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: "
                                 + str(len(msg)).encode() + b"\r\nconnection: close\r\n\r\n" + msg)
        log.info("closing a connection from %s: request %s not received in time", self.client, what)
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            callback = self.scope.get("onnxpipe.on_disconnect") if self.scope else None
            if callback is not None:
                callback()
        super().connection_lost(exc)


# --- running it ----------------------------------------------------------------------------------------

def configure_logging(prefix: str = "onnxpipe") -> None:
    """Server messages as text, the access log as one JSON object per line, both on stderr."""
    for name, fmt in (("onnxpipe.serve", f"%(asctime)s {prefix} %(levelname)s %(message)s"),
                      ("onnxpipe.access", "%(message)s")):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            logger.addHandler(handler)
        for handler in logger.handlers:
            handler.setFormatter(logging.Formatter(fmt))
        logger.setLevel(logging.INFO)
        logger.propagate = False


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """Bind the listening socket ourselves: a clear error for a taken port, and port 0 for a free one.
    reuse_port: SO_REUSEPORT, so that --workers processes share the port (the kernel spreads connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on such sockets, and without it
    # Nagle's algorithm holds a response's second write for the client's delayed ACK (+40 ms a request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or --host") from None
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_uvicorn_server(app, cfg: ServeConfig):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown (exit status 143); a finished graceful
        shutdown is a success here, so capture the signals without re-raising them (exit 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            import signal

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    protocol = type("Protocol", (TimedHttpProtocol,), {"header_timeout": cfg.header_timeout_s,
                                                        "body_timeout": cfg.body_timeout_s,
                                                        "fast_lane": staticmethod(app.fast_lane)})
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=protocol,
                            timeout_graceful_shutdown=int(cfg.graceful_timeout_s), server_header=False)
    return GracefulServer(config)


@contextlib.contextmanager
def serve_in_thread(models: ServedModel | Sequence[ServedModel], cfg: ServeConfig, *,
                    load: Callable[[], None] | None = None, sources: Sources | None = None):
    """The real server on a background thread (tests, notebooks): yields (base_url, app); stops on exit.
    With cfg.grpc_port set, app.state.grpc_port is the gRPC port."""
    sock = bind(cfg.host, cfg.port)
    app = create_app(models, cfg, load=load, sources=sources)
    server = make_uvicorn_server(app, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="onnxpipe-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        sock.close()
        raise RuntimeError("the server thread did not start within 30 s")
    host, port = sock.getsockname()[:2]
    try:
        yield f"http://{host}:{port}", app
    finally:
        server.should_exit = True
        thread.join(cfg.graceful_timeout_s + 5)
        sock.close()


def describe(models: Sequence[ServedModel], cfg: ServeConfig, host: str, port: int, grpc_port: int | None,
             tuned: dict | None = None) -> list[str]:
    """The start-up lines: what is served where, with which settings and where they came from."""
    lines = []
    for m in models:
        lines.append(f"serving model {m.name!r} version {m.version} (run {m.run.root}, variant {m.variant}) on "
                     f"http://{host}:{port}/v2/models/{m.name}; session: {m.threads or 'all'} thread(s), "
                     f"{m.execution_mode} ({m.setting_from})")
    if grpc_port is not None:
        lines.append(f"gRPC (inference.GRPCInferenceService) on {host}:{grpc_port}")
    lines.append(f"settings: max batch {cfg.max_batch}, max delay {cfg.max_delay_ms:g} ms, threads "
                 f"{cfg.threads or 'per model (as above)'}, workers {cfg.workers}, max queue {cfg.max_queue}, max in flight "
                 f"{cfg.max_inflight_mb:g} MB, timeout {f'{cfg.timeout_ms:g} ms' if cfg.timeout_ms else 'none'}, shadow "
                 f"{cfg.shadow_rate:g}" + (f"; from `onnxpipe tune` ({tuned['when']}): "
                                          + ", ".join(f"{k} {v}" for k, v in tuned["applied"].items()) if tuned else ""))
    lines.append("ready once the sha256 check and self-test pass")
    return lines


def serve(models: ServedModel | Sequence[ServedModel], cfg: ServeConfig, *, sources: Sources | None = None,
          tuned: dict | None = None, sockets: list[socket.socket] | None = None, peers=None, worker: int | None = None,
          quiet_start: bool = False) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status (0 after a graceful shutdown).
    `sockets`, `peers`, `worker`: a --workers process (workers.py) on the shared ports."""
    if worker is None:
        configure_logging()
    models = [models] if isinstance(models, ServedModel) else list(models)
    socks = sockets or [bind(cfg.host, cfg.port)]
    if cfg.grpc_port and worker is None:  # a taken gRPC port is refused before anything starts
        bind(cfg.host, cfg.grpc_port).close()
    fatal: list[BaseException] = []
    server = None

    def stop_on_fatal(e: BaseException) -> None:
        fatal.append(e)
        server.should_exit = True

    app = create_app(models, cfg, on_fatal=stop_on_fatal, sources=sources, peers=peers, worker=worker)
    server = make_uvicorn_server(app, cfg)
    host, port = socks[0].getsockname()[:2]
    original_startup = server.startup

    async def startup(*a, **kw):  # the gRPC port is known once the lifespan has started it
        await original_startup(*a, **kw)
        import gc

        gc.freeze()  # what start-up made lives as long as the server: full collections need not walk it again
        if not quiet_start and server.started:
            for line in describe(models, cfg, host, port, app.state.grpc_port, tuned):
                log.info("%s", line)

    server.startup = startup
    try:
        server.run(sockets=socks)
    finally:
        for s in socks:
            s.close()
    if fatal:
        return 1
    if not server.started:
        log.error("the server did not start (see the lines above)")
        return 1
    log.info("shut down cleanly")
    return 0
