"""onnxpipe's INT8 against the peers' INT8 of the same FP32 file: accuracy, top-1 agreement with FP32, file
size and latency side by side, for every model; results in benchmarks/int8_peers.json and, with --write, the
"onnxpipe-int8-peers" section of benchmarks/RESULTS.md.

    nice -n 10 python benchmarks/int8_peers.py --write                  # the four default runs, every peer
    python benchmarks/int8_peers.py --runs-dir /path/to/runs --models cnn --peers ort_static_per_tensor,ort_dynamic
    python benchmarks/int8_peers.py --render-only                       # rewrite the section from the json

Run folders: <runs-dir>/<model>-default (default benchmarks/runs, as `python benchmarks/run_benchmarks.py`
builds them) with onnxpipe's INT8 variants (int8_static, int8_dynamic where they fit the budget). They are
only read: the FP32 file (variant `onnx`) and onnxpipe's INT8 files are copied into a temporary folder, and
every peer quantizes that copy there.

Peers (each a small runner in benchmarks/peers_int8/, run in a child process by peers_int8/run_peer.py, so
anyone can re-run one alone and a native crash costs one peer, not the benchmark):
  ort_static_per_tensor / ort_static_per_channel  ONNX Runtime quantize_static (QDQ, U8S8, MinMax) after
                                                   quant_pre_process
  ort_dynamic                                      ONNX Runtime quantize_dynamic after quant_pre_process
  nncf_ptq                                         nncf.quantize on the ONNX model (its defaults)
  olive_static / olive_dynamic                     Olive's OnnxStaticQuantization / OnnxDynamicQuantization
  optimum_static / optimum_dynamic                 optimum's ORTQuantizer, AutoQuantizationConfig.avx512_vnni
                                                   (from benchmarks/peers-venv/optimum: see peers_int8/optimum_ort.py)
Every static peer calibrates on the same training rows onnxpipe's int8_static used
(onnxpipe.stages.quantize.calibration_samples with its recorded sample count and seed). A peer that cannot be
imported, cannot quantize the graph, or writes a model ONNX Runtime cannot run is recorded with its exact error.

Measured: accuracy and top-1 agreement with FP32 on the run's test split (predict_batched), judged by the
budget onnxpipe's own INT8 was held to (recorded with it; the parity policy's lossy budget otherwise); file
size; latency of FP32, onnxpipe's INT8 variants and every peer that runs, timed interleaved in one loop
(onnxpipe.core.timing, sessions from make_session(path, device="cpu", threads=t, spinning=False)) at each
batch and thread count. Per cell: onnxpipe's best INT8 (lowest p50 of its variants) against the best peer
(lowest p50 of the peers within the budget), "level" within NEAR_TIE (3 %)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / "peers_int8"
SECTION = "onnxpipe-int8-peers"
MODELS = ("cnn", "lstm", "gru", "transformer")
ONNXPIPE_INT8 = ("int8_static", "int8_dynamic")
OPTIMUM_PYTHON = HERE / "peers-venv" / "optimum" / "bin" / "python"

# name -> (runner module in peers_int8/, its options, who runs it: "project" venv or "optimum" venv)
PEERS = {
    "ort_static_per_tensor": ("ort_static", {"per_channel": False}, "project"),
    "ort_static_per_channel": ("ort_static", {"per_channel": True}, "project"),
    "ort_dynamic": ("ort_dynamic", {}, "project"),
    "nncf_ptq": ("nncf_ptq", {}, "project"),
    "olive_static": ("olive_passes", {"mode": "static"}, "project"),
    "olive_dynamic": ("olive_passes", {"mode": "dynamic"}, "project"),
    "optimum_static": ("optimum_ort", {"static": True}, "optimum"),
    "optimum_dynamic": ("optimum_ort", {"static": False}, "optimum"),
}
# The libraries whose versions a runner's result reports (its interpreter's).
RUNNER_DISTS = {"ort_static": (), "ort_dynamic": (), "nncf_ptq": ("nncf",), "olive_passes": ("olive-ai",),
                "optimum_ort": ("optimum", "optimum-onnx", "transformers", "onnxruntime")}
ORT_PEERS = ("ort_static_per_tensor", "ort_static_per_channel", "ort_dynamic")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all four)")
    p.add_argument("--runs-dir", type=Path, default=HERE / "runs",
                   help="folder holding <model>-default run folders (only read; default benchmarks/runs)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated peers (default all: {', '.join(PEERS)})")
    p.add_argument("--batches", default="1,64", help="batch sizes timed (default 1,64)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts timed (default 1,2)")
    p.add_argument("--runs", type=int, default=15, help="timed rounds per cell (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per cell (default 3)")
    p.add_argument("--block", type=int, default=3, help="calls per candidate per round, the first untimed (default 3)")
    p.add_argument("--peer-timeout", type=float, default=900, help="seconds one peer may take to quantize")
    p.add_argument("--optimum-python", type=Path, default=OPTIMUM_PYTHON,
                   help="interpreter with optimum-onnx installed (default benchmarks/peers-venv/optimum/bin/python)")
    p.add_argument("--json", type=Path, default=HERE / "int8_peers.json", help="results file (default benchmarks/int8_peers.json)")
    p.add_argument("--write", action="store_true", help="write the onnxpipe-int8-peers section of --markdown")
    p.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the section from --json")
    p.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --- building the peers ---------------------------------------------------------------------------------

def run_peer(name: str, src: Path, calib: Path, work: Path, args, *, family: str, model: str) -> dict:
    """One peer's runner in a child process (peers_int8/run_peer.py): its JSON result, or why there is none."""
    module, options, venv = PEERS[name]
    options = dict(options)
    if module == "nncf_ptq":
        options["transformer"] = model == "transformer"
    python = sys.executable if venv == "project" else str(args.optimum_python)
    out, wd = work / f"{name}.onnx", work / name
    wd.mkdir()
    base = {"peer": name, "runner": f"benchmarks/peers_int8/{module}.py", "python": python}
    if venv != "project" and not Path(python).is_file():
        return {**base, "ok": False, "stage": "install",
                "error": f"no interpreter at {python}: make it as peers_int8/{module}.py says (--optimum-python)"}
    cmd = [python, str(PEERS_DIR / "run_peer.py"), module, str(src), str(out), str(calib), str(wd), json.dumps(options)]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout, cwd=wd)
    except subprocess.TimeoutExpired:
        return {**base, "ok": False, "stage": "quantize", "error": f"took longer than --peer-timeout {args.peer_timeout:.0f} s"}
    seconds = round(time.monotonic() - t0, 1)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {**base, "ok": False, "stage": "crash", "seconds": seconds, "error": f"the runner died ({how}): {tail[0][:300]}"}
    res = {**base, **json.loads(lines[-1]), "seconds": seconds}
    if "error" in res:  # the temporary folder's name says nothing to a reader
        res["error"] = res["error"].replace(str(work), "<tmp>")
    if res["ok"]:
        res["path"] = str(out)
        res["bytes"] = out.stat().st_size
    return res


# --- one model --------------------------------------------------------------------------------------------

def measure_model(model: str, args, peers: list[str], log) -> dict:
    import numpy as np

    import onnxpipe.models  # noqa: F401  (registers the built-in models)
    from onnxpipe.core.data import reload_dataset
    from onnxpipe.core.parity import judge
    from onnxpipe.core.policy import POLICY, Budget
    from onnxpipe.core.predictors import predict_batched
    from onnxpipe.core.runtime import make_session
    from onnxpipe.core.timing import time_predictors
    from onnxpipe.runfolder import Run
    from onnxpipe.stages.configs import QuantizeConfig
    from onnxpipe.stages.quantize import calibration_samples

    run = Run.open(args.runs_dir / f"{model}-default")
    ours = [v for v in ONNXPIPE_INT8 if run.has(v)]
    if not ours:
        raise SystemExit(f"{run.root} has no INT8 variant of onnxpipe ({', '.join(ONNXPIPE_INT8)}): run "
                         f"`onnxpipe quantize {run.root}` (or python benchmarks/run_benchmarks.py) first")
    recorded = [run.budget_for(v, "onnx") for v in ours]
    budget = Budget.from_json(recorded[0]) if recorded[0] else POLICY.lossy
    calib_rec = run.artifact("int8_static").extra.get("calibration", {}) if run.has("int8_static") else {}
    defaults = QuantizeConfig()
    n_calib, seed = int(calib_rec.get("samples", defaults.calib_samples)), int(calib_rec.get("seed", defaults.seed))
    ds = reload_dataset(run.dataset_info)
    calib, _ = calibration_samples(ds, n_calib, seed)

    with tempfile.TemporaryDirectory(prefix="int8-peers-") as tmp:
        work = Path(tmp)
        files = {"fp32": work / "fp32.onnx"}
        shutil.copyfile(run.path("onnx"), files["fp32"])           # sha256-checked by run.path
        for v in ours:
            files[v] = work / f"{v}.onnx"
            shutil.copyfile(run.path(v), files[v])
        np.savez(work / "calib.npz", **{f"input:{k}": v for k, v in calib.items()})
        family = run.spec_of("onnx").family
        built = {}
        for name in peers:
            log(f"[{model}] {name}")
            built[name] = run_peer(name, files["fp32"], work / "calib.npz", work, args, family=family, model=model)
            if built[name]["ok"]:
                files[name] = Path(built[name]["path"])
            else:
                log(f"[{model}]   {name} failed at {built[name]['stage']}: {built[name]['error']}")

        ref = predict_batched(make_session(files["fp32"], device="cpu"), ds.x_test)
        cands = {}
        for name, path in files.items():
            logits = ref if name == "fp32" else predict_batched(make_session(path, device="cpu"), ds.x_test)
            rep = judge(budget, "fp32", name, ref, logits, ds.y_test)
            kind = "fp32" if name == "fp32" else "onnxpipe" if name in ours else "peer"
            cands[name] = {"kind": kind, "bytes": path.stat().st_size, "accuracy": rep.candidate_accuracy,
                           "agreement": rep.agreement, "accuracy_drop_pt": rep.accuracy_drop,
                           "within_budget": bool(rep.passed)}
            if kind == "peer":
                cands[name].update({k: built[name].get(k) for k in ("pre_process", "settings", "seconds", "runner")})

        rows = np.arange(max(ints(args.batches))) % len(ds.x_test)
        inputs = {b: ds.x_test[rows[:b]].arrays for b in ints(args.batches)}
        latency = {}
        for t in ints(args.threads):
            log(f"[{model}] timing {len(files)} candidates at {t} thread(s)")
            sessions = {n: make_session(p, device="cpu", threads=t, spinning=False) for n, p in files.items()}
            lat = time_predictors(sessions, inputs, warmup=args.warmup, runs=args.runs, block=args.block)
            latency[str(t)] = {str(b): {n: v.to_json() for n, v in cells.items()} for b, cells in lat.items()}
            del sessions
    failed = {n: {k: r.get(k) for k in ("stage", "error", "runner", "seconds")} for n, r in built.items() if not r["ok"]}
    peer_versions = {}
    for name, r in built.items():
        for k, v in (r.get("versions") or {}).items():
            if k in RUNNER_DISTS[PEERS[name][0]]:
                peer_versions.setdefault(f"{k} ({PEERS[name][2]} venv)" if PEERS[name][2] != "project" else k, set()).add(v)
    return {"model": model, "run": str(run.root), "budget": budget.to_json(), "calibration": {"samples": len(calib), "seed": seed},
            "test_rows": len(ds.x_test), "onnxpipe_variants": ours, "candidates": cands, "latency": latency,
            "failed": failed, "cells": compare(cands, latency),
            "peer_versions": {k: sorted(v) for k, v in peer_versions.items()}}


def oversubscribed(latency: dict, threads: str, batch: str) -> str | None:
    """Why a multi-thread cell is not judged, or None: FP32 there slower than at one thread by more than
    run_benchmarks.py's limit means other processes held the cores (the one rule of the benchmarks)."""
    from run_benchmarks import VARIANT_SLOWDOWN_LIMIT

    one, many = latency.get("1", {}).get(batch, {}).get("fp32"), latency[threads][batch]["fp32"]
    limit = VARIANT_SLOWDOWN_LIMIT["1" if batch == "1" else "64"]
    if threads == "1" or not one or many["p50_ms"] <= limit * one["p50_ms"]:
        return None
    return (f"not judged: FP32 is {many['p50_ms'] / one['p50_ms']:.1f}x slower at {threads} threads than at 1 "
            "(cores held by other processes)")


def compare(cands: dict, latency: dict) -> list[dict]:
    """Per (threads, batch): onnxpipe's fastest INT8 against the fastest peer within the budget."""
    from onnxpipe.core.timing import NEAR_TIE

    out = []
    for t, per_batch in latency.items():
        for b, cell in per_batch.items():
            ours = min((n for n, c in cands.items() if c["kind"] == "onnxpipe" and n in cell), key=lambda n: cell[n]["p50_ms"])
            peers = [n for n, c in cands.items() if c["kind"] == "peer" and c["within_budget"] and n in cell]
            row = {"threads": int(t), "batch": int(b), "fp32_ms": cell["fp32"]["p50_ms"], "onnxpipe": ours,
                   "onnxpipe_ms": cell[ours]["p50_ms"], "best_peer": None, "peer_ms": None, "ratio": None,
                   "verdict": "no peer within the budget"}
            if peers:
                best = min(peers, key=lambda n: cell[n]["p50_ms"])
                ratio = cell[ours]["p50_ms"] / cell[best]["p50_ms"]
                verdict = (oversubscribed(latency, t, b)
                           or ("level" if abs(ratio - 1) <= NEAR_TIE else "ahead" if ratio < 1 else "behind"))
                row.update(best_peer=best, peer_ms=cell[best]["p50_ms"], ratio=ratio, verdict=verdict)
            out.append(row)
    return out


# --- the section ----------------------------------------------------------------------------------------

def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = ["## onnxpipe's INT8 against the peers' INT8 (`benchmarks/int8_peers.py`)", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']} ({', '.join(res['machine']['flags'])}), {res['machine']['usable_cpus']} "
             f"usable CPUs, shared; load average {res['load_start']} at the start, {res['load_end']} at the end; "
             f"{res['date']}, {res['seconds']:.0f} s.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             f"Every candidate is made from the same FP32 `model.onnx` of the run; static peers calibrate on the same "
             f"training rows as onnxpipe's int8_static. Accuracy and agreement with FP32 on the test split; a peer "
             f"counts as *best peer* only within onnxpipe's budget (the one its own INT8 was held to). Latency: p50 ms "
             f"over {s['runs']} interleaved rounds of {s['block']} calls (the first untimed), every candidate in the "
             f"same rounds, `make_session(device=cpu, threads=t, spinning=False)`. Ratio = onnxpipe's best INT8 / "
             f"best peer (below 1: onnxpipe faster); *level* within {res['near_tie']:.0%}.", ""]
    lines += ["| model | batch / threads | FP32 ms | onnxpipe best INT8 | ms | best peer | ms | onnxpipe / peer | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        for c in m["cells"]:
            peer_ms = "-" if c["peer_ms"] is None else f"{c['peer_ms']:.3f}"
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}"
            lines.append(f"| {m['model']} | {c['batch']} / {c['threads']} | {c['fp32_ms']:.3f} | {c['onnxpipe']} | "
                         f"{c['onnxpipe_ms']:.3f} | {c['best_peer'] or '-'} | {peer_ms} | {ratio} | {c['verdict']} |")
    cells = [c for m in res["models"] for c in m["cells"]]
    judged = [c for c in cells if c["verdict"] in ("ahead", "level", "behind")]
    behind = [f"{m['model']} b{c['batch']}/{c['threads']}t ({c['ratio']:.2f})" for m in res["models"] for c in m["cells"]
              if c["verdict"] == "behind"]
    unjudged = [f"{m['model']} b{c['batch']}/{c['threads']}t: {c['verdict']}" for m in res["models"] for c in m["cells"]
                if c not in judged]
    lines += ["", f"Target (onnxpipe's INT8 ahead of or level with the best peer in every cell): "
              f"**{'met' if judged and not behind else 'missed'}**; of the {len(cells)} cells, {len(judged)} judged: "
              f"{sum(c['verdict'] == 'ahead' for c in judged)} ahead, {sum(c['verdict'] == 'level' for c in judged)} level, "
              f"{len(behind)} behind{' (' + ', '.join(behind) + ')' if behind else ''}."
              + (f" Not judged: {'; '.join(unjudged)}." if unjudged else "")]
    for m in res["models"]:
        cols = [(t, b) for t, per in m["latency"].items() for b in per]
        lines += ["", f"### {m['model']}", "",
                  f"Budget: accuracy drop <= {m['budget']['max_accuracy_drop']} points, agreement >= "
                  f"{m['budget']['min_agreement']}; {m['test_rows']} test rows; calibration {m['calibration']['samples']} "
                  f"training rows (seed {m['calibration']['seed']}). Latency as a ratio to FP32 (lower is faster).", "",
                  "| candidate | KiB | accuracy | agreement | within budget | "
                  + " | ".join(f"b{b} / {t}t" for t, b in cols) + " | how |",
                  "|---|---|---|---|---|" + "---|" * len(cols) + "---|"]
        for n, c in m["candidates"].items():
            lat = [m["latency"][t][b].get(n) for t, b in cols]
            ratios = [f"{x['p50_ms'] / m['latency'][t][b]['fp32']['p50_ms']:.2f}" if x else "-"
                      for x, (t, b) in zip(lat, cols)]
            how = "" if c["kind"] != "peer" else f"{c.get('settings') or ''}; {c.get('pre_process') or ''}"
            lines.append(f"| {n} | {c['bytes'] / 1024:.1f} | {pct(c['accuracy'])} | {pct(c['agreement'])} | "
                         f"{'yes' if c['within_budget'] else 'no'} | " + " | ".join(ratios) + f" | {how} |")
        over = [f"{n} (accuracy {pct(c['accuracy'])}, agreement {pct(c['agreement'])})"
                for n, c in m["candidates"].items() if c["kind"] == "peer" and not c["within_budget"]]
        if over:
            lines += ["", "Over the budget (not counted as best peer): " + "; ".join(over) + "."]
        if m["failed"]:
            lines += ["", "Peers that could not give a model that runs:", ""]
            lines += [f"- {n} ({f['runner']}), at {f['stage']}: `{f['error']}`" for n, f in m["failed"].items()]
    return "\n".join(lines)


def versions_now(models: list[dict]) -> dict:
    from onnxpipe.runfolder import library_versions

    v = {k: x for k, x in library_versions().items() if k in ("python", "onnxruntime", "onnx", "torch", "numpy")}
    for m in models:
        for k, xs in m["peer_versions"].items():
            v[k] = "/".join(sorted(set(v.get(k, "").split("/")) - {""} | set(xs)))
    return v


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    from results_md import write_section  # benchmarks/results_md.py: one writer for every section

    if args.render_only:
        write_section(SECTION, markdown(json.loads(args.json.read_text())), args.markdown)
        return 0
    from onnxpipe.core.peak import machine_info
    from onnxpipe.core.timing import NEAR_TIE

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0, load_start = time.monotonic(), " ".join(f"{x:.1f}" for x in os.getloadavg())
    models = [measure_model(m.strip(), args, peers, log) for m in args.models.split(",") if m.strip()]
    command = "python benchmarks/int8_peers.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    res = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.monotonic() - t0, 1),
           "machine": machine_info(), "load_start": load_start, "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
           "versions": versions_now(models), "near_tie": NEAR_TIE, "peers": peers,
           "settings": {"runs": args.runs, "warmup": args.warmup, "block": args.block, "batches": ints(args.batches),
                        "threads": ints(args.threads)}, "models": models}
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    if args.write:
        write_section(SECTION, text, args.markdown)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
