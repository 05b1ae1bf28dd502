"""`onnxpipe compare`: one table and one plot across run folders, the Pareto front over all their variants."""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from onnxpipe.runfolder import Run
from onnxpipe.stages.compare import compare


@pytest.fixture
def two_runs(tiny_run, tmp_path):
    """Two copies of a tiny cnn run with timings and accuracies set by hand (as select records them)."""
    a = Run.open(shutil.copytree(tiny_run("cnn"), tmp_path / "a" / "cnn"))
    b = Run.open(shutil.copytree(tiny_run("cnn"), tmp_path / "b" / "cnn"))
    shutil.copy(b.root / "model.onnx", b.root / "fast.onnx")
    b.add_artifact("int8_static", "fast.onnx", stage="quantize", parent="onnx", lossy=True)
    a.set_metrics("onnx", accuracy=0.90, latency_ms={"1": 0.10, "64": 2.0})
    b.set_metrics("onnx", accuracy=0.95, latency_ms={"1": 0.20, "64": 4.0})      # slower, more accurate: on the front
    b.set_metrics("int8_static", accuracy=0.85, latency_ms={"1": 0.15, "64": 3.0})  # dominated by a:onnx
    b.record_parity({"reference": "torch", "candidate": "int8_static", "rule": "task", "passed": True,
                     "max_abs": 0.3, "agreement": 0.99, "accuracy_drop": 0.5, "shapes": [],
                     "uncertainty": {"delta_pt": 0.5, "ci_pt": [-0.4, 1.4], "confidence": 0.95, "a_only": 3,
                                     "b_only": 1, "rows": 100, "mcnemar_p": 0.625}})
    return a, b


def test_compare_marks_the_pareto_front_across_runs_and_writes_md_png_html(two_runs, tmp_path):
    a, b = two_runs
    res = compare([a, b], tmp_path / "out")
    assert res.fronts[64] == ["a/cnn:onnx", "b/cnn:onnx"] and res.fronts[1] == ["a/cnn:onnx", "b/cnn:onnx"]
    rows = {(r["run"], r["variant"]): r for r in res.rows}
    assert set(rows) == {("a/cnn", "torch"), ("a/cnn", "onnx"), ("b/cnn", "torch"), ("b/cnn", "onnx"),
                         ("b/cnn", "int8_static")}
    assert rows[("b/cnn", "int8_static")]["Pareto front"] == "" and rows[("a/cnn", "onnx")]["Pareto front"] == "b1, b64"
    assert rows[("b/cnn", "int8_static")]["p50 ms b64"] == "3.000"
    assert rows[("b/cnn", "int8_static")]["drop vs its torch (95% CI, McNemar)"].startswith(
        "0.50 pt [95% CI -0.40, 1.40], McNemar p=0.62: not distinguishable from 0")
    assert rows[("a/cnn", "onnx")]["drop vs its torch (95% CI, McNemar)"].startswith("lossless")
    md = res.markdown.read_text()
    assert "compare_files/accuracy_vs_latency.png" in md and "| b/cnn | int8_static |" in md
    img = Image.open(res.png)
    assert img.format == "PNG" and img.size[0] > 300
    page = res.html.read_text()
    assert "data:image/png;base64," in page and "int8_static" in page and "http" not in page.split("<details>")[0]


def test_compare_command_measures_side_by_side(two_runs, tmp_path):
    from typer.testing import CliRunner

    from onnxpipe.cli import app

    a, b = two_runs
    r = CliRunner().invoke(app, ["compare", str(a.root), str(b.root), "--out", str(tmp_path / "cmp"), "--measure",
                                 "--runs", "2", "--batch", "1,8"])
    assert r.exit_code == 0, r.output
    import json

    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    onnx_points = [p for p in summary["points"] if p["variant"] != "torch"]
    assert len(onnx_points) == 3 and all(set(p["latency_ms"]) == {"1", "8"} and min(p["latency_ms"].values()) > 0
                                          for p in onnx_points)
    assert "measured here, interleaved" in summary["timing"]
    one = CliRunner().invoke(app, ["compare", str(a.root)])
    assert one.exit_code == 1 and "at least two run folders" in one.output
