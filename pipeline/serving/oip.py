"""The Open Inference Protocol's gRPC messages (KServe v2 `grpc_service.proto`, package `inference`),
built at import from a declaration of their fields instead of protoc-generated code.

Why not generated stubs: protoc's Python output pins the protobuf runtime it may run with, and
registers `inference.*` in protobuf's default pool, where a client library in the same process
(tritonclient registers Triton's own superset of these messages under the same names) collides
with it. Here the messages live in a private descriptor pool, need no protoc and no grpcio-tools,
and run with any protobuf >= 4.21. The field numbers and types below are the protocol's wire
contract; tests/test_grpc.py checks every one against the descriptor tritonclient ships, and a
real `tritonclient.grpc` client against a real server.

    rpc ServerLive(ServerLiveRequest) returns (ServerLiveResponse)
    rpc ServerReady(ServerReadyRequest) returns (ServerReadyResponse)
    rpc ModelReady(ModelReadyRequest) returns (ModelReadyResponse)
    rpc ServerMetadata(ServerMetadataRequest) returns (ServerMetadataResponse)
    rpc ModelMetadata(ModelMetadataRequest) returns (ModelMetadataResponse)
    rpc ModelInfer(ModelInferRequest) returns (ModelInferResponse)
"""
from __future__ import annotations

import functools

PACKAGE = "inference"
SERVICE = "GRPCInferenceService"
METHODS = {  # rpc -> (request, response)
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}

# message -> its fields as (name, number, kind): a scalar type, "repeated <kind>", a message type
# (".inference.X"), or "map" for map<string, InferParameter>; nested messages under "nested", and
# "oneof" when every field belongs to one oneof.
MESSAGES: dict[str, dict] = {
    "ServerLiveRequest": {"fields": []},
    "ServerLiveResponse": {"fields": [("live", 1, "bool")]},
    "ServerReadyRequest": {"fields": []},
    "ServerReadyResponse": {"fields": [("ready", 1, "bool")]},
    "ModelReadyRequest": {"fields": [("name", 1, "string"), ("version", 2, "string")]},
    "ModelReadyResponse": {"fields": [("ready", 1, "bool")]},
    "ServerMetadataRequest": {"fields": []},
    "ServerMetadataResponse": {"fields": [("name", 1, "string"), ("version", 2, "string"),
                                          ("extensions", 3, "repeated string")]},
    "ModelMetadataRequest": {"fields": [("name", 1, "string"), ("version", 2, "string")]},
    "ModelMetadataResponse": {
        "nested": {"TensorMetadata": {"fields": [("name", 1, "string"), ("datatype", 2, "string"),
                                                 ("shape", 3, "repeated int64")]}},
        "fields": [("name", 1, "string"), ("versions", 2, "repeated string"), ("platform", 3, "string"),
                   ("inputs", 4, "repeated .inference.ModelMetadataResponse.TensorMetadata"),
                   ("outputs", 5, "repeated .inference.ModelMetadataResponse.TensorMetadata")]},
    "ModelInferRequest": {
        "nested": {
            "InferInputTensor": {"fields": [("name", 1, "string"), ("datatype", 2, "string"),
                                            ("shape", 3, "repeated int64"), ("parameters", 4, "map"),
                                            ("contents", 5, ".inference.InferTensorContents")]},
            "InferRequestedOutputTensor": {"fields": [("name", 1, "string"), ("parameters", 2, "map")]},
        },
        "fields": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                   ("parameters", 4, "map"),
                   ("inputs", 5, "repeated .inference.ModelInferRequest.InferInputTensor"),
                   ("outputs", 6, "repeated .inference.ModelInferRequest.InferRequestedOutputTensor"),
                   ("raw_input_contents", 7, "repeated bytes")]},
    "ModelInferResponse": {
        "nested": {
            "InferOutputTensor": {"fields": [("name", 1, "string"), ("datatype", 2, "string"),
                                             ("shape", 3, "repeated int64"), ("parameters", 4, "map"),
                                             ("contents", 5, ".inference.InferTensorContents")]},
        },
        "fields": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                   ("parameters", 4, "map"),
                   ("outputs", 5, "repeated .inference.ModelInferResponse.InferOutputTensor"),
                   ("raw_output_contents", 6, "repeated bytes")]},
    "InferParameter": {"oneof": "parameter_choice",
                       "fields": [("bool_param", 1, "bool"), ("int64_param", 2, "int64"), ("string_param", 3, "string"),
                                  ("double_param", 4, "double"), ("uint64_param", 5, "uint64")]},
    "InferTensorContents": {"fields": [("bool_contents", 1, "repeated bool"), ("int_contents", 2, "repeated int32"),
                                       ("int64_contents", 3, "repeated int64"), ("uint_contents", 4, "repeated uint32"),
                                       ("uint64_contents", 5, "repeated uint64"), ("fp32_contents", 6, "repeated float"),
                                       ("fp64_contents", 7, "repeated double"), ("bytes_contents", 8, "repeated bytes")]},
}


def _message(pb, name: str, decl: dict, scope: str):
    """A DescriptorProto for message `name` (full name scope.name) from its declaration."""
    F = pb.FieldDescriptorProto
    types = {"bool": F.TYPE_BOOL, "int32": F.TYPE_INT32, "int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32,
             "uint64": F.TYPE_UINT64, "float": F.TYPE_FLOAT, "double": F.TYPE_DOUBLE, "string": F.TYPE_STRING,
             "bytes": F.TYPE_BYTES}
    msg = pb.DescriptorProto(name=name)
    full = f"{scope}.{name}"
    for nested_name, nested in decl.get("nested", {}).items():
        msg.nested_type.append(_message(pb, nested_name, nested, full))
    if "oneof" in decl:
        msg.oneof_decl.add(name=decl["oneof"])
    for field_name, number, kind in decl["fields"]:
        f = msg.field.add(name=field_name, number=number, json_name=_camel(field_name))
        repeated = kind.startswith("repeated ")
        kind = kind.removeprefix("repeated ")
        f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        if kind == "map":  # map<string, InferParameter>: a repeated nested entry message
            entry = msg.nested_type.add(name=_camel(field_name, upper=True) + "Entry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, json_name="key")
            entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                            type_name=f".{PACKAGE}.InferParameter", json_name="value")
            f.label, f.type, f.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, f"{full}.{entry.name}"
        elif kind.startswith("."):
            f.type, f.type_name = F.TYPE_MESSAGE, kind
        else:
            f.type = types[kind]
        if "oneof" in decl:
            f.oneof_index = 0
    return msg


def _camel(name: str, upper: bool = False) -> str:
    parts = name.split("_")
    out = parts[0] + "".join(p.title() for p in parts[1:])
    return out[0].upper() + out[1:] if upper else out


def file_descriptor():
    """The FileDescriptorProto of grpc_service.proto as declared above."""
    from google.protobuf import descriptor_pb2 as pb

    fd = pb.FileDescriptorProto(name="onnxpipe/grpc_service.proto", package=PACKAGE, syntax="proto3")
    for name, decl in MESSAGES.items():
        fd.message_type.append(_message(pb, name, decl, f".{PACKAGE}"))
    service = fd.service.add(name=SERVICE)
    for rpc, (req, resp) in METHODS.items():
        service.method.add(name=rpc, input_type=f".{PACKAGE}.{req}", output_type=f".{PACKAGE}.{resp}")
    return fd


class _Messages:
    """Message classes by name: M.ModelInferRequest, M.ModelInferResponse, ..."""

    def __init__(self):
        from google.protobuf import descriptor_pool, message_factory

        self.pool = descriptor_pool.DescriptorPool()  # private: never collides with another library's `inference`
        self.file = self.pool.Add(file_descriptor())
        for name in MESSAGES:
            setattr(self, name, message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"{PACKAGE}.{name}")))


@functools.lru_cache(maxsize=1)
def messages() -> _Messages:
    return _Messages()
