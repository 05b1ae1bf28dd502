"""bench on a tiny run: the manifest gets every variant's metrics with sane values; bad options are clear errors."""
import json

import pytest
from typer.testing import CliRunner

from onnxpipe.stages.bench import BenchConfig, bench, bench_rows
from onnxpipe.cli import app
from onnxpipe.errors import ConfigError
from onnxpipe.core.peak import measure_peak
from onnxpipe.runfolder import Run

CELL_KEYS = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "runs", "throughput_rows_s", "speedup_vs_torch",
             "gflops", "fraction_of_peak", "compute_floor_ms", "overhead_ms", "limit"}


@pytest.fixture(scope="module")
def benched(tiny_run, copy_run_to, tmp_path_factory):
    run = Run.open(copy_run_to(tiny_run("cnn"), tmp_path_factory.mktemp("bench")))
    bench(run, BenchConfig(batches=(1, 8), threads=(1,), warmup=1, runs=5, memory=True))
    return Run.open(run.root)  # read back what was saved


def test_bench_writes_sane_metrics_for_every_variant(benched):
    assert set(benched.manifest["bench"]["variants"]) == set(benched.variants())
    for v in benched.variants():
        b = benched.metrics(v)["bench"]
        assert b["bytes"] == benched.artifact(v).bytes
        assert b["accuracy"] == benched.metrics(v).get("accuracy")  # onnx has none before verify
        assert b["flops"]["total"] > 0 and b["flops"]["kind"] == "fp32"
        assert b["import_rss_mb"] > 10 and b["peak_rss_mb"] >= b["import_rss_mb"]
        for batch in ("1", "8"):
            c = b["latency"]["1"][batch]
            assert CELL_KEYS <= set(c)
            assert 0 < c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"] and c["runs"] >= 5
            assert c["throughput_rows_s"] == pytest.approx(int(batch) / (c["p50_ms"] / 1000))
            assert c["gflops"] == pytest.approx(b["flops"]["total"] * int(batch) / (c["p50_ms"] / 1000) / 1e9)
            assert 0 < c["fraction_of_peak"] and c["limit"] in ("compute", "overhead")
    torch_cell = benched.metrics("torch")["bench"]["latency"]["1"]["1"]
    assert torch_cell["speedup_vs_torch"] == pytest.approx(1.0)
    limits = benched.manifest["bench"]["limits"]["1"]["by_batch"]["8"]
    assert limits["fp32_gflops"] > 1 and limits["int8_gops"] > 1 and limits["overhead_ms"] > 0


def test_bench_rows_cover_every_cell(benched):
    rows = bench_rows(benched)
    assert len(rows) == len(benched.variants()) * 2
    assert {r["variant"] for r in rows} == set(benched.variants())


def test_peak_measures_positive_rates():
    p = measure_peak(1, sizes=(64, 128), runs=3, min_seconds=0.0)
    assert p.fp32_gflops > 0.5 and p.int8_gops > 0.5 and p.overhead_ms > 0
    assert p.fp32_size in (64, 128) and set(p.by_size) == {"fp32@64", "fp32@128", "int8@64", "int8@128"}


@pytest.mark.parametrize("kwargs, match", [
    ({"batches": (0,)}, "batch"), ({"threads": (0,)}, "thread"), ({"device": "tpu"}, "device"), ({"runs": 0}, "runs"),
])
def test_bad_bench_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**kwargs)


def test_cli_bench_prints_table_and_rejects_bad_options(copy_of):
    root = copy_of("cnn")
    runner = CliRunner()
    res = runner.invoke(app, ["bench", str(root), "--batch", "2", "--threads", "1", "--runs", "3", "--warmup", "1",
                              "--no-memory"])
    assert res.exit_code == 0, res.output
    assert "onnx" in res.output and "FP32 matmul" in res.output
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["metrics"]["onnx"]["bench"]["latency"]["1"]["2"]["p50_ms"] > 0
    bad = runner.invoke(app, ["bench", str(root), "--batch", "1,x"])
    assert bad.exit_code == 1 and "--batch" in bad.output
    bad = runner.invoke(app, ["bench", str(root), "--variants", "nope"])
    assert bad.exit_code == 1 and "no variant" in bad.output


def test_timing_blocks_leave_the_cold_first_call_untimed():
    import time

    from onnxpipe.core.timing import time_interleaved

    last = {"who": None}

    def make(name):
        def call():
            if last["who"] != name:
                time.sleep(0.005)  # cold: the other candidate ran in between
            last["who"] = name
        return call

    fns = {"a": make("a"), "b": make("b")}
    cold = time_interleaved(fns, batch=1, warmup=0, runs=4)
    warm = time_interleaved(fns, batch=1, warmup=0, runs=4, block=3)
    assert cold["a"].p50 >= 5.0 and cold["a"].runs == 4
    assert warm["a"].p50 < 1.0 and warm["a"].runs == 8  # 2 timed calls per round


def test_bench_profiles_each_variant_and_the_report_reads_them(tiny_run, copy_run_to, tmp_path_factory):
    """--profile (all): every variant gets a profile per (threads, batch) that adds up to its call and names
    the ops of the graph ORT ran; the report's profile and limit sections are built from them."""
    import onnx

    from onnxpipe.core.profile import BETWEEN
    from onnxpipe.core.runtime import make_session
    from onnxpipe.stages.report import build_report, to_markdown

    run = Run.open(copy_run_to(tiny_run("cnn"), tmp_path_factory.mktemp("profiled")))
    run.set_selected("onnx")
    bench(run, BenchConfig(batches=(8,), threads=(1, 2), warmup=1, runs=3, memory=False, profile="all",
                           profile_runs=5))
    run = Run.open(run.root)
    assert run.section("bench")["profiled"] == sorted(run.variants())
    optimized = tmp_path_factory.mktemp("asrun") / "onnx.onnx"
    make_session(run.path("onnx"), device="cpu", threads=1, opt_level="all", optimized_model_path=optimized)
    graph_ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    prof = run.metrics("onnx")["bench"]["profile"]["2"]["8"]
    assert sum(prof["by_op"].values()) == pytest.approx(prof["run_ms"], rel=1e-6)
    assert set(prof["by_op"]) - {BETWEEN} <= graph_ops and prof["threads"] == 2
    assert 0.0 <= prof["parallel_share"] <= 1.0
    torch_prof = run.metrics("torch")["bench"]["profile"]["1"]["8"]
    assert torch_prof["total_ms"] > 0 and any("conv" in op for op in torch_prof["by_op"])
    md = to_markdown(build_report(run))
    assert "## Where the time goes" in md and "## Against the limit" in md
    assert "onnx at 2 thread(s), batch 8:" in md and "% of the FP32 matmul peak" in md
    assert "profile.png" in md


def test_bench_profiles_only_the_selected_and_torch_by_default(benched):
    # the module fixture ran with the default profile="selected"; the tiny run has no selection yet
    assert benched.manifest["bench"]["profiled"] == (["torch"] if benched.selected is None
                                                     else sorted({"torch", benched.selected}))
    assert all("profile" not in benched.metrics(v)["bench"] for v in benched.variants()
               if v not in benched.manifest["bench"]["profiled"])
