"""`onnxpipe serve` with the standard library's json in place of orjson, for benchmarks/serving.py's codec part
(what orjson buys, measured side by side). Same command line as `onnxpipe serve`:

    python benchmarks/stdlib_json_server.py serve RUN --port 0 ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class StandardJSON:
    """orjson's interface, as the server uses it, on the standard library (as the server was before orjson)."""

    JSONDecodeError = json.JSONDecodeError
    OPT_SERIALIZE_NUMPY = 0

    @staticmethod
    def loads(data):
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)

    @staticmethod
    def dumps(obj, option=0, default=None) -> bytes:
        return json.dumps(obj, separators=(",", ":"),
                          default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)).encode()


def main() -> None:
    import onnxpipe.serving.app as app
    import onnxpipe.serving.protocol as protocol

    protocol.orjson = StandardJSON
    app.orjson = StandardJSON
    from onnxpipe.cli import main as cli

    sys.argv = ["onnxpipe", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
