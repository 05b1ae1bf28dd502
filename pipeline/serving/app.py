"""The HTTP server: KServe v2 REST endpoints (Starlette on uvicorn), access log, metrics, graceful exit.

    GET  /v2                                         server metadata
    GET  /v2/health/live | /v2/health/ready          200 true, 400 false (the protocol's convention)
    GET  /v2/models/{name}[/versions/{v}]            model metadata (+ providers, self-test)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer      JSON or binary tensors, dynamically batched
    GET  /metrics                                    Prometheus text

Every error is {"error": "..."} with a 4xx (the client's mistake) or a 500 (ours); tracebacks go to
the server log only. The model loads on a thread after the port opens: live at once, ready only
once model.py's sha256 check and self-test passed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigError, DeviceError
from .config import ServeConfig
from .batcher import DynamicBatcher, InferenceError
from .metrics import CONTENT_TYPE, ServerMetrics
from .model import ServedModel
from .protocol import HEADER_LENGTH, RequestError, encode_infer_response, parse_infer_request

log = logging.getLogger("onnxpipe.serve")
access_log = logging.getLogger("onnxpipe.access")

CLIENT_CLOSED = 499      # nginx's code for "client closed the request": logged, never seen by the client
OFFLOAD_BYTES = 1 << 20   # bodies larger than this are decoded on a thread, so the event loop stays responsive


def _server_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("onnxpipe")
    except md.PackageNotFoundError:
        return "0+unknown"


def _error(request: Request | None, status: int, message: str) -> JSONResponse:
    if request is not None:
        request.scope["onnxpipe.error"] = message  # for the access log
    return JSONResponse({"error": message}, status_code=status)


def _route_of(path: str) -> str:
    """A low-cardinality label for metrics: the endpoint, not the URL."""
    if path.startswith("/v2/models/"):
        return "infer" if path.endswith("/infer") else "model_ready" if path.endswith("/ready") else "model_metadata"
    return {"/v2": "server_metadata", "/v2/health/live": "live", "/v2/health/ready": "ready",
            "/metrics": "metrics"}.get(path, "other")


class Observe:
    """ASGI middleware: metrics and one JSON access-log line per request."""

    def __init__(self, app, metrics: ServerMetrics, log_requests: bool):
        self.app, self.metrics, self.log_requests = app, metrics, log_requests

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
            if self.log_requests:
                client = scope.get("client")
                entry = {"ts": round(time.time(), 6), "client": f"{client[0]}:{client[1]}" if client else None,
                         "method": scope["method"], "path": scope["path"], "status": seen["status"],
                         "ms": round(seconds * 1000, 3), "bytes_out": seen["out"]}
                if "onnxpipe.rows" in scope:
                    entry["rows"] = scope["onnxpipe.rows"]
                if "onnxpipe.error" in scope:
                    entry["error"] = scope["onnxpipe.error"]
                access_log.info(json.dumps(entry, separators=(",", ":")))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length must be a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise RequestError(f"request body of {int(declared)} bytes is over the limit of {limit} bytes; "
                               "send fewer rows per request or start the server with a larger --max-body-mb", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes; send fewer rows per request "
                               "or start the server with a larger --max-body-mb", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model: ServedModel, cfg: ServeConfig, *, load: Callable[[], None] | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> Observe:
    """The ASGI app for one model. `load` (default: model.load) runs on a thread at start-up."""
    import anyio.to_thread

    metrics = ServerMetrics()
    batcher = DynamicBatcher(model.run_batch, max_batch=cfg.max_batch, max_delay_s=cfg.max_delay_ms / 1000,
                             metrics=metrics)
    server_info = {"name": "onnxpipe", "version": _server_version(), "extensions": ["binary_tensor_data"]}

    def find_model(request: Request) -> ServedModel:
        name = request.path_params["name"]
        if name != model.name:
            raise RequestError(f"unknown model {name!r}; this server serves {model.name!r}", 404)
        version = request.path_params.get("version")
        if version is not None and version != model.version:
            raise RequestError(f"model {name!r} has no version {version!r} (versions: {model.version})", 404)
        return model

    def not_ready_reason() -> str:
        if model.state == "loading":
            return f"model {model.name!r} is still loading (sha256 check and self-test)"
        return f"model {model.name!r} failed to load: {model.error}"

    def endpoint(fn):
        async def guarded(request: Request):
            try:
                return await fn(request)
            except RequestError as e:
                return _error(request, e.status, str(e))
            except InferenceError as e:
                return _error(request, 500, str(e))
            except ClientDisconnect:  # the client went away mid-request: nobody to answer, nothing broke
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
        if model.ready:
            return JSONResponse({"ready": True})
        request.scope["onnxpipe.error"] = not_ready_reason()
        return JSONResponse({"ready": False, "error": not_ready_reason()}, status_code=400)

    @endpoint
    async def model_metadata(request: Request):
        return JSONResponse(find_model(request).metadata())

    @endpoint
    async def model_ready(request: Request):
        m = find_model(request)
        if m.ready:
            return JSONResponse({"name": m.name, "ready": True})
        request.scope["onnxpipe.error"] = not_ready_reason()
        return JSONResponse({"name": m.name, "ready": False, "error": not_ready_reason()}, status_code=400)

    def decode(body: bytes, header_length: str | None):
        req = parse_infer_request(body, header_length)
        return req, model.feeds(req)

    @endpoint
    async def infer(request: Request):
        m = find_model(request)
        if not m.ready:
            raise RequestError(not_ready_reason(), 503)
        with batcher.arriving() as arrival:
            body = await _read_body(request, cfg.max_body_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            if len(body) > OFFLOAD_BYTES:
                req, arrays = await anyio.to_thread.run_sync(decode, body, header_length)
            else:
                req, arrays = decode(body, header_length)
            request.scope["onnxpipe.rows"] = int(arrays[0].shape[0])
            outputs = await batcher.submit(arrays, arrival)
        wanted = list(req.outputs) if req.outputs is not None else [o.name for o in m.outputs]
        index = {o.name: i for i, o in enumerate(m.outputs)}
        named = [(n, m.outputs[index[n]].datatype, outputs[index[n]]) for n in wanted]
        if sum(a.nbytes for _, _, a in named) > OFFLOAD_BYTES:
            payload, headers = await anyio.to_thread.run_sync(encode_infer_response, m.name, m.version, req, named)
        else:
            payload, headers = encode_infer_response(m.name, m.version, req, named)
        return Response(payload, headers=headers)

    @endpoint
    async def prometheus(request: Request):
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            msg = (f"no endpoint {request.url.path}; see /v2, /v2/health/live, /v2/health/ready, "
                   f"/v2/models/{model.name}[/versions/{model.version}][/ready|/infer], /metrics")
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return _error(request, exc.status_code, msg)

    def start_loading() -> None:
        try:
            (load or model.load)()
            batcher.merge_callers = model.row_independent  # an answer depends only on its own request
            metrics.ready.set(1 if model.ready else 0)
        except DeviceError as e:  # a device that cannot run the model: serving is pointless
            log.error("%s", e)
            if on_fatal is not None:
                on_fatal(e)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        threading.Thread(target=start_loading, name="onnxpipe-load", daemon=True).start()
        yield
        await batcher.stop(cfg.graceful_timeout_s)  # in-flight requests have finished by now

    routes = [Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/metrics", prometheus)]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(base, model_metadata), Route(base + "/ready", model_ready),
                   Route(base + "/infer", infer, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: http_error, 405: http_error})
    app.state.model, app.state.batcher, app.state.metrics = model, batcher, metrics
    observed = Observe(app, metrics, cfg.access_log)
    observed.state = app.state
    return observed


# --- running it ----------------------------------------------------------------------------------------

def configure_logging() -> None:
    """Server messages as text, the access log as one JSON object per line, both on stderr."""
    for name, fmt in (("onnxpipe.serve", "%(asctime)s onnxpipe %(levelname)s %(message)s"),
                      ("onnxpipe.access", "%(message)s")):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(fmt))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: a clear error for a taken port, and port 0 for a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on such sockets, and without it
    # Nagle's algorithm holds a response's second write for the client's delayed ACK (+40 ms a request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or --host") from None
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

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(cfg.graceful_timeout_s), server_header=False)
    return GracefulServer(config)


@contextlib.contextmanager
def serve_in_thread(model: ServedModel, cfg: ServeConfig, *, load: Callable[[], None] | None = None):
    """The real server on a background thread (tests, notebooks): yields (base_url, app); stops on exit."""
    sock = bind(cfg.host, cfg.port)
    app = create_app(model, cfg, load=load)
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


def serve(model: ServedModel, cfg: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status (0 after a graceful shutdown)."""
    configure_logging()
    sock = bind(cfg.host, cfg.port)
    fatal: list[BaseException] = []
    server = None

    def stop_on_fatal(e: BaseException) -> None:
        fatal.append(e)
        server.should_exit = True

    app = create_app(model, cfg, on_fatal=stop_on_fatal)
    server = make_uvicorn_server(app, cfg)
    host, port = sock.getsockname()[:2]
    log.info("serving model %r (run %s, variant %s) on http://%s:%d/v2/models/%s; max batch %d, max delay %g ms; "
             "ready once the sha256 check and self-test pass", model.name, model.run.root, model.variant, host, port,
             model.name, cfg.max_batch, cfg.max_delay_ms)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if fatal:
        return 1
    log.info("shut down cleanly")
    return 0
