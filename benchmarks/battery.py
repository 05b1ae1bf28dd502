"""Reliability battery (issue 16) as a reproducible benchmark: `onnxpipe serve` under a mixed load with bad requests.

    nice -n 10 python benchmarks/battery.py --write                  # the recorded run (README, "Benchmarks")
    python benchmarks/battery.py --run exports/cnn --clients 8 --seconds 2 --json out.json

Against a real `onnxpipe serve RUN` subprocess (free port; benchmarks/serving.py's Server, so the settings
are --max-batch 32 --max-delay-ms 2 --workers 1, plus --max-body-mb 1 so that an oversized body is cheap to
send; everything else is the server's default), for each --clients level for --seconds: closed-loop clients
(pipeline/serving/loadgen.py) send a mix of good requests (distinct test rows from the run's reference.npz,
and the same rows x 50, in batches of 1 to 8 rows, binary and JSON, each with its own `id`) and about
--bad-fraction of bad ones (in turn: wrong shape, wrong datatype, malformed JSON, a missing input, an
unknown model, the impossible shape [0, 10**20, ...], a body over --max-body-mb). Every answer is checked against its own
request:

- a good request must get 200 (or 503/504: load shedding, counted apart), its `id` echoed, and its outputs
  equal to the *solo* answer computed here with ONNX Runtime on the same ONNX file: for a variant whose rows
  are independent (FP32), every row run alone, judged by the project's tensor tolerance
  (onnxpipe.core.policy.POLICY.tensor; how many were bitwise equal is given beside it); for a batch-dependent
  variant (dynamic INT8: one activation scale per call) the request run alone, which must be bitwise equal,
  since the server promises never to batch such a variant across callers;
- a bad request must get a 4xx (503/504 counted apart); any other 5xx is a failure.

The server's RSS (/proc/PID/status: VmRSS sampled every 0.1 s, VmHWM for the peak) is read when ready, after
each level and at SIGTERM, and from a third into each level to its end with the answers in between (once a
level's connections and buffers exist, a leak shows as growth per answer). Finally SIGTERM is sent while
--sigterm-clients clients keep sending: the exit status, and whether every request in flight at the signal
got its answer.

The run folder: --run PATH, else benchmarks/runs/cnn-default (built with run_benchmarks.py's build_or_open
when missing, reused when present); --variants says which of its variants are served, one fresh server each
(default: the selected one and `onnx`, the FP32 export, pinned with --variant). The batch-dependent part
(--dynamic auto, the default) serves the run's `int8_dynamic` variant (`--variant int8_dynamic`), made first
on a copy with `onnxpipe quantize --mode dynamic` when the run has none; --dynamic PATH serves another run's selected variant; --dynamic none skips
it. --json writes every figure, --write the section `onnxpipe-reliability-battery` of benchmarks/RESULTS.md
(--render JSON --write rewrites it from such a file, measuring nothing).
Exit status 1 when a target is missed (a 5xx other than 503/504, a wrong or misrouted answer, a bad request
not answered 4xx, a request in flight at SIGTERM left unanswered, a non-zero exit status). Never collected
by pytest (tests/test_benchmarks_smoke.py runs it with tiny settings).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from serving import Server  # noqa: E402

from onnxpipe.serving import loadgen  # noqa: E402

SECTION = "onnxpipe-reliability-battery"
ID_WIDTH = 12                      # every request's id has this many digits: a template's lengths never change
PLACEHOLDER = "#" * ID_WIDTH
MAX_ROWS = 8
LOUD = 50.0                        # the second set of rows: the test rows x 50 (a dynamic INT8 scale moves a lot)
BAD_KINDS = ("wrong shape", "wrong datatype", "malformed JSON", "missing input", "unknown model", "impossible shape",
             "oversized body")


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process in MB (Linux /proc)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class RssSampler:
    """VmRSS of the server every `every` s on a thread: samples (time, MB, answers so far by `count()`)."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every, self.samples = pid, every, []
        self.count = lambda: 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((time.perf_counter(), rss, self.count()))

    def steady(self, t0: float, t1: float) -> dict | None:
        """RSS from a third into [t0, t1] to its end, and the answers in between: growth once the level's
        connections and buffers exist (a leak shows as growth per answer)."""
        inside = [s for s in self.samples if t0 + (t1 - t0) / 3 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (_, a, n0), (_, b, n1) = inside[0], inside[-1]
        return {"from_mb": a, "to_mb": b, "answers": n1 - n0}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- the requests ---------------------------------------------------------------------------------------

def http(path: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: battery\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def bad_requests(model: str, name: str, row_shape: tuple[int, ...], max_body: int) -> dict[str, bytes]:
    """One raw request of each bad kind, for a model with one FP32 input `name` of rows shaped `row_shape`."""
    path = f"/v2/models/{model}/infer"
    n = int(np.prod(row_shape))
    wrong = [*row_shape[:-1], row_shape[-1] - 1]
    x = np.zeros((1, *row_shape), np.float32)

    def doc(**tensor) -> bytes:
        return json.dumps({"id": PLACEHOLDER, "inputs": [{"name": name, "datatype": "FP32", **tensor}]}).encode()

    blob = np.zeros(n, "<f8").tobytes()
    head = json.dumps({"id": PLACEHOLDER, "inputs": [{"name": name, "shape": [1, *row_shape], "datatype": "FP64",
                                                      "parameters": {"binary_data_size": len(blob)}}]}).encode()
    rows = max_body // x.nbytes + 16
    return {
        "wrong shape": http(path, doc(shape=[1, *wrong], data=[0.0] * int(np.prod(wrong)))),
        "wrong datatype": http(path, head + blob, "application/octet-stream", f"Inference-Header-Content-Length: {len(head)}\r\n"),
        "malformed JSON": http(path, doc(shape=[1, *row_shape], data=[0.0] * n)[:-40]),
        "missing input": http(path, json.dumps({"id": PLACEHOLDER, "inputs": [{"name": f"not_{name}", "datatype": "FP32",
                                                                               "shape": [1, *row_shape], "data": [0.0] * n}]}).encode()),
        "unknown model": loadgen.infer_request("no-such-model", name, x, binary=True, request_id=PLACEHOLDER),
        "impossible shape": http(path, doc(shape=[0, 10**20, *row_shape[1:]], data=[])),
        "oversized body": loadgen.infer_request(model, name, np.zeros((rows, *row_shape), np.float32), binary=True,
                                                request_id=PLACEHOLDER),
    }


@dataclass
class Good:
    """One good request: its raw bytes (id to fill in), the rows it holds and the answer it must get."""
    raw: bytes
    rows: np.ndarray
    binary: bool
    want: np.ndarray


def good_requests(model: str, name: str, x: np.ndarray, expected, rng: np.random.Generator, count: int) -> list[Good]:
    """`count` requests of 1 to MAX_ROWS distinct rows of x (half binary, half JSON); want = expected(rows)."""
    out = []
    sizes = [1, 1, 1, 1, 2, 3, 4, MAX_ROWS]
    for i in range(count):
        k = sizes[i % len(sizes)]
        rows = np.sort(rng.choice(len(x), size=min(k, len(x)), replace=False))
        binary = bool(i % 2)
        raw = loadgen.infer_request(model, name, x[rows], binary=binary, request_id=PLACEHOLDER)
        out.append(Good(raw, rows, binary, expected(rows)))
    return out


@dataclass
class Tally:
    """What one level (or the SIGTERM phase) saw."""
    sent: int = 0
    statuses: dict = field(default_factory=dict)
    good: int = 0
    good_200: int = 0
    shed: int = 0                     # 503 / 504 answers (good or bad requests)
    other_5xx: int = 0
    good_other: int = 0               # a good request answered something else than 200/503/504
    misrouted: int = 0                # the answer's id, model or row count is not its request's
    wrong: int = 0                    # the outputs are not the solo answer
    exact: int = 0                    # bitwise equal to the solo answer
    max_abs: float = 0.0
    bad: int = 0
    bad_4xx: int = 0
    bad_other: int = 0                # a bad request answered 200 or a 5xx other than 503/504
    bad_by_kind: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        d["bad_by_kind"] = {k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(self.bad_by_kind.items())}
        return d


class Mix:
    """The request function for loadgen: each call gives the next request (good, or bad with probability
    `bad_fraction`) and the callback that checks its answer into a Tally."""

    def __init__(self, model: str, goods: list[Good], bads: dict[str, bytes], bad_fraction: float, exact: bool,
                 seed: int = 0):
        from onnxpipe.core.policy import POLICY

        self.model, self.goods, self.bads, self.bad_fraction, self.exact = model, goods, bads, bad_fraction, exact
        self.tol = POLICY.tensor
        self.rng = np.random.default_rng(seed)
        self.counter = self.bad_sent = 0
        self.tally = Tally()
        self.log: list | None = None   # the SIGTERM phase: [t_sent, status or None, t_answered] per request

    def __call__(self):
        self.counter += 1
        rid = f"{self.counter:0{ID_WIDTH}d}"
        t = self.tally
        t.sent += 1
        record = [time.perf_counter(), None, None]
        if self.log is not None:
            self.log.append(record)
        if self.rng.random() < self.bad_fraction:
            self.bad_sent += 1
            kind = BAD_KINDS[self.bad_sent % len(BAD_KINDS)]   # in turn: every kind comes up
            raw = self.bads[kind]
            good = None
        else:
            kind, good = None, self.goods[int(self.rng.integers(len(self.goods)))]
            raw = good.raw
        raw = raw.replace(PLACEHOLDER.encode(), rid.encode(), 1)

        def on_answer(status: int, head: bytes, body: bytes) -> None:
            record[1], record[2] = status, time.perf_counter()
            t.statuses[status] = t.statuses.get(status, 0) + 1
            if status in (503, 504):
                t.shed += 1
            elif status >= 500:
                t.other_5xx += 1
                if len(t.examples) < 5:
                    t.examples.append(f"{status} for {'a good request' if good else kind}: {body[:300]!r}")
            if good is None:
                t.bad += 1
                by = t.bad_by_kind.setdefault(kind, {})
                by[status] = by.get(status, 0) + 1
                if 400 <= status < 500:
                    t.bad_4xx += 1
                elif status not in (503, 504):
                    t.bad_other += 1
                return
            t.good += 1
            if status == 200:
                t.good_200 += 1
                self.check(rid, good, head, body)
            elif status not in (503, 504):
                t.good_other += 1
                if len(t.examples) < 5:
                    t.examples.append(f"{status} for a good request: {body[:300]!r}")

        return raw, on_answer

    def check(self, rid: str, good: Good, head: bytes, body: bytes) -> None:
        t = self.tally
        try:
            doc, blob = loadgen.split_answer(head, body)
            out = doc["outputs"][0]
            got = (np.frombuffer(blob, "<f4") if "data" not in out else np.asarray(out["data"], np.float32))
            got = got.reshape(out["shape"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            t.misrouted += 1
            t.examples.append(f"an answer that does not parse ({e}): {body[:200]!r}")
            return
        if doc.get("id") != rid or doc.get("model_name") != self.model or got.shape != good.want.shape:
            t.misrouted += 1
            if len(t.examples) < 5:
                t.examples.append(f"request {rid} ({len(good.rows)} rows) got id {doc.get('id')!r}, model "
                                  f"{doc.get('model_name')!r}, shape {list(got.shape)}")
            return
        diff = np.abs(got.astype(np.float64) - good.want)
        t.max_abs = max(t.max_abs, float(diff.max()))
        same = bool(np.array_equal(got, good.want))
        t.exact += same
        ok = same if self.exact else bool(np.all(diff <= self.tol.atol + self.tol.rtol * np.abs(good.want)))
        if not ok:
            t.wrong += 1
            if len(t.examples) < 5:
                t.examples.append(f"request {rid} (rows {good.rows.tolist()}, {'binary' if good.binary else 'JSON'}): "
                                  f"max abs {float(diff.max()):.3g} from its solo answer")


# --- one server ------------------------------------------------------------------------------------------

def served_setting(run, variant: str):
    """(threads, execution mode) the server gives `variant`: ServedModel.prepare's own choice, so the solo
    answers here come from the same session setting."""
    from onnxpipe.serving.model import ServedModel

    m = ServedModel.prepare(run, variant, device="cpu")
    return m.threads, m.execution_mode


def solo_answers(run, variant: str, x: np.ndarray, batch_dependent: bool):
    """expected(rows): the answer each request must get, from ONNX Runtime on the same file in this process."""
    from onnxpipe.core.runtime import make_session

    if batch_dependent:  # the request alone, in one call, on the server's session setting: bitwise
        threads, mode = served_setting(run, variant)
        sess = make_session(run.path(variant), device="cpu", threads=threads, execution_mode=mode)
        return lambda rows: np.asarray(sess(x[rows]), np.float32)
    sess = make_session(run.path(variant), device="cpu", threads=1)
    per_row = np.concatenate([np.asarray(sess(x[i:i + 1]), np.float32) for i in range(len(x))])
    return lambda rows: per_row[rows]


def battery_on(run_dir: Path, variant: str | None, args, log) -> dict:
    """The whole battery against one `onnxpipe serve` subprocess; its figures as a dict."""
    from onnxpipe.core.policy import POLICY
    from onnxpipe.core.runtime import make_session
    from onnxpipe.runfolder import Run

    run = Run.open(run_dir)
    variant = variant or run.selected
    sess = make_session(run.path(variant), device="cpu", threads=1)
    if len(sess.input_names) != 1 or sess.input_types[0] != "tensor(float)":
        raise SystemExit(f"error: the battery drives models with one FP32 input; {variant} of {run_dir} takes "
                         f"{sess.input_names}")
    with np.load(Path(run_dir) / "reference.npz") as z:
        base = z["inputs"].astype(np.float32)
    x = np.concatenate([base, base * LOUD])       # distinct test rows, and the same rows loud
    extra = ["--max-body-mb", f"{args.max_body_mb:g}"] + (["--variant", variant] if variant != run.selected else [])
    t0 = time.monotonic()
    server = Server(str(run_dir), *extra)
    started_s = time.monotonic() - t0
    meta = json.loads(server.get(f"/v2/models/{run.model_name}"))
    batch_dependent = meta["parameters"].get("batched_across_callers") is False
    expected = solo_answers(run, variant, x, batch_dependent)
    rng = np.random.default_rng(args.seed)
    goods = good_requests(run.model_name, sess.input_names[0], x, expected, rng, args.catalog)
    bads = bad_requests(run.model_name, sess.input_names[0], tuple(x.shape[1:]), int(args.max_body_mb * 2**20))
    pid = server.proc.pid
    out = {"run": str(run_dir), "model": run.model_name, "variant": variant, "batch_dependent": batch_dependent,
           "batched_across_callers": meta["parameters"].get("batched_across_callers"),
           "threads": meta["parameters"].get("threads"), "rows": len(x), "catalog": len(goods),
           "judged": "bitwise equal to the request run alone" if batch_dependent else
           f"every row within POLICY.tensor (atol {POLICY.tensor.atol:g}, rtol {POLICY.tensor.rtol:g}) of the row run "
           "alone",
           "ready_s": round(started_s, 1), "rss_mb": {"ready": proc_status(pid).get("VmRSS")}, "levels": []}
    log(f"[{run_dir} {variant}] ready in {started_s:.1f} s; batched across callers: "
        f"{out['batched_across_callers']}; RSS {out['rss_mb']['ready']:.0f} MB")
    sampler = RssSampler(pid)
    answered = 0
    try:
        for i, clients in enumerate(args.clients):
            mix = Mix(run.model_name, goods, bads, args.bad_fraction, exact=batch_dependent, seed=args.seed + i)
            rc0 = server.rows_calls()
            sampler.count = lambda mix=mix, before=answered: before + sum(mix.tally.statuses.values())
            t_level = time.perf_counter()
            res = loadgen.run_load("127.0.0.1", server.port, mix, clients, args.seconds if not batch_dependent
                                   else args.dynamic_seconds, timeout=60)
            rows, calls = server.rows_calls() - rc0
            t = mix.tally
            answered += sum(res.statuses.values())
            level = {"clients": clients, "seconds": round(res.seconds, 1), **t.to_json(),
                     "answered": sum(res.statuses.values()), "connection_errors": res.errors,
                     "rps": round(sum(res.statuses.values()) / res.seconds, 1),
                     "p50_ms": round(res.percentile(50), 2), "p99_ms": round(res.percentile(99), 2),
                     "rows_per_call": round(rows / max(calls, 1), 2),
                     "rows_per_request": round(float(np.mean([len(g.rows) for g in goods])), 2),
                     "rss_mb_after": proc_status(pid).get("VmRSS"), "answered_so_far": answered,
                     "rss_steady": sampler.steady(t_level, time.perf_counter())}
            out["levels"].append(level)
            log(f"  {clients} clients, {level['seconds']} s: {level['answered']} answers {level['statuses']}, "
                f"5xx other than 503/504 {t.other_5xx}, wrong {t.wrong}, misrouted {t.misrouted}, bad {t.bad} "
                f"(4xx {t.bad_4xx}), max abs {t.max_abs:.3g}, {level['rows_per_call']} rows/call, RSS "
                f"{level['rss_mb_after']:.0f} MB (steady part: {level['rss_steady']})")
            for e in t.examples:
                log(f"    {e}")
        out["sigterm"] = sigterm_under_load(server, run.model_name, goods, bads, args, batch_dependent, log)
    finally:
        sampler.stop()
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    text = Path(server.log.name).read_text()
    os.unlink(server.log.name)
    out["rss_mb"].update(before_sigterm=out["sigterm"].pop("rss_mb_before"), peak=out["sigterm"].pop("hwm_mb"),
                         peak_sampled=max(s[1] for s in sampler.samples) if sampler.samples else None)
    out["server_log"] = {"errors": sum(1 for ln in text.splitlines() if " ERROR " in ln),
                         "tracebacks": text.count("Traceback"), "shut_down_cleanly": "shut down cleanly" in text,
                         "tail": text.splitlines()[-3:]}
    return out


def sigterm_under_load(server: Server, model: str, goods, bads, args, exact: bool, log) -> dict:
    """SIGTERM after --sigterm-after s of --sigterm-clients closed-loop clients, who go on until their connection
    ends: the exit status, and the fate of every request sent before and after the signal."""
    mix = Mix(model, goods, bads, args.bad_fraction, exact=exact, seed=args.seed + 99)
    mix.log = []
    pid = server.proc.pid
    when: dict = {}

    def term() -> None:
        st = proc_status(pid)
        when.update(t=time.perf_counter(), rss=st.get("VmRSS"), hwm=st.get("VmHWM"))
        server.proc.send_signal(signal.SIGTERM)

    async def main():
        asyncio.get_running_loop().call_later(args.sigterm_after, term)
        return await loadgen.drive("127.0.0.1", server.port, mix, args.sigterm_clients, args.sigterm_after + 120,
                                   timeout=60)

    res = asyncio.run(main())
    try:
        code = server.proc.wait(120)
    except subprocess.TimeoutExpired:
        code = None
    exited_s = time.perf_counter() - when["t"]
    before = [r for r in mix.log if r[0] < when["t"]]
    after = [r for r in mix.log if r[0] >= when["t"]]
    in_flight = [r for r in before if r[2] is None or r[2] >= when["t"]]  # sent before the signal, not yet answered
    out = {"clients": args.sigterm_clients, "after_s": args.sigterm_after, "exit_code": code,
           "exited_s_after_signal": round(exited_s, 2), "sent_before": len(before),
           "answered_before": sum(r[1] is not None for r in before),
           "unanswered_before": sum(r[1] is None for r in before), "in_flight": len(in_flight),
           "in_flight_answered": sum(r[1] is not None for r in in_flight),
           "sent_after": len(after), "answered_after": sum(r[1] is not None for r in after),
           "statuses": {str(k): v for k, v in sorted(mix.tally.statuses.items())}, "other_5xx": mix.tally.other_5xx,
           "wrong": mix.tally.wrong, "misrouted": mix.tally.misrouted, "connection_ends": res.errors,
           "rss_mb_before": when.get("rss"), "hwm_mb": when.get("hwm"), "examples": mix.tally.examples}
    log(f"  SIGTERM after {args.sigterm_after:g} s under {args.sigterm_clients} clients: exit {code} after "
        f"{exited_s:.2f} s; sent before the signal {out['sent_before']}, in flight at it {out['in_flight']} (answered "
        f"{out['in_flight_answered']}), unanswered {out['unanswered_before']}; sent "
        f"after it {out['sent_after']}, answered {out['answered_after']}; statuses {out['statuses']}, wrong "
        f"{out['wrong']}")
    return out


# --- the runs --------------------------------------------------------------------------------------------

def default_run(args, log) -> Path:
    from run_benchmarks import build_or_open

    import onnxpipe.models  # noqa: F401  (registers the built-in models)

    ns = argparse.Namespace(out=args.out, rebuild=False, stages=None, epochs=None, base_epochs=5, limit=None)
    run, took = build_or_open("cnn", "default", ns, log)
    return Path(run.root)


def dynamic_variant(run_dir: Path, args, log) -> tuple[Path, str | None]:
    """(run folder, variant) of the batch-dependent part: the run's int8_dynamic, else a copy quantized to it."""
    from onnxpipe.runfolder import Run

    if args.dynamic not in ("auto",):
        return Path(args.dynamic), None
    if Run.open(run_dir).has("int8_dynamic"):
        return run_dir, "int8_dynamic"
    copy = run_dir.parent / f"{run_dir.name}-dynamic"
    if not (copy / "manifest.json").is_file() or not Run.open(copy).has("int8_dynamic"):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy, symlinks=True)
        cmd = [sys.executable, "-m", "onnxpipe.cli", "quantize", str(copy), "--mode", "dynamic", "--max-drop", "100",
               "--min-agreement", "0"]
        log(f"making {copy}: {shlex.join(cmd[2:])}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {shlex.join(cmd)} failed: {done.stdout[-1000:]}{done.stderr[-1000:]}")
    return copy, "int8_dynamic"


def failures(result: dict) -> list[str]:
    out = []
    for part in result["parts"]:
        name = f"{part['variant']} of {part['run']}"
        for lv in part["levels"]:
            for key, what in (("other_5xx", "5xx other than 503/504"), ("wrong", "wrong answers"),
                              ("misrouted", "misrouted answers"), ("bad_other", "bad requests not answered 4xx"),
                              ("good_other", "good requests answered neither 200 nor 503/504")):
                if lv[key]:
                    out.append(f"{name}, {lv['clients']} clients: {lv[key]} {what}")
            if lv["connection_errors"]:
                out.append(f"{name}, {lv['clients']} clients: {lv['connection_errors']} broken connections")
        s = part["sigterm"]
        if s["exit_code"] != 0:
            out.append(f"{name}: exit status {s['exit_code']} after SIGTERM")
        if s["unanswered_before"]:
            out.append(f"{name}: {s['unanswered_before']} requests sent before SIGTERM were never answered")
        if s["other_5xx"] or s["wrong"] or s["misrouted"]:
            out.append(f"{name}: during the drain {s['other_5xx']} 5xx, {s['wrong']} wrong, {s['misrouted']} misrouted")
    return out


def shown(path: str) -> str:
    """A run folder as the section shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return path


def markdown(result: dict) -> str:
    lines = ["## Reliability battery (benchmarks/battery.py)", "",
             f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['usable_cpus']} usable CPUs, "
             f"shared), {result['when']}, load average {result['load_start']:.1f} at the start and "
             f"{result['load_end']:.1f} at the end; {result['seconds_total']:.0f} s in all. Server: `onnxpipe serve` "
             "as a subprocess with --max-batch 32 --max-delay-ms 2 --workers 1 --max-body-mb 1 (the rest default). "
             f"Each request is bad with probability {result['bad_fraction']:g} (one of: {', '.join(BAD_KINDS)}); good "
             f"ones hold 1 to {MAX_ROWS} distinct test rows (or the same rows x {LOUD:g}), binary or JSON, each with "
             "its own id." + (f" {result['note']}" if result.get("note") else ""), "",
             "| variant | clients | s | answers | statuses | 5xx other than 503/504 | shed 503/504 | good: 200 / wrong / "
             "misrouted / bitwise equal | max abs vs solo | bad: 4xx / other | rows per model call | req/s | RSS after (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for part in result["parts"]:
        for lv in part["levels"]:
            st = ", ".join(f"{k}: {v}" for k, v in lv["statuses"].items())
            lines.append(f"| {part['variant']} | {lv['clients']} | {lv['seconds']:g} | {lv['answered']} | {st} | "
                         f"{lv['other_5xx']} | {lv['shed']} | {lv['good_200']} / {lv['wrong']} / {lv['misrouted']} / "
                         f"{lv['exact']} | {lv['max_abs']:.2g} | {lv['bad_4xx']} / {lv['bad_other']} | "
                         f"{lv['rows_per_call']:g} (a request: {lv['rows_per_request']:g}) | {lv['rps']:.0f} | "
                         f"{lv['rss_mb_after']:.0f} |")
    lines.append("")
    for part in result["parts"]:
        s, r = part["sigterm"], part["rss_mb"]
        kinds = {}
        for lv in part["levels"]:
            for k, by in lv["bad_by_kind"].items():
                for status, n in by.items():
                    kinds.setdefault(k, {}).setdefault(status, 0)
                    kinds[k][status] += n
        total = sum(lv["answered"] for lv in part["levels"])
        lines += [f"- **{part['variant']}** of `{shown(part['run'])}` (batched across callers: {part['batched_across_callers']}; "
                  f"server threads {part['threads']}): good answers judged {part['judged']}. {total} answers in all.",
                  "  Bad requests by kind: " + "; ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ".",
                  f"  RSS {r['ready']:.0f} MB when ready, " + ", ".join(
                      f"{lv['rss_mb_after']:.0f} MB after {lv['answered_so_far']} answers" for lv in part["levels"])
                  + f", {r['before_sigterm']:.0f} MB at SIGTERM; peak {r['peak']:.0f} MB (VmHWM). From a third into "
                  "each level to its end: " + ", ".join(
                      f"{lv['clients']} clients {st['from_mb']:.1f} -> {st['to_mb']:.1f} MB over {st['answers']} answers"
                      for lv in part["levels"] if (st := lv["rss_steady"])) + ".",
                  f"  SIGTERM after {s['after_s']:g} s under {s['clients']} clients: exit status {s['exit_code']} "
                  f"{s['exited_s_after_signal']:g} s after the signal; {s['in_flight']} requests in flight at the "
                  f"signal, {s['in_flight_answered']} of them answered; of the {s['sent_before']} requests sent before "
                  f"it, {s['answered_before']} answered, {s['unanswered_before']} unanswered; {s['sent_after']} sent "
                  f"after it on connections still open, {s['answered_after']} answered"
                  + (" (the others were closed unread: a draining server closes its idle keep-alive connections)"
                     if s["sent_after"] > s["answered_after"] else "") + f"; statuses {s['statuses']}; "
                  f"wrong {s['wrong']}, 5xx other than 503/504 {s['other_5xx']}. Server log: "
                  f"{part['server_log']['errors']} ERROR lines, {part['server_log']['tracebacks']} tracebacks, "
                  f"'shut down cleanly': {part['server_log']['shut_down_cleanly']}."]
    fails = result["failures"]
    levels = [lv for part in result["parts"] for lv in part["levels"]]
    drains = [part["sigterm"] for part in result["parts"]]
    lines += ["", f"In all: {sum(lv['answered'] for lv in levels)} requests answered in the levels "
              f"({sum(lv['good_200'] for lv in levels)} good ones answered 200 and checked, {sum(lv['bad'] for lv in levels)} "
              f"bad ones), {sum(d['answered_before'] + d['answered_after'] for d in drains)} more during the SIGTERM "
              f"drains; {sum(lv['connection_errors'] for lv in levels)} broken connections."]
    lines += ["", "Targets (zero 5xx other than 503/504, zero wrong or misrouted answers, every bad request a 4xx, "
              "every request in flight at SIGTERM answered, exit status 0): "
              + ("**met**." if not fails else "**missed**: " + "; ".join(fails) + ".")]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    from onnxpipe.stages.configs import parse_int_list

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="run folder (default: benchmarks/runs/cnn-default, built if missing)")
    p.add_argument("--out", type=Path, default=HERE / "runs", help="where the default run folders live")
    p.add_argument("--variants", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()),
                   default=("selected", "onnx"), help="variants of the run to serve in turn, a fresh server each "
                                                      "(default selected,onnx: the selected one and FP32)")
    p.add_argument("--dynamic", default="auto", help="auto (the run's int8_dynamic, made on a copy if missing), a run "
                                                     "folder (its selected variant), or none")
    p.add_argument("--clients", type=lambda s: parse_int_list(s, "--clients"), default=(64, 256),
                   help="concurrency levels (default 64,256)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per level (default 30)")
    p.add_argument("--dynamic-seconds", type=float, default=None, help="seconds per level of the batch-dependent "
                                                                       "part (default: --seconds / 3)")
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--catalog", type=int, default=512, help="distinct good requests (row sets) per run")
    p.add_argument("--max-body-mb", type=float, default=1.0)
    p.add_argument("--sigterm-clients", type=int, default=64)
    p.add_argument("--sigterm-after", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--write", action="store_true", help=f"write the {SECTION} section of --markdown")
    p.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--note", default="", help="a sentence the section carries (e.g. why --seconds was lowered)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="measure nothing: write the section from an earlier run's --json file (with --write)")
    args = p.parse_args(argv)
    if args.dynamic_seconds is None:
        args.dynamic_seconds = args.seconds / 3
    return args


def main(argv=None) -> int:
    from onnxpipe.core.peak import machine_info

    args = parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        if args.note:
            result["note"] = args.note
        text = markdown(result)
        print(text)
        if args.write:
            from results_md import write_section

            write_section(SECTION, text, args.markdown)
        return 1 if result["failures"] else 0
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    run_dir = args.run if args.run is not None else default_run(args, log)
    from onnxpipe.runfolder import Run

    selected = Run.open(run_dir).selected
    variants = list(dict.fromkeys(selected if v == "selected" else v for v in args.variants))
    parts = [battery_on(run_dir, v, args, log) for v in variants]
    if args.dynamic != "none":
        dyn_dir, variant = dynamic_variant(run_dir, args, log)
        parts.append(battery_on(dyn_dir, variant, args, log))
    niceness = os.nice(0)
    result = {"command": (f"nice -n {niceness} " if niceness > 0 else "") + "python benchmarks/battery.py "
              + shlex.join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "load_start": load_start,
              "load_end": os.getloadavg()[0], "seconds_total": round(time.monotonic() - t_start, 1),
              "bad_fraction": args.bad_fraction, "note": args.note, "parts": parts}
    result["failures"] = failures(result)
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.write:
        from results_md import write_section

        write_section(SECTION, text, args.markdown)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
