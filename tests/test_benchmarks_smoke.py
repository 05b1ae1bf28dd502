"""The benchmark script, end to end with tiny settings, so it cannot rot (benchmarks/ is never collected)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_script_writes_results_and_keeps_the_rest_of_results_md(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run("cnn"), runs / "cnn-default")          # reused: the script only measures it
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nNotes written by hand stay.\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_benchmarks.py"), "--models", "cnn", "--sizes", "default",
           "--out", str(runs), "--results", str(tmp_path / "results.json"), "--markdown", str(md),
           "--batch", "1,64", "--threads", "1", "--runs", "2", "--warmup", "0", "--block", "2", "--no-memory"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert run["model"] == "cnn" and set(run["variants"]) == {"torch", "onnx"}
    assert results["machine"]["cpu"] and "onnxruntime" in results["versions"]
    assert len(run["targets"]) == 5 and sum("peak" in t["target"] for t in run["targets"]) == 1
    best = [t for t in run["targets"] if "at its best threads" in t["target"]]
    assert len(best) == 2 and all(t["value"] == t["torch_p50_ms"] / t["variant_p50_ms"] for t in best)
    onnx_b64 = run["variants"]["onnx"]["latency"]["1"]["64"]["p50_ms"]
    assert next(t for t in best if t["target"].endswith("batch 64"))["variant_p50_ms"] == onnx_b64
    for t in run["targets"]:
        assert t["value"] is None or t["value"] > 0
    text = md.read_text()
    assert text.startswith("# Results\n\nNotes written by hand stay.") and text.count("onnxpipe-benchmarks:begin") == 1
    assert "| cnn | default | onnx" in text and "run_benchmarks.py --models cnn" in text
    assert (runs / "cnn-default" / "report.html").is_file()

    md.write_text(text.replace("| cnn | default | onnx", "| stale row"))
    render = cmd[:2] + ["--render-only", "--results", str(tmp_path / "results.json"), "--markdown", str(md)]
    done = subprocess.run(render, capture_output=True, text=True, timeout=120)  # measures nothing, rewrites the section
    assert done.returncode == 0, done.stderr[-2000:]
    again = md.read_text()
    assert again.count("onnxpipe-benchmarks:begin") == 1 and "stale row" not in again
    assert again.startswith("# Results\n\nNotes written by hand stay.") and "Where each model sits" in again


def test_distill_benchmark_smoke(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nHand-written notes stay.\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--models", "gru", "--seeds", "0", "--limit", "200",
           "--epochs", "1", "--out", str(tmp_path / "d.json"), "--write", "--markdown", str(md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "d.json").read_text())
    (row,) = res["models"]["gru"]["seeds"]
    assert row["student_params"] < row["teacher_params"] and 0 <= row["scratch_accuracy"] <= 1
    speed = res["models"]["gru"]["speed"]
    assert speed["b64"]["teacher_ms"] > 0 and speed["selected"]
    text = md.read_text()
    assert text.startswith("# Results\n\nHand-written notes stay.") and "| gru | gru |" in text
    assert text.count("<!-- distill:begin -->") == 1


def test_prune_benchmark_smoke(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nHand-written notes stay.\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "prune.py"), "--runs", "gru:default", "--ratios", "0.5",
           "--seeds", "0", "--limit", "200", "--epochs", "1", "--no-speed", "--out", str(tmp_path / "p.json"),
           "--write", "--markdown", str(md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "p.json").read_text())
    case = res["cases"]["gru:default"]
    s = case["summary"]
    assert s["pruned ratio 0.5"]["params"] < s["unpruned"]["params"]
    assert s["pruned at student params"]["params"] <= s["distilled student"]["params"]
    assert case["latency"] == {}                      # --no-speed; the timing itself is checked below
    text = md.read_text()
    assert text.startswith("# Results\n\nHand-written notes stay.") and "| pruned ratio 0.5 |" in text
    assert text.count("<!-- prune:begin -->") == 1 and "### Targets" in text


def test_prune_benchmark_times_onnx_files_side_by_side(tiny_run):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prune as bench_prune

    from onnxpipe.models import get_model

    onnx = str(tiny_run("cnn") / "model.onnx")
    spec = get_model("cnn")
    lat = bench_prune.timing({"a": onnx, "b": onnx}, 1, 2, spec, spec.make_config())
    assert set(lat) == {"a", "b"} and all(set(v) == {"1", "64"} and v["64"] > v["1"] > 0 for v in lat.values())


def test_transfer_benchmark_smoke(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "transfer.py"), "--shots", "5", "--seeds", "0", "--epochs", "1",
           "--budget-epochs", "", "--limit", "200", "--source-epochs", "1", "--out", str(tmp_path / "t.json"), "--plot", str(tmp_path / "c.png"),
           "--write", "--markdown", str(md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "t.json").read_text())
    cell = res["models"]["cnn"]["summary"]["5"]
    assert set(cell) >= {"frozen", "fine-tuned", "scratch"} and 0 <= cell["scratch"]["mean"] <= 1
    assert (tmp_path / "c.png").stat().st_size > 1000 and "![transfer curves](c.png)" in md.read_text()


def test_edge_benchmark_smoke(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run("cnn"), runs / "cnn-default")          # reused: the script packages and measures it
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nHand-written notes stay.\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "edge.py"), "--models", "cnn", "--out", str(runs), "--runs", "2",
           "--loads", "2", "--no-web", "--json", str(tmp_path / "edge.json"), "--markdown", str(md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "edge.json").read_text())["rows"]
    assert row["model"] == "cnn" and row["variant"] == "onnx" and row["ort_parity_max_abs"] < 1e-4
    assert set(row["load_ms"]) == {".onnx", ".onnx ext", ".ort"} and all(v > 0 for v in row["load_ms"].values())
    assert row["latency_ms"]["1"][".ort"] > 0 and row["peak_rss_mb"]["ort"] > 0
    text = md.read_text()
    assert text.startswith("# Results\n\nHand-written notes stay.") and text.count("<!-- edge:begin -->") == 1
    assert "| cnn | onnx |" in text and "edge.py --models cnn" in text


def test_serving_benchmarks_smoke(tiny_run, tmp_path):
    """benchmarks/serving.py (latency with gRPC, the orjson-vs-json servers) and benchmarks/overload.py (slow clients),
    with tiny settings; peers.py needs its own virtual environments and is not run here."""
    run = tiny_run("cnn")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), str(run), "--parts", "latency,codec",
                           "--requests", "60", "--seconds", "0.3", "--rounds", "1", "--clients", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| gRPC (raw_input_contents) |" in done.stdout and "| standard json |" in done.stdout
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overload.py"), str(run), "--parts", "slow"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for what in ("half the headers", "half the body"):
        assert f"a client that sends {what} and waits: answered 'HTTP/1.1 408'" in done.stdout


def _battery():
    """benchmarks/battery.py as a module (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("battery", ROOT / "benchmarks" / "battery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_battery_checker_counts_wrong_and_misrouted_answers():
    """The battery's answer check can fail: a foreign id, a moved value, a wrong status are each counted."""
    import numpy as np

    battery = _battery()
    want = np.arange(10, dtype=np.float32).reshape(1, 10)
    good = battery.Good(b"POST /x " + battery.PLACEHOLDER.encode(), np.array([0]), False, want)

    def answer(rid, values):
        return b"HTTP/1.1 200 OK\r\n\r\n", json.dumps({"id": rid, "model_name": "cnn", "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": values.ravel().tolist()}]}).encode()

    for exact, moved_is_wrong in ((False, False), (True, True)):
        mix = battery.Mix("cnn", [good], {}, 0.0, exact=exact)
        cases = [("own", want), ("foreign", want), ("own", want + 1e-6), ("own", want + 1.0)]
        for who, values in cases:
            raw, on_answer = mix()
            rid = raw.decode().split()[-1]
            assert rid == f"{mix.counter:012d}"
            on_answer(200, *answer(rid if who == "own" else "000000000999", values))
        raw, on_answer = mix()
        on_answer(500, b"HTTP/1.1 500 x\r\n\r\n", b'{"error": "boom"}')
        t = mix.tally
        assert (t.sent, t.good, t.good_200, t.misrouted, t.other_5xx, t.good_other) == (5, 5, 4, 1, 1, 1)
        assert t.exact == 1 and t.wrong == 1 + moved_is_wrong and t.max_abs == 1.0
    mix = battery.Mix("cnn", [good], {k: k.encode() for k in battery.BAD_KINDS}, 1.0, exact=False)
    for status in (400, 200, 503, 404, 500):
        _, on_answer = mix()
        on_answer(status, b"HTTP/1.1 x\r\n\r\n", b"{}")
    t = mix.tally
    assert (t.bad, t.bad_4xx, t.bad_other, t.shed, t.other_5xx) == (5, 2, 2, 1, 1)
    assert len(t.bad_by_kind) == 5


def test_reliability_battery_smoke(tiny_run, tmp_path):
    """benchmarks/battery.py end to end on a copy of the tiny CNN run: the FP32 variant and a dynamic INT8 copy,
    one short level each, then SIGTERM under load; the figures it reports are the targets."""
    root = tmp_path / "runs" / "cnn"
    shutil.copytree(tiny_run("cnn"), root)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nHand-written notes stay.\n")
    out = tmp_path / "battery.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "battery.py"), "--run", "runs/cnn", "--clients", "6",
           "--seconds", "1.5", "--dynamic-seconds", "1", "--bad-fraction", "0.2", "--catalog", "64",
           "--sigterm-clients", "6", "--sigterm-after", "0.5", "--json", str(out), "--write", "--markdown", str(md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)   # a relative --run
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failures"] == []
    fp32, dyn = res["parts"]
    assert (fp32["variant"], fp32["batched_across_callers"]) == ("onnx", True)
    assert (dyn["variant"], dyn["batched_across_callers"], dyn["batch_dependent"]) == ("int8_dynamic", False, True)
    assert (tmp_path / "runs" / "cnn-dynamic" / "int8_dynamic.onnx").is_file()
    for part in res["parts"]:
        (lv,) = part["levels"]
        assert lv["clients"] == 6 and lv["answered"] == lv["sent"] > 20 and lv["connection_errors"] == 0
        assert lv["other_5xx"] == lv["wrong"] == lv["misrouted"] == lv["good_other"] == lv["bad_other"] == 0
        assert lv["good_200"] + lv["shed"] == lv["good"] > 0 and lv["bad"] == lv["bad_4xx"] >= len(lv["bad_by_kind"]) == 7
        assert all(400 <= int(s) < 500 for by in lv["bad_by_kind"].values() for s in by)
        assert lv["bad_by_kind"]["unknown model"] == {"404": lv["bad_by_kind"]["unknown model"]["404"]}
        assert lv["bad_by_kind"]["oversized body"] == {"413": lv["bad_by_kind"]["oversized body"]["413"]}
        assert sum(int(v) for v in lv["statuses"].values()) == lv["answered"]
        assert 0 < part["rss_mb"]["ready"] <= part["rss_mb"]["peak"] and part["rss_mb"]["peak"] >= lv["rss_mb_after"]
        assert lv["rss_steady"]["answers"] > 0 and lv["rss_steady"]["to_mb"] <= part["rss_mb"]["peak"]
        s = part["sigterm"]
        assert s["exit_code"] == 0 and s["unanswered_before"] == 0 and s["sent_before"] > 0
        assert s["in_flight"] == s["in_flight_answered"] > 0 and s["wrong"] == s["other_5xx"] == 0
        assert part["server_log"]["shut_down_cleanly"] and part["server_log"]["tracebacks"] == 0
    assert dyn["levels"][0]["exact"] == dyn["levels"][0]["good_200"]   # bitwise: each request run alone
    assert dyn["levels"][0]["rows_per_call"] <= 8                         # never merged across callers
    text = md.read_text()
    assert text.startswith("# Results\n\nHand-written notes stay.") and text.count("onnxpipe-reliability-battery:begin") == 1
    assert "battery.py --run runs/cnn" in text and "**met**" in text
    again = tmp_path / "AGAIN.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "battery.py"), "--render", str(out), "--write",
                           "--markdown", str(again), "--note", "A note."], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]   # measures nothing: the same figures, with the note
    assert again.read_text().count("battery.py --run runs/cnn") == 1 and "its own id. A note." in again.read_text()


def test_int8_peers_benchmark_smoke(tiny_run, tmp_path):
    """benchmarks/int8_peers.py with ONNX Runtime's peers only (nothing extra to install), on a copy of the tiny
    CNN quantized by onnxpipe, from another folder with a relative --runs-dir: the numbers it writes, the run
    folder left as it was, and --render-only."""
    runs = tmp_path / "runs"
    run = runs / "cnn-default"
    shutil.copytree(tiny_run("cnn"), run)
    # the tiny model is barely trained: a wide budget, so that onnxpipe's INT8 and the peers are all judged by it
    done = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "quantize", str(run), "--mode", "dynamic,static",
                           "--max-drop", "100", "--min-agreement", "0", "--calib-samples", "64", "--exclusion-rounds", "0",
                           "--no-layout-search"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nHand-written notes stay.\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "int8_peers.py"), "--runs-dir", "runs", "--models", "cnn",
           "--peers", "ort_static_per_tensor,ort_static_per_channel,ort_dynamic", "--batches", "1,8", "--threads", "1",
           "--runs", "2", "--warmup", "0", "--block", "2", "--json", "peers.json", "--write", "--markdown", str(md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before   # only read
    res = json.loads((tmp_path / "peers.json").read_text())
    (m,) = res["models"]
    assert m["model"] == "cnn" and set(m["onnxpipe_variants"]) == {"int8_static", "int8_dynamic"} and not m["failed"]
    assert set(m["candidates"]) == {"fp32", "int8_static", "int8_dynamic", "ort_static_per_tensor",
                                    "ort_static_per_channel", "ort_dynamic"}
    assert m["calibration"]["samples"] == 64 and m["budget"] == {"max_accuracy_drop": 100.0, "min_agreement": 0.0}
    for name, c in m["candidates"].items():
        assert c["bytes"] > 0 and 0 <= c["agreement"] <= 1 and 0 <= c["accuracy"] <= 1 and c["within_budget"], name
    assert m["candidates"]["fp32"]["agreement"] == 1.0
    assert m["candidates"]["ort_dynamic"]["bytes"] < 0.5 * m["candidates"]["fp32"]["bytes"]   # int8 weights
    assert [(c["batch"], c["threads"]) for c in m["cells"]] == [(1, 1), (8, 1)]
    for c in m["cells"]:
        cell = m["latency"]["1"][str(c["batch"])]
        assert c["onnxpipe"] in ("int8_static", "int8_dynamic") and c["best_peer"] in m["candidates"]
        assert c["onnxpipe_ms"] == min(cell[v]["p50_ms"] for v in ("int8_static", "int8_dynamic"))
        assert c["peer_ms"] == min(cell[p]["p50_ms"] for p in m["candidates"] if p.startswith("ort_"))
        assert c["ratio"] > 0 and abs(c["ratio"] - c["onnxpipe_ms"] / c["peer_ms"]) < 1e-12
        assert c["verdict"] == ("level" if abs(c["ratio"] - 1) <= 0.03 else "ahead" if c["ratio"] < 1 else "behind")
        assert all(cell[n]["runs"] == 2 and cell[n]["p50_ms"] > 0 for n in m["candidates"])
    text = md.read_text()
    assert text.startswith("# Results\n\nHand-written notes stay.") and text.count("<!-- onnxpipe-int8-peers:begin -->") == 1
    assert "| cnn | 8 / 1 |" in text and "int8_peers.py --runs-dir runs --models cnn" in text

    md.write_text(text.replace("| cnn | 8 / 1 |", "| stale row |"))
    done = subprocess.run(cmd[:2] + ["--render-only", "--json", "peers.json", "--markdown", str(md)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    again = md.read_text()
    assert "stale row" not in again and "| cnn | 8 / 1 |" in again and again.count("onnxpipe-int8-peers:begin") == 1
