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
