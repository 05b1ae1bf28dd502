"""A small KServe (Python model server) runtime for an ONNX file with ONNX Runtime (benchmarks/peers.py starts it).

    python kserve_onnx.py --model_name cnn --model_file model.onnx --threads 1 --http_port 8080 --grpc_port 8081

The same session settings as `onnxpipe serve --threads N`: CPU provider, N intra-op threads, one inter-op
thread, intra-op threads not spinning, all graph optimizations. JSON and binary tensors in; outputs as the
request asks (KServe's own handling of binary_data_output)."""
from __future__ import annotations

import argparse
import uuid

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server


class OnnxRuntimeModel(Model):
    def __init__(self, name: str, path: str, threads: int):
        super().__init__(name)
        self.path, self.threads = path, threads
        self.load()

    def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        y = self.session.run(None, {self.input_name: x})[0]
        out = InferOutput(name=self.output_name, shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[out],
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_file", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args, _ = parser.parse_known_args()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1, enable_grpc=False,
                enable_latency_logging=False).start([OnnxRuntimeModel(args.model_name, args.model_file, args.threads)])
