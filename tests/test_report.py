"""The report: every manifest variant present, its numbers equal to the manifest's, valid PNGs, no network."""
import base64
import io
import re
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image

from onnxpipe.stages.bench import BenchConfig, bench
from onnxpipe.stages.report import ASSETS, REPORT_HTML, REPORT_MD, fmt_acc, fmt_ms, pareto_front, write_report
from onnxpipe.runfolder import Run


class Tables(HTMLParser):
    """Every <table> of a page as a list of rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def assert_png(data: bytes):
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    img.verify()


@pytest.fixture(scope="module")
def reported(tiny_run, copy_run_to, tmp_path_factory):
    """A tiny cnn run, benched, plus a lossy variant with parity and per-node divergence, then the report."""
    run = Run.open(copy_run_to(tiny_run("cnn"), tmp_path_factory.mktemp("report")))
    shutil.copy(run.root / "model.onnx", run.root / "model_int8.onnx")
    # Per-node divergence as pipeline/stages/divergence.py records it (node_errors rows).
    rows = [{"node": "/head/3/Gemm", "op": "Gemm", "tensor": "t1", "output_error": 0.31, "input_error": 0.01,
             "added_error": 0.3},
            {"node": "/features/0/Conv", "op": "Conv", "tensor": "t0", "output_error": 0.02, "input_error": 0.0,
             "added_error": 0.02}]
    with run.batch():
        run.add_artifact("int8_dynamic", "model_int8.onnx", stage="quantize", parent="onnx", lossy=True)
        run.set_metrics("onnx", accuracy=0.9)
        run.set_metrics("int8_dynamic", accuracy=0.875, node_divergence=rows, node_divergence_source="test")
        run.record_parity({"reference": "onnx", "candidate": "int8_dynamic", "rule": "task", "passed": True,
                           "max_abs": 0.4, "agreement": 0.99, "accuracy_drop": 2.5, "shapes": [[360, 10]]})
        run.set_selected("int8_dynamic")
    bench(run, BenchConfig(batches=(1, 4), threads=(1,), warmup=1, runs=3, block=2, memory=False))
    page, md = write_report(run)
    return Run.open(run.root), page.read_text(), md.read_text()


def test_report_files_are_written(reported):
    run, _, _ = reported
    assert (run.root / REPORT_HTML).is_file() and (run.root / REPORT_MD).is_file()


def test_every_variant_with_the_manifest_numbers(reported):
    run, page, md = reported
    parser = Tables()
    parser.feed(page)
    variants_table = next(t for t in parser.tables if t[0][:3] == ["variant", "parent", "kind"])
    header, rows = variants_table[0], {r[0]: r for r in variants_table[1:]}
    assert set(rows) == set(run.variants())
    for v, row in rows.items():
        cell = dict(zip(header, row))
        assert cell["accuracy"] == fmt_acc(run.metrics(v).get("accuracy"))
        assert cell["KiB"] == f"{run.artifact(v).bytes / 1024:.1f}"
        for b in ("1", "4"):
            assert cell[f"p50 ms b{b}"] == fmt_ms(run.metrics(v)["bench"]["latency"]["1"][b]["p50_ms"])
        assert v in md
    assert rows["int8_dynamic"][header.index("selected")] == "*"
    matrix = next(t for t in parser.tables if t[0][0] == "reference" and "int8_dynamic" in t[0] and len(t[0]) <= 4)
    assert any("agree 0.990" in c for r in matrix for c in r)


def test_images_are_inline_valid_pngs_and_nothing_is_fetched(reported):
    run, page, md = reported
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) >= 4  # accuracy vs latency, latency bars, training, divergence
    for data in images:
        assert_png(base64.b64decode(data))
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert f"{ASSETS}/divergence_int8_dynamic.png" in linked
    for rel in linked:
        assert_png((run.root / rel).read_bytes())


def test_pareto_front_keeps_only_undominated_points():
    pts = [("slow_best", 10.0, 0.99), ("fast_ok", 1.0, 0.95), ("dominated", 5.0, 0.94), ("mid", 3.0, 0.97)]
    assert pareto_front(pts) == ["fast_ok", "mid", "slow_best"]


def test_pipeline_ends_with_bench_explain_report_stages(copy_of):
    from onnxpipe.orchestrate import STAGES, Context

    names = [n for n, _ in STAGES]
    assert names[-3:] == ["bench", "explain", "report"] and names.index("verify") < names.index("bench")
    run = Run.open(copy_of("cnn"))
    ctx = Context(progress=False, sections={
        "bench": {"batches": [2], "threads": [1], "runs": 2, "warmup": 0, "block": 2, "memory": False},
        "explain": {"samples": 2, "steps": 2}})
    for name, fn in STAGES[-3:]:
        fn(run, ctx)
    page = (run.root / REPORT_HTML).read_text()
    assert "explain/torch.png" in (run.root / REPORT_MD).read_text() and "Every bench cell" in page


def test_cli_report_writes_both_files(copy_of):
    from typer.testing import CliRunner

    from onnxpipe.cli import app

    root = copy_of("cnn")
    res = CliRunner().invoke(app, ["report", str(root)])
    assert res.exit_code == 0 and "report.html" in res.output
    assert (root / REPORT_HTML).is_file() and (root / REPORT_MD).is_file()
    assert "No latency measured yet" in (root / REPORT_MD).read_text()


def test_per_node_divergence_of_a_quantized_variant_is_measured_and_charted(copy_of):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxpipe.core.data import reload_dataset
    from onnxpipe.stages.divergence import record_node_divergence

    run = Run.open(copy_of("cnn"))
    quantize_dynamic(str(run.path("onnx")), str(run.root / "int8.onnx"), weight_type=QuantType.QInt8)
    run.add_artifact("int8_dynamic", "int8.onnx", stage="quantize", parent="onnx", lossy=True)
    assert record_node_divergence(run, reload_dataset(run.manifest["dataset"]), samples=16) == ["int8_dynamic"]
    rows = run.metrics("int8_dynamic")["node_divergence"]
    assert rows and {"node", "op", "added_error", "output_error"} <= set(rows[0])
    assert [r["added_error"] for r in rows] == sorted((r["added_error"] for r in rows), reverse=True)
    assert any(r["op"] == "Conv" and r["output_error"] > 0 for r in rows)
    page, md = write_report(run)
    assert f"{ASSETS}/divergence_int8_dynamic.png" in md.read_text()
    assert_png((run.root / ASSETS / "divergence_int8_dynamic.png").read_bytes())


def test_the_report_leads_with_the_answer(reported, tmp_path):
    """Before any detail: which variant, what it buys against torch at each benched batch and in size, what
    it costs (the drop with its interval and McNemar p-value), and the runners-up."""
    import numpy as np

    from onnxpipe.core.parity import paired_delta

    run = Run.open(shutil.copytree(reported[0].root, tmp_path / "run"))
    right = np.arange(360) % 10 != 0                              # torch right on 90 % of 360 rows
    cand = right.copy()
    flip = [0, 10, 20, 30, 1, 2, 3, 4]                            # 8 rows differ: 4 only int8 gets, 4 only torch
    cand[flip] = ~cand[flip]
    u = paired_delta(right, cand)
    with run.batch():
        run.record_parity({"reference": "torch", "candidate": "int8_dynamic", "rule": "task", "passed": True,
                           "max_abs": 0.4, "agreement": 0.98, "accuracy_drop": u.delta_pt, "shapes": [[360, 10]],
                           "uncertainty": u.to_json()})
        run.update_section("selection", ranking=["int8_dynamic", "onnx", "torch"])
    _, md = write_report(run)
    lead = md.read_text().split("\n## ")[0]                       # everything before the first section
    lat = {v: {b: run.metrics(v)["bench"]["latency"]["1"][b]["p50_ms"] for b in ("1", "4")}
           for v in ("torch", "int8_dynamic")}
    speed = [lat["torch"][b] / lat["int8_dynamic"][b] for b in ("1", "4")]
    size = run.artifact("int8_dynamic").bytes / run.artifact("torch").bytes
    assert lead.count("**int8_dynamic** is the selected variant") == 1
    for x, b in zip(speed, (1, 4)):
        assert f"{x:.2f}x {'faster' if x >= 1 else 'as fast'} than torch at batch {b}" in lead
    assert f"{size:.2f}x the size of torch" in lead
    assert "accuracy cost: drop 0.00 pt [95% CI" in lead and "McNemar p=1: not distinguishable from 0" in lead
    assert "Closest: onnx, torch." in lead
    table = [line for line in lead.splitlines() if line.startswith("| int8_dynamic (selected) |")]
    assert len(table) == 1 and f"| {speed[1]:.2f} |" in table[0] and f"| {size:.2f}x |" in table[0]
