"""onnxpipe serve against MLServer and KServe's Python model server, same .onnx file, same client, side by side.

    python benchmarks/peers.py RUN [--clients 32,64] [--seconds 3] [--rounds 3] [--threads 1] [--write]

The peers run from their own virtual environments under benchmarks/peers-venv/ (never the project's: they
pin other versions of FastAPI, protobuf and more):

    python3 -m venv benchmarks/peers-venv/mlserver && benchmarks/peers-venv/mlserver/bin/pip install mlserver onnxruntime
    python3 -m venv benchmarks/peers-venv/kserve && benchmarks/peers-venv/kserve/bin/pip install kserve onnxruntime

each with a small ONNX Runtime runtime kept in benchmarks/peers/ (mlserver_onnx.py, kserve_onnx.py) that opens the
session exactly as `onnxpipe serve --threads N` does (CPU provider, N intra-op threads, no spinning, all graph
optimizations). Servers: onnxpipe serve (its defaults: dynamic batching up to 32 rows, 2 ms), MLServer without
and with its adaptive batching (max_batch_size 32, max_batch_time 2 ms), KServe. Load: pipeline/serving/loadgen.py,
closed-loop batch-1 requests over raw HTTP/1.1, JSON and Triton's binary tensor extension, alternating rounds
over the servers; every 200 answer is checked against the solo answer of ONNX Runtime; server CPU per request is
user + system time of the server's processes. Also: does tritonclient.http with its default (binary) settings
infer against each. Never collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from serving import cpu_seconds  # noqa: E402

from onnxpipe.core.runtime import make_session  # noqa: E402
from onnxpipe.runfolder import Run  # noqa: E402
from onnxpipe.serving import loadgen  # noqa: E402

VENVS = HERE / "peers-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


class Peer:
    def __init__(self, label: str, cmd: list[str], port: int, *, env: dict | None = None, cwd: str | None = None,
                 ready_path: str = "/v2/models/cnn/ready"):
        self.label, self.port = label, port
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     cwd=cwd, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{label} exited: {Path(self.log.name).read_text()[-3000:]}")
            status, _ = loadgen.get("127.0.0.1", port, ready_path, timeout=2)
            if status == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{label} did not become ready: {Path(self.log.name).read_text()[-3000:]}")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) + sum(cpu_seconds(c) for c in children(self.proc.pid))

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and any process it started
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        os.unlink(self.log.name)


def start_onnxpipe(run_dir: str, threads: int) -> Peer:
    port = free_port()
    return Peer("onnxpipe serve", [sys.executable, "-m", "onnxpipe.cli", "serve", run_dir, "--port", str(port), "--device",
                                   "cpu", "--threads", str(threads), "--no-access-log", "--max-batch", "32",
                                   "--max-delay-ms", "2", "--workers", "1"], port)


def start_mlserver(model_file: Path, threads: int, batching: bool) -> Peer:
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    port = free_port()
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0, "metrics_endpoint": None}))
    model = {"name": "cnn", "implementation": "mlserver_onnx.OnnxRuntimeModel",
             "parameters": {"uri": str(model_file), "extra": {"threads": threads}}}
    if batching:
        model.update(max_batch_size=32, max_batch_time=0.002)
    (folder / "model-settings.json").write_text(json.dumps(model))
    label = "MLServer, adaptive batching" if batching else "MLServer"
    return Peer(label, [str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(folder)], port,
                env={"PYTHONPATH": str(HERE / "peers")}, cwd=str(folder))


def start_kserve(model_file: Path, threads: int) -> Peer:
    port = free_port()
    return Peer("KServe", [str(VENVS / "kserve" / "bin" / "python"), str(HERE / "peers" / "kserve_onnx.py"),
                           "--model_name", "cnn", "--model_file", str(model_file), "--threads", str(threads),
                           "--http_port", str(port), "--grpc_port", str(free_port())], port)


def version_of(venv: str, package: str) -> str:
    try:
        out = subprocess.run([str(VENVS / venv / "bin" / "python"), "-c",
                              f"import importlib.metadata as m; print(m.version({package!r}))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "?"
    except OSError:
        return "not installed"


def checker(want: np.ndarray, counts: dict):
    def check(head: bytes, body: bytes) -> None:
        doc, blob = loadgen.split_answer(head, body)
        out = doc["outputs"][0]
        got = np.asarray(out["data"], np.float32) if "data" in out else np.frombuffer(blob[:want.nbytes], "<f4")
        counts["checked"] += 1
        if got.size != want.size or not np.allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5):
            counts["wrong"] += 1
    return check


def probe(peer: Peer, request: bytes, want: np.ndarray) -> str | None:
    """None if the server answers this request correctly, else what went wrong."""
    import asyncio

    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
        writer.write(request)
        status, head, body = await asyncio.wait_for(loadgen.read_full(reader), 30)
        writer.close()
        return status, head, body

    try:
        status, head, body = asyncio.run(one())
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if status != 200:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    counts = {"checked": 0, "wrong": 0}
    try:
        checker(want, counts)(head, body)
    except Exception as e:
        return f"answer not readable: {type(e).__name__}: {str(e)[:200]}"
    return "wrong answer" if counts["wrong"] else None


def tritonclient_default(peer: Peer, x: np.ndarray, want: np.ndarray) -> str:
    import tritonclient.http as httpclient

    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{peer.port}")
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer("cnn", [inp]).as_numpy("logits")
        c.close()
        return "works" if np.allclose(got, want, rtol=1e-5, atol=1e-5) else "wrong answer"
    except Exception as e:
        return f"fails: {str(e).splitlines()[0][:160]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder whose selected variant is an ONNX model (the file every server serves)")
    p.add_argument("--clients", default="32,64")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers", default="mlserver,mlserver-batching,kserve")
    p.add_argument("--write", action="store_true", help="write into benchmarks/RESULTS.md (onnxpipe-serving-peers)")
    args = p.parse_args()
    run = Run.open(args.run)
    model_file = run.path(run.selected).resolve()
    x = np.load(Path(args.run) / "reference.npz")["inputs"][:1].astype(np.float32)
    want = make_session(model_file, device="cpu", threads=1)(x)
    name = make_session(model_file, device="cpu", threads=1).input_names[0]
    requests = {k: loadgen.infer_request("cnn", name, x, binary=k == "binary") for k in ("json", "binary")}
    clients = [int(c) for c in args.clients.split(",")]
    starters = {"mlserver": lambda: start_mlserver(model_file, args.threads, False),
                "mlserver-batching": lambda: start_mlserver(model_file, args.threads, True),
                "kserve": lambda: start_kserve(model_file, args.threads)}
    peers: list[Peer] = []
    lines = [f"`python benchmarks/peers.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} at the start. File: "
             f"{model_file} ({run.selected}); every server: ONNX Runtime CPU, {args.threads} intra-op thread(s). "
             f"Versions: MLServer {version_of('mlserver', 'mlserver')}, KServe {version_of('kserve', 'kserve')}.", ""]
    try:
        peers.append(start_onnxpipe(args.run, args.threads))
        for key in args.peers.split(","):
            try:
                peers.append(starters[key]())
            except (RuntimeError, OSError) as e:
                lines.append(f"- {key} could not be started: {str(e)[:300]}")
        supported = {}
        for peer in peers:
            supported[peer.label] = {k: probe(peer, r, want) for k, r in requests.items()}
            lines.append(f"- {peer.label}: JSON {supported[peer.label]['json'] or 'ok'}; binary "
                         f"{supported[peer.label]['binary'] or 'ok'}; tritonclient.http defaults: "
                         f"{tritonclient_default(peer, x, want)}")
        lines.append("")
        results: dict = {}
        for kind, req in requests.items():
            for c in clients:
                runnable = [pe for pe in peers if supported[pe.label][kind] is None]
                for pe in runnable:  # warm-up
                    loadgen.run_load("127.0.0.1", pe.port, req, c, 0.5)
                for _ in range(args.rounds):
                    for pe in runnable:
                        counts = {"checked": 0, "wrong": 0}
                        cpu0 = pe.cpu()
                        r = loadgen.run_load("127.0.0.1", pe.port, req, c, args.seconds, check=checker(want, counts))
                        row = {**r.to_json(), "cpu_ms": (pe.cpu() - cpu0) * 1000 / max(r.ok, 1), **counts}
                        results.setdefault((kind, c, pe.label), []).append(row)
                        print(kind, c, pe.label, row, flush=True)
        lines += ["| encoding | clients | server | req/s (median of rounds) | per round | p50 ms | p99 ms | server CPU "
                  "ms/request | answers checked / wrong | errors (non-200) | onnxpipe / this |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        verdicts = []
        for kind in requests:
            for c in clients:
                base = results.get((kind, c, "onnxpipe serve"))
                for pe in peers:
                    rows = results.get((kind, c, pe.label))
                    if rows is None:
                        lines.append(f"| {kind} | {c} | {pe.label} | not supported: {supported[pe.label][kind][:80]} "
                                     "| | | | | | | |")
                        continue
                    med = {k: float(np.median([r[k] for r in rows])) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
                    ratio = ""
                    if base and pe.label != "onnxpipe serve":
                        b = {k: float(np.median([r[k] for r in base])) for k in ("rps", "p50_ms", "p99_ms")}
                        ratio = f"{b['rps'] / max(med['rps'], 1e-9):.2f}x"
                        ok = b["rps"] >= 2 * med["rps"] and b["p50_ms"] < med["p50_ms"] and b["p99_ms"] < med["p99_ms"]
                        verdicts.append(f"{kind}, {c} clients, vs {pe.label}: {'met' if ok else 'missed'} "
                                        f"({ratio} req/s, p50 {b['p50_ms']:.2f} vs {med['p50_ms']:.2f} ms, p99 "
                                        f"{b['p99_ms']:.2f} vs {med['p99_ms']:.2f} ms)")
                    per_round = ", ".join(f"{r['rps']:.0f}" for r in rows)
                    lines.append(f"| {kind} | {c} | {pe.label} | {med['rps']:.0f} | {per_round} | {med['p50_ms']:.2f} | "
                                 f"{med['p99_ms']:.2f} | {med['cpu_ms']:.3f} | {sum(r['checked'] for r in rows)} / "
                                 f"{sum(r['wrong'] for r in rows)} | {sum(r['errors'] for r in rows)} "
                                 f"({sum(r['non_200'] for r in rows)}) | {ratio} |")
        lines += ["", "Target (onnxpipe serve >= 2x the requests/s, lower p50 and p99):", ""] + [f"- {v}" for v in verdicts]
    finally:
        for pe in peers:
            pe.stop()
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        from results_md import write_section

        write_section("onnxpipe-serving-peers", "## Serving: onnxpipe serve, MLServer and KServe side by side "
                                                "(benchmarks/peers.py)\n\n" + text)


if __name__ == "__main__":
    main()
