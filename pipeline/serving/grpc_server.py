"""KServe v2 gRPC (inference.GRPCInferenceService, oip.py) on its own port, with grpcio's asyncio server on
the REST server's event loop: the same repository, batchers, admission, deadlines, self-test and metrics.

Inputs come as `raw_input_contents` (little-endian, row-major: what tritonclient sends by default)
or as typed `contents`; outputs always go back as `raw_output_contents`. Errors map to gRPC status
codes the way the REST status codes read: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 413
RESOURCE_EXHAUSTED, 503 UNAVAILABLE (busy or not ready: retry), 504 DEADLINE_EXCEEDED, 500 INTERNAL.
A call's own gRPC deadline counts like --timeout-ms (the earlier wins), and a cancelled call has its
queued work dropped.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np

from ..errors import ConfigError
from .batcher import InferenceError
from .config import ServeConfig
from .oip import METHODS, PACKAGE, SERVICE, messages
from .protocol import DATATYPES, InferRequest, InputTensor, RequestError, check_shape
from .repository import OFFLOAD_BYTES, Overloaded, Repository, deadline

log = logging.getLogger("onnxpipe.serve")

# InferTensorContents field for each datatype (FP16 has none: send it raw)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
UNSUPPORTED = ("shared_memory_region", "classification")


def _codes():
    import grpc

    C = grpc.StatusCode
    return {400: C.INVALID_ARGUMENT, 404: C.NOT_FOUND, 413: C.RESOURCE_EXHAUSTED, 503: C.UNAVAILABLE,
            504: C.DEADLINE_EXCEEDED, 500: C.INTERNAL}


def _check_params(params, where: str) -> None:
    for key in UNSUPPORTED:
        if key in params:
            raise RequestError(f"{where}: parameter {key!r} is not supported by this server; send the tensor data in "
                               "the request and read raw outputs")


def parse_grpc_request(msg) -> InferRequest:
    """ModelInferRequest -> the same InferRequest the REST path builds (RequestError for a client's mistake)."""
    _check_params(msg.parameters, "request")
    if not msg.inputs:
        raise RequestError("request needs 'inputs': one or more InferInputTensor")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise RequestError(f"raw_input_contents has {len(raw)} entries but the request has {len(msg.inputs)} inputs; "
                           "send one per input, in order (or none, and typed contents)")
    inputs, seen = [], set()
    for i, t in enumerate(msg.inputs):
        if not t.name:
            raise RequestError(f"inputs[{i}] has no 'name'")
        where = f"input {t.name!r}"
        if t.name in seen:
            raise RequestError(f"{where} is given twice; send each input once")
        seen.add(t.name)
        if t.datatype not in DATATYPES:
            raise RequestError(f"{where}: datatype {t.datatype!r} is not supported; use one of {', '.join(DATATYPES)}")
        _check_params(t.parameters, where)
        shape = check_shape(list(t.shape), where)
        dtype = DATATYPES[t.datatype]
        if raw:
            need = math.prod(shape) * dtype.itemsize
            if len(raw[i]) != need:
                raise RequestError(f"{where}: raw_input_contents[{i}] has {len(raw[i])} bytes but shape {list(shape)} "
                                   f"of {t.datatype} needs {need} bytes")
            arr = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
        else:
            field = CONTENTS.get(t.datatype)
            if field is None:
                raise RequestError(f"{where}: datatype {t.datatype} has no typed contents field; send it in "
                                   "raw_input_contents")
            values = getattr(t.contents, field)
            if len(values) != math.prod(shape):
                raise RequestError(f"{where}: contents.{field} has {len(values)} values but shape {list(shape)} needs "
                                   f"{math.prod(shape)}")
            try:
                arr = np.array(values, dtype=dtype).reshape(shape)
            except OverflowError:
                raise RequestError(f"{where}: values outside the {t.datatype} range") from None
        inputs.append(InputTensor(t.name, t.datatype, shape, arr))
    outputs = None
    if msg.outputs:
        outputs = {}
        for o in msg.outputs:
            _check_params(o.parameters, f"output {o.name!r}")
            outputs[o.name] = True
    return InferRequest(msg.id or None, inputs, outputs, True, {})


class Service:
    """The six RPCs over a Repository."""

    def __init__(self, repo: Repository, cfg: ServeConfig, metrics, server_info: dict):
        self.repo, self.cfg, self.metrics, self.info = repo, cfg, metrics, server_info
        self.M = messages()
        self.codes = _codes()

    def _resolve(self, name: str, version: str):
        return self.repo.resolve(name, version or None)

    async def ServerLive(self, request, context, state: dict):
        return self.M.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context, state: dict):
        return self.M.ServerReadyResponse(ready=self.repo.readiness()[0])

    async def ModelReady(self, request, context, state: dict):
        return self.M.ModelReadyResponse(ready=self._resolve(request.name, request.version).ready)

    async def ServerMetadata(self, request, context, state: dict):
        return self.M.ServerMetadataResponse(name=self.info["name"], version=self.info["version"],
                                             extensions=self.info["extensions"])

    async def ModelMetadata(self, request, context, state: dict):
        dep = self._resolve(request.name, request.version)
        m = dep.model
        T = self.M.ModelMetadataResponse.TensorMetadata
        return self.M.ModelMetadataResponse(
            name=m.name, versions=self.repo.versions(m.name), platform="onnxruntime_onnx",
            inputs=[T(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in m.inputs],
            outputs=[T(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in m.outputs])

    async def ModelInfer(self, request, context, state: dict):
        loop = asyncio.get_running_loop()
        started = loop.time()
        dep = self._resolve(request.model_name, request.model_version)
        state["labels"] = dep.labels
        m = dep.model
        if not m.ready:
            raise RequestError(self.repo.not_ready_reason(dep), 503)
        nbytes = sum(len(b) for b in request.raw_input_contents)
        if nbytes > self.cfg.max_body_bytes:
            raise RequestError(f"request tensors of {nbytes} bytes are over the limit of {self.cfg.max_body_bytes} "
                               "bytes; send fewer rows per request or start the server with a larger --max-body-mb", 413)
        ends = [started + self.cfg.timeout_ms / 1000] if self.cfg.timeout_ms > 0 else []
        remaining = context.time_remaining()
        if remaining is not None:
            ends.append(loop.time() + remaining)
        with self.repo.admit(dep, nbytes, json_body=False):
            try:
                async with deadline(min(ends) if ends else None):
                    with dep.batcher.arriving() as arrival:
                        if nbytes > OFFLOAD_BYTES:
                            req, arrays = await loop.run_in_executor(None, self._decode, dep, request)
                        else:
                            req, arrays = self._decode(dep, request)
                        fut = dep.batcher.enqueue(arrays, arrival)
                    outputs = await fut  # a cancelled call cancels this future: its queued work is dropped
            except TimeoutError:
                self.metrics.dropped.inc(m.name, "deadline")
                raise RequestError(f"the request's deadline passed before its answer "
                                   f"({(loop.time() - started) * 1000:.1f} ms after it arrived); its queued work was "
                                   "dropped", 504) from None
            except asyncio.CancelledError:
                self.metrics.dropped.inc(m.name, "disconnect")
                raise
        if dep.shadow is not None:
            dep.shadow.offer(arrays, outputs)
        wanted = list(req.outputs) if req.outputs is not None else [o.name for o in m.outputs]
        index = {o.name: i for i, o in enumerate(m.outputs)}
        response = self.M.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id)
        for n in wanted:
            meta, arr = m.outputs[index[n]], outputs[index[n]]
            response.outputs.add(name=n, datatype=meta.datatype, shape=list(arr.shape))
            response.raw_output_contents.append(np.ascontiguousarray(arr, dtype=DATATYPES[meta.datatype]).tobytes())
        return response

    @staticmethod
    def _decode(dep, request):
        req = parse_grpc_request(request)
        return req, dep.model.feeds(req)

    def handler(self, rpc: str):
        fn = getattr(self, rpc)
        codes, metrics = self.codes, self.metrics

        async def guarded(request, context):
            t0 = time.perf_counter()
            code, state = "OK", {}
            try:
                return await fn(request, context, state)
            except Overloaded as e:
                code = "UNAVAILABLE"
                await context.abort(codes[503], str(e))
            except RequestError as e:
                code = codes.get(e.status, codes[400]).name
                await context.abort(codes.get(e.status, codes[400]), str(e))
            except InferenceError as e:
                code = "INTERNAL"
                await context.abort(codes[500], str(e))
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                if type(e).__name__ == "AbortError":  # grpc's own: context.abort() was called
                    raise
                code = "INTERNAL"
                log.exception("internal error in gRPC %s", rpc)
                await context.abort(codes[500], f"internal server error ({type(e).__name__}); see the server log")
            finally:
                metrics.grpc_requests.inc(rpc, code)
                metrics.grpc_latency.observe(time.perf_counter() - t0, rpc)
                labels = state.get("labels")
                if labels is not None:
                    metrics.model_requests.inc(*labels, "grpc", code)

        return guarded


async def start_grpc(repo: Repository, cfg: ServeConfig, metrics, server_info: dict):
    """Start the gRPC server on cfg.grpc_port (0: a free one); returns (server, port)."""
    import grpc
    from grpc import aio

    M = messages()
    service = Service(repo, cfg, metrics, server_info)
    handlers = {rpc: grpc.unary_unary_rpc_method_handler(
        service.handler(rpc), request_deserializer=getattr(M, req).FromString,
        response_serializer=getattr(M, resp).SerializeToString) for rpc, (req, resp) in METHODS.items()}
    options = [("grpc.max_receive_message_length", cfg.max_body_bytes + (1 << 20)),
               ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0)]
    server = aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"{PACKAGE}.{SERVICE}", handlers),))
    address = f"[{cfg.host}]:{cfg.grpc_port}" if ":" in cfg.host else f"{cfg.host}:{cfg.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen for gRPC on {address}: {e}; pick another --grpc-port") from None
    if port == 0:
        raise ConfigError(f"cannot listen for gRPC on {address}; pick another --grpc-port")
    await server.start()
    return server, port
