"""Serving: a run's verified ONNX variants behind the Open Inference Protocol (KServe v2 REST and gRPC).

    launch.py       `onnxpipe serve`: run folders (or a repository) and flags -> running servers
    repository.py   several models and versions; load, reload without dropping a request, unload; admission
    model.py        one served variant: sha256-checked load, start-up self-test, input validation
    batcher.py      dynamic batching on a worker thread, off the event loop
    protocol.py     KServe v2 JSON + Triton's binary tensor data extension (decode requests, encode responses)
    app.py          REST (Starlette on uvicorn): endpoints, the connection's fast lane and read timeouts, logs
    grpc_server.py  gRPC (grpcio, the same event loop) over the same repository; oip.py its messages
    shadow.py       live parity against the FP32 parent (--shadow-rate)
    workers.py      --workers N processes on shared ports, metrics and repository calls across them
    metrics.py      Prometheus text exposition (added up across workers)
    loadgen.py      a bounded load generator; tune.py the `onnxpipe tune` sweep that uses it
    triton.py       a Triton Inference Server model repository for scaling out
    config.py       every setting, with its help text
"""
