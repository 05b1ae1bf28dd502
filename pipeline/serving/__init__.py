"""Serving: a run's verified ONNX variant behind the Open Inference Protocol (KServe v2 REST).

    protocol.py  KServe v2 JSON + Triton's binary tensor data extension (decode requests, encode responses)
    model.py     the served model: sha256-checked load, start-up self-test, input validation
    batcher.py   dynamic batching on a worker thread, off the event loop
    metrics.py   Prometheus text exposition
    app.py       the ASGI app (Starlette on uvicorn), access log, graceful shutdown
    triton.py    a Triton Inference Server model repository for scaling out
"""
