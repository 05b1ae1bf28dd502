"""The Open Inference Protocol (KServe v2) on the wire: JSON tensors and Triton's binary tensor data extension.

A request body is either one JSON object, or (binary extension) a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw tensors, little-endian and
row-major, in the order of the inputs that carry `parameters.binary_data_size`. Outputs
come back as binary when the request asks (`outputs[i].parameters.binary_data` or the
request-level `binary_data_output`), which is what Triton's clients do by default.

Everything a client can get wrong raises RequestError (a 4xx with a message that names the
problem); nothing here knows about the model: model.py checks names, shapes and datatypes.

JSON is read and written with orjson (about 5x faster than the standard library on a body of
numbers; benchmarks/serving.py measures what it buys). A body orjson refuses is read again with
the standard library only to word the error: NaN and Infinity, which JSON does not have, are still
refused (model.py names how many), and so is nesting beyond a depth. An answer whose outputs hold
NaN or Inf is never written as JSON (JSON cannot carry them; orjson would write null): the client
is told to ask for binary outputs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import orjson

HEADER_LENGTH = "inference-header-content-length"

# KServe v2 datatype -> numpy dtype (binary data is little-endian).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
# ONNX Runtime's type strings -> KServe v2 datatypes.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES", "tensor(bfloat16)": "BF16",
}
V2_TO_TRITON = {k: "TYPE_" + ("STRING" if k == "BYTES" else k) for k in [*DATATYPES, "BYTES", "BF16"]}

# Which kinds of JSON numbers (as numpy parses them) each datatype accepts: no silent float -> int truncation.
_JSON_KINDS = {"BOOL": "b", **{k: "iu" for k in DATATYPES if "INT" in k}, "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}


# Bounds on a request's declared shape: far above any body the server accepts, far below what would make
# numpy allocate (or fail to allocate) an impossible array for a zero-sized tensor.
MAX_RANK = 16
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**34


class RequestError(Exception):
    """A request the server cannot take: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    # Requested outputs in order: name -> wants binary. None: all outputs, in the model's order.
    outputs: dict[str, bool] | None = None
    binary_output: bool = False            # request-level `binary_data_output`
    parameters: dict = field(default_factory=dict)

    def wants_binary(self, output: str) -> bool:
        if self.outputs is not None and output in self.outputs and self.outputs[output] is not None:
            return self.outputs[output]
        return self.binary_output


def check_shape(raw, where: str) -> tuple[int, ...]:
    if isinstance(raw, list) and any(isinstance(d, float) and d.is_integer() and abs(d) > MAX_DIM for d in raw):
        # orjson reads an integer beyond 64 bits as a float: such a dimension is impossible, not malformed
        raise RequestError(f"{where}: 'shape' {json.dumps(raw)[:80]} is impossible: at most {MAX_RANK} dimensions of "
                           f"at most {MAX_DIM} each")
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise RequestError(f"{where}: 'shape' must be a list of integers, got {json.dumps(raw)[:80]}")
    if any(d < 0 for d in raw):
        raise RequestError(f"{where}: 'shape' {raw} has a negative dimension; every dimension must be >= 0")
    if len(raw) > MAX_RANK or any(d > MAX_DIM for d in raw):
        raise RequestError(f"{where}: 'shape' {raw[:MAX_RANK + 1]} is impossible: at most {MAX_RANK} dimensions of "
                           f"at most {MAX_DIM} each")
    if math.prod(d for d in raw if d) > MAX_ELEMENTS:
        raise RequestError(f"{where}: 'shape' {raw} describes more than {MAX_ELEMENTS} elements; send fewer rows "
                           "per request")
    return tuple(raw)


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"{where}: 'parameters' must be a JSON object, got {type(params).__name__}")
    for unsupported in ("shared_memory_region", "classification"):
        if unsupported in params:
            raise RequestError(f"{where}: parameter {unsupported!r} is not supported by this server; "
                               "send the tensor data in the request and read raw outputs")
    return params


def _json_data(data, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """`data` (flat or nested to the tensor's shape) -> an array of that shape and datatype."""
    if not isinstance(data, list):
        raise RequestError(f"{where}: 'data' must be a list of numbers (flat, or nested to the shape), "
                           f"got {type(data).__name__}")
    try:
        arr = np.array(data)
    except ValueError:  # numpy 2: ragged nesting
        raise RequestError(f"{where}: 'data' is ragged (nested lists of different lengths); "
                           f"send a flat list or lists nested exactly to shape {list(shape)}") from None
    need = math.prod(shape)
    if arr.size == 0 and need == 0:
        return np.zeros(shape, DATATYPES[datatype])
    if arr.dtype.kind == "f" and "INT" in datatype and arr.size and np.isfinite(arr).all() and \
            np.all(arr == np.round(arr)) and np.abs(arr).max() >= 2.0 ** 63:
        # orjson reads an integer beyond 64 bits as a float
        raise RequestError(f"{where}: 'data' holds out-of-range values, which datatype {datatype} cannot take")
    if arr.dtype.kind not in _JSON_KINDS[datatype]:
        what = {"U": "strings", "O": "mixed or out-of-range values", "f": "non-integer numbers", "b": "booleans"}.get(
            arr.dtype.kind, f"values of kind {arr.dtype}")
        raise RequestError(f"{where}: 'data' holds {what}, which datatype {datatype} cannot take")
    if arr.size != need:
        raise RequestError(f"{where}: 'data' has {arr.size} values but shape {list(shape)} needs {need}")
    if arr.ndim > 1 and arr.shape != shape:
        raise RequestError(f"{where}: 'data' is nested as {list(arr.shape)} but 'shape' says {list(shape)}")
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise RequestError(f"{where}: values outside the {datatype} range [{info.min}, {info.max}]")
    return arr.reshape(shape).astype(dtype, copy=False)


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Decode a KServe v2 inference request (plain JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise RequestError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < json_len <= len(body):
            raise RequestError(f"Inference-Header-Content-Length is {json_len} but the body has {len(body)} bytes; "
                               "it must give the length of the JSON header at the start of the body")
        head, binary = body[:json_len], memoryview(body)[json_len:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError:
        req = _slow_loads(head, body, header_length)
    return _request_from_json(req, binary)


def _slow_loads(head, body: bytes, header_length: str | None):
    """The standard library's reading of a body orjson refused: it words the error (or, for NaN and
    Infinity, accepts them so that model.py can say how many non-finite values the input holds)."""
    try:
        return json.loads(bytes(head))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        hint = ("; a body with binary tensors needs the Inference-Header-Content-Length header"
                if header_length is None and b"binary_data_size" in body[:4096] else "")
        raise RequestError(f"request body is not valid JSON: {e}{hint}") from None
    except RecursionError:
        raise RequestError("request JSON is nested too deeply; 'data' may be flat or nested to the tensor's shape") from None


def _request_from_json(req, binary: memoryview) -> InferRequest:
    if not isinstance(req, dict):
        raise RequestError(f"request body must be a JSON object with 'inputs', got {type(req).__name__}")
    params = _parameters(req, "request")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("request needs 'inputs': a non-empty list of {name, shape, datatype, data}")
    request_id = req.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, got {type(request_id).__name__}")

    inputs, offset, seen = [], 0, set()
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise RequestError(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"inputs[{i}] has no 'name'")
        where = f"input {name!r}"
        if name in seen:
            raise RequestError(f"{where} is given twice; send each input once")
        seen.add(name)
        datatype = raw.get("datatype")
        if datatype not in DATATYPES:
            known = ", ".join(DATATYPES)
            raise RequestError(f"{where}: datatype {datatype!r} is not supported; use one of {known}")
        shape = check_shape(raw.get("shape"), where)
        p = _parameters(raw, where)
        size = p.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise RequestError(f"{where} has both 'data' and parameters.binary_data_size; send one of them")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
            need = math.prod(shape) * DATATYPES[datatype].itemsize
            if size != need:
                raise RequestError(f"{where}: binary_data_size is {size} bytes but shape {list(shape)} of {datatype} "
                                   f"needs {need} bytes")
            if offset + size > len(binary):
                raise RequestError(f"{where}: the body ends {offset + size - len(binary)} bytes short of its binary data "
                                   "(check Inference-Header-Content-Length and binary_data_size)")
            arr = np.frombuffer(binary[offset:offset + size], dtype=DATATYPES[datatype]).reshape(shape)
            offset += size
        elif "data" in raw:
            arr = _json_data(raw["data"], datatype, shape, where)
        else:
            raise RequestError(f"{where} has no 'data' (or parameters.binary_data_size with binary data after the JSON)")
        inputs.append(InputTensor(name, datatype, shape, arr))
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary) - offset} bytes after the binary tensors that no input claims "
                           "(check binary_data_size of each input)")

    outputs = None
    if "outputs" in req:
        raw_outputs = req["outputs"]
        if not isinstance(raw_outputs, list):
            raise RequestError("'outputs' must be a list of {name, parameters}")
        outputs = {}
        for i, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise RequestError(f"outputs[{i}] must be an object with a 'name'")
            binary_flag = _parameters(raw, f"output {raw['name']!r}").get("binary_data")
            if binary_flag is not None and not isinstance(binary_flag, bool):
                raise RequestError(f"output {raw['name']!r}: binary_data must be true or false")
            outputs[raw["name"]] = binary_flag
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise RequestError("parameter binary_data_output must be true or false")
    return InferRequest(request_id, inputs, outputs, binary_output, params)


class NonFiniteOutput(Exception):
    """An output holds NaN or Inf and the client asked for it as JSON, which cannot carry them."""


def _json_values(arr: np.ndarray, name: str):
    """An output as something orjson writes: numpy arrays of its native types directly (float32 in its
    shortest form), anything else as a list."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise NonFiniteOutput(f"output {name!r} holds {bad} NaN or Inf value(s), which JSON cannot carry; ask "
                                  "for it as binary data (outputs[].parameters.binary_data = true) to receive them")
        if arr.dtype == np.float16:
            return arr.astype(np.float32).ravel()
    if arr.dtype.kind in "fiub" and arr.dtype.byteorder in "=|<":
        return np.ascontiguousarray(arr).ravel()
    return arr.ravel().tolist()


def encode_infer_response(model_name: str, model_version: str, request: InferRequest,
                          outputs: list[tuple[str, str, np.ndarray]]) -> tuple[bytes, dict[str, str]]:
    """(name, datatype, array) outputs -> (body, headers). Binary outputs follow the JSON header."""
    described, blobs = [], []
    for name, datatype, arr in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if request.wants_binary(name):
            blob = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(arr, name)
        described.append(entry)
    doc = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.id is not None:
        doc["id"] = request.id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(head))}
