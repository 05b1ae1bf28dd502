"""Edge packages: the ORT format with its reduced-build operator config, and the web page in headless
Chromium, for an image and a sequence model (tiny runs); edge-aware selection from recorded numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxpipe.atomic import sha256_file
from onnxpipe.core.policy import POLICY
from onnxpipe.errors import ArtifactError, ConfigError, ParityError
from onnxpipe.runfolder import Run
from onnxpipe.stages.configs import CHROMIUM, PackageConfig
from onnxpipe.stages.package import (check_operators, config_operators, graph_operators, missing_operators,
                                     package)
from onnxpipe.stages.select import choose

HAS_CHROMIUM = Path(CHROMIUM).is_file()
needs_chromium = pytest.mark.skipif(not HAS_CHROMIUM, reason=f"needs Debian's chromium at {CHROMIUM} "
                                    "(apt-get install -y chromium; .ci/run installs it)")
GRID_SHAPES = {"cnn": len(POLICY.batches), "lstm": 3 * len(POLICY.batches)}   # batches x (1, T, 2T) for sequences


@pytest.fixture(scope="module")
def runs(tiny_run, copy_run_to, tmp_path_factory):
    """Private copies of the tiny cnn and lstm runs (packages write into their manifests)."""
    base = tmp_path_factory.mktemp("package-runs")
    return {m: copy_run_to(tiny_run(m), base) for m in ("cnn", "lstm")}


@pytest.fixture(scope="module")
def ort_packages(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-packages")
    return {m: package(Run.open(root), PackageConfig(target="ort"), out / m) for m, root in runs.items()}


def _files_match(pkg) -> None:
    files = {str(p.relative_to(pkg.out)) for p in pkg.out.rglob("*") if p.is_file()}
    assert files == set(pkg.info["files"]) | {"manifest.json"}
    for rel, rec in pkg.info["files"].items():
        assert sha256_file(pkg.out / rel) == rec["sha256"] and (pkg.out / rel).stat().st_size == rec["bytes"]
    assert pkg.info["bytes"] == sum(r["bytes"] for r in pkg.info["files"].values())


@pytest.mark.parametrize("model", ["cnn", "lstm"])
def test_ort_package_matches_the_onnx_over_the_grid_and_lists_every_operator(model, runs, ort_packages):
    pkg = ort_packages[model]
    m = pkg.info
    assert set(m["files"]) == {"model.ort", "required_operators.config"}
    _files_match(pkg)
    run = Run.open(runs[model])
    assert m["source"]["variant"] == "onnx" and m["source"]["sha256"] == run.artifact("onnx").sha256
    assert m["model"]["optimization_level"] == "extended"
    dims = m["inputs"][0]["dims"]
    assert dims[0] == "batch" and (dims[1] == "seq_len") == (model == "lstm")
    assert m["inputs"][0]["dtype"] == "float32" and m["outputs"][0]["name"] == "logits"
    assert m["normalization"] == run.dataset_info["normalization"] and m["labels"] == [str(i) for i in range(10)]

    # the proof: the .ort against the .onnx over the export grid, within the tensor tolerance
    (p,) = m["parity"]
    assert p["reference"] == "onnx" and p["candidate"] == "ort" and p["rule"] == "tensor" and p["passed"]
    assert len(p["shapes"]) == GRID_SHAPES[model] and p["max_abs"] < POLICY.tensor.atol
    assert {tuple(s)[0] for s in p["shapes"]} == set(POLICY.batches)
    # every node of the .ort graph is in the config the converter wrote
    ort_file, config = pkg.out / "model.ort", pkg.out / "required_operators.config"
    assert graph_operators(ort_file) <= config_operators(config) and m["operators"]["count"] == len(graph_operators(ort_file))
    if model == "cnn":  # the extended level's fusions (FusedConv, FusedGemm) are in the file and the config
        assert "com.microsoft" in m["operators"]["domains"]
    assert '{"inputs"' in config.read_text()              # with the converter's per-operator types
    # memory of a fresh process that loads the package and runs one row
    for kind in ("ort", "onnx"):
        mem = m["memory"][kind]
        assert mem["rows"] == 1 and 0 < mem["import_rss_mb"] < mem["peak_rss_mb"] < 1000
    # the run's manifest: the package and a parity entry in the `ort` column
    rec = run.section("packages")["ort:onnx"]
    assert rec["bytes"] == m["bytes"] and rec["out"] == str(pkg.out.resolve()) and rec["parity"] == [True]
    assert run.parity(reference="onnx", candidate="ort")[0]["max_abs"] == p["max_abs"]


def test_a_config_missing_an_operator_of_the_graph_is_caught(ort_packages, tmp_path):
    pkg = ort_packages["cnn"]
    good = pkg.out / "required_operators.config"
    assert missing_operators(pkg.out / "model.ort", good) == []
    # hand-edited: FusedConv dropped from the com.microsoft line (the optimized graph runs every Conv as one)
    edited = tmp_path / "edited.config"
    text = good.read_text()
    assert "FusedConv," in text
    edited.write_text(text.replace("FusedConv,", ""))
    assert missing_operators(pkg.out / "model.ort", edited) == ["com.microsoft;1;FusedConv"]
    with pytest.raises(ArtifactError, match=r"does not list 1 operator.*com\.microsoft;1;FusedConv.*Failed to find kernel"):
        check_operators(pkg.out / "model.ort", edited)
    # the classic mismatch: an operator listed at another opset than the node's
    reshape = next(line for line in text.splitlines() if "Reshape" in line)
    other = tmp_path / "opset.config"
    other.write_text(text.replace(reshape, reshape.replace(";14;", ";5;")))
    assert "ai.onnx;14;Reshape" in missing_operators(pkg.out / "model.ort", other)


def test_the_package_runs_in_a_second_process_from_relative_paths(runs, tmp_path):
    """`onnxpipe package` from another working directory with relative paths, then the .ort loaded by a fresh
    process that knows nothing of onnxpipe reproduces the run's reference outputs."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    import shutil

    shutil.copytree(runs["lstm"], work / "runs" / "lstm")
    done = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "package", "runs/lstm", "edge/lstm", "--target", "ort"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parity onnx -> ort over 9 shape(s): pass" in done.stdout and "every node listed" in done.stdout
    code = ("import json, sys, numpy as np, onnxruntime as ort\n"
            "m = json.load(open('edge/lstm/manifest.json'))\n"
            "s = ort.InferenceSession('edge/lstm/model.ort', providers=['CPUExecutionProvider'])\n"
            "z = np.load('runs/lstm/reference.npz')\n"
            "x = z['inputs'] if 'inputs' in z.files else z['input:' + m['inputs'][0]['name']]\n"
            "y = s.run(None, {m['inputs'][0]['name']: x})[0]\n"
            "print(json.dumps({'max_abs': float(np.abs(y - z['outputs']).max()), 'rows': len(y)}))")
    probe = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    got = json.loads(probe.stdout)
    assert got["rows"] == Run.open(work / "runs/lstm").section("reference")["rows"] and got["max_abs"] < POLICY.tensor.atol
    again = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "package", "runs/lstm", "edge/lstm"], cwd=work,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        "error: edge/lstm already holds an onnxpipe package; pass --force to replace it"]


def test_bad_package_requests_are_one_clear_error(runs, tmp_path):
    with pytest.raises(ConfigError, match="layout/all|NCHWc"):
        PackageConfig(ort_level="all")
    with pytest.raises(ConfigError, match="applies to --target web"):
        PackageConfig(target="ort", check=True)
    with pytest.raises(ConfigError, match="unknown package target"):
        PackageConfig(target="tflite")
    run = Run.open(runs["cnn"])
    with pytest.raises(ConfigError, match="torch model; package an ONNX variant"):
        package(run, PackageConfig(variant="torch"), tmp_path / "p")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not an onnxpipe package"):
        package(run, PackageConfig(force=True), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- the web page in a real browser ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def web_packages(runs, tmp_path_factory):
    if not HAS_CHROMIUM:
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    out = tmp_path_factory.mktemp("web-packages")
    return {m: package(Run.open(root), PackageConfig(target="web", check=True, bench_calls=20), out / m)
            for m, root in runs.items()}


@needs_chromium
@pytest.mark.parametrize("model", ["cnn", "lstm"])
def test_web_package_answers_every_reference_input_in_headless_chromium(model, runs, web_packages):
    pkg = web_packages[model]
    m = pkg.info
    _files_match(pkg)
    assert {"index.html", "app.js", "preprocess.js", "config.json", "model.onnx", "ort/ort.wasm.min.mjs",
            "ort/ort-wasm-simd-threaded.wasm"} <= set(m["files"])
    run = Run.open(runs[model])
    assert m["files"]["model.onnx"]["sha256"] == run.artifact("onnx").sha256  # the variant, byte for byte
    page = json.loads((pkg.out / "config.json").read_text())
    assert page["normalization"] == run.dataset_info["normalization"] and page["ort_web"]["version"] == "1.30.0"
    assert len(page["examples"]) == PackageConfig().examples

    (p,) = m["parity"]
    assert p["reference"] == "onnx" and p["candidate"] == "web" and p["rule"] == "tensor" and p["passed"]
    assert p["max_abs"] < POLICY.tensor.atol and m["browser"]["rows"] == run.section("reference")["rows"]
    b = m["browser"]
    assert "Chromium" in b["browser"] and b["execution_provider"] == "wasm" and b["offline"]
    assert b["requests"] >= 5  # the page, its modules, config, model, wasm: all from the loopback server
    # the page's image path (grayscale, inversion, area average, bilinear, normalize) is Python's, bit for bit
    assert b["preprocessing"]["passed"] and b["preprocessing"]["max_abs_vs_python"] <= 1e-6
    assert b["drawn_on_pad"].startswith("class ")  # a mouse stroke on the canvas went through the page's image path
    lat = b["latency_b1"]
    assert lat["browser_wasm_ms"] > 0 and lat["native_cpu_ms"] > 0 and lat["calls"] == 20 and lat["threads"] == 1
    shot = runs[model] / b["screenshot"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    # the run's manifest: the `web` column, and the report shows the page
    entry = run.parity(reference="onnx", candidate="web")[0]
    assert entry["passed"] and entry["max_abs"] == p["max_abs"]
    from onnxpipe.stages.report import write_report

    page_html, md = write_report(run)
    text = md.read_text()
    assert "## Edge packages" in text and b["screenshot"] in text and "| web |" in text.split("### Matrix")[1].split("\n")[2]


@needs_chromium
def test_a_lossy_variant_in_the_browser_is_judged_by_its_budget(runs, tmp_path):
    from onnxpipe.core.data import reload_dataset
    from onnxpipe.stages.configs import QuantizeConfig
    from onnxpipe.stages.quantize import quantize

    run = Run.open(runs["lstm"])
    quantize(run, QuantizeConfig(mode="dynamic", max_accuracy_drop=100.0, min_agreement=0.9),
             reload_dataset(run.dataset_info))
    pkg = package(run, PackageConfig(target="web", variant="int8_dynamic", check=True, bench_calls=10), tmp_path / "w")
    (p,) = pkg.info["parity"]
    budget = POLICY.budget_between(run, "onnx", "int8_dynamic")  # from the FP32 graph it came from
    assert p["rule"] == "task" and p["min_agreement"] == budget.min_agreement == 0.9  # the budget its lineage recorded
    assert p["passed"] and p["agreement"] >= 0.99  # the same INT8 graph: WASM agrees with the CPU EP


@needs_chromium
def test_a_browser_result_outside_the_tolerance_fails_and_writes_no_package(runs, tmp_path):
    run = Run.open(runs["cnn"])
    with pytest.raises(ParityError, match="onnx -> web"):
        package(run, PackageConfig(target="web", check=True, atol=0.0, rtol=0.0, bench_calls=5), tmp_path / "strict")
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict.*"))
    failed = Run.open(runs["cnn"]).parity(reference="onnx", candidate="web")[0]
    assert not failed["passed"] and failed["atol"] == 0.0  # recorded as evidence


def test_check_without_chromium_is_one_clear_error(runs, tmp_path):
    with pytest.raises(Exception, match="apt-get install -y chromium"):
        package(Run.open(runs["cnn"]), PackageConfig(target="web", check=True, chromium=str(tmp_path / "none")),
                tmp_path / "w")


# --- edge-aware selection ---------------------------------------------------------------------------------

def row(b1, b64, size, rss=None, *, parent="torch", lossy=False, eligible=True):
    return {"latency_ms": {"1": b1, "64": b64}, "parent": parent, "lossy": lossy, "eligible": eligible,
            "bytes": size, "peak_rss_mb": rss}


TABLE = {"onnx": row(1.0, 20.0, 390_000, 64.0), "onnx_opt": row(0.9, 18.0, 376_000, 63.0, parent="onnx"),
         "int8_static": row(0.8, 12.0, 110_000, 70.0, parent="onnx", lossy=True),
         "fp16": row(1.5, 30.0, 204_000, 61.0, parent="onnx", lossy=True)}


def test_selection_within_size_and_memory_limits_from_recorded_numbers():
    assert choose(TABLE).selected == "int8_static"                                   # no limits: the fastest
    sel = choose(TABLE, max_rss_mb=65.0)                                             # int8_static needs 70 MB
    assert sel.selected == "onnx_opt" and sel.over_limits == {"int8_static": {"max_rss_mb": 5.0}}
    assert "70.0 MB (5.0 MB over --max-rss-mb 65)" in sel.excluded["int8_static"]
    assert choose(TABLE, max_bytes=200_000).selected == "int8_static"                # the only one under 200 kB
    assert choose(TABLE, max_bytes=380_000, max_rss_mb=65.0).selected == "onnx_opt"
    # fp16 is slower than its parent: never selected, even when it is the only variant within the limits
    sel = choose(TABLE, max_bytes=250_000, max_rss_mb=62.0)
    assert sel.selected is None and "fp16" in sel.slower_than_parent and sel.closest == "int8_static"
    assert sel.why_none.startswith("no variant within budget fits --max-bytes 250,000 and --max-rss-mb 62: the "
                                   "smallest, int8_static, has 110,000 bytes (within --max-bytes) and a peak RSS of "
                                   "70.0 MB (8.0 MB over --max-rss-mb 62)")
    sel = choose(TABLE, max_bytes=100_000)
    assert sel.selected is None and sel.closest == "int8_static"
    assert "110,000 bytes (10,000 over --max-bytes 100,000, 10%)" in sel.why_none
    unmeasured = {**TABLE, "onnx_opt": {**TABLE["onnx_opt"], "peak_rss_mb": None}}
    assert choose(unmeasured, max_rss_mb=65.0).selected == "onnx"                     # no number: does not fit


def test_select_measures_memory_and_names_the_closest_variant(copy_of):
    from typer.testing import CliRunner

    from onnxpipe.cli import app

    root = copy_of("cnn")
    runner = CliRunner()
    onnx_bytes = Run.open(root).artifact("onnx").bytes
    r = runner.invoke(app, ["select", str(root), "--runs", "3", "--warmup", "1", "--max-rss-mb", "5000",
                            "--max-bytes", str(onnx_bytes)])
    assert r.exit_code == 0, r.output
    run = Run.open(root)
    mem = run.metrics("onnx")["edge_memory"]
    assert mem["rows"] == 1 and mem["threads"] == 1 and 0 < mem["peak_rss_mb"] < 5000
    assert run.selected == "onnx" and run.section("selection")["limits"]["max_bytes"] == onnx_bytes
    r = runner.invoke(app, ["select", str(root), "--runs", "3", "--warmup", "1", "--max-rss-mb", "1"])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: no variant within budget fits --max-rss-mb 1: the smallest, onnx, has a peak RSS of "
                           f"{mem['peak_rss_mb']:.1f} MB ({mem['peak_rss_mb'] - 1:.1f} MB over --max-rss-mb 1)"), line
