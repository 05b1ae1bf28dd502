"""Selection: the rule on recorded timings (pure), verdicts from the manifest, CPU features, and one
real timing pass that writes latency, marks and the machine record."""
import pytest

from onnxpipe.core.cpu import cpu_features, features_from_flags, parse_cpuinfo
from onnxpipe.core.data import reload_dataset
from onnxpipe.errors import ConfigError
from onnxpipe.orchestrate import STAGES, Context
from onnxpipe.stages.quantize import QuantizeConfig, quantize
from onnxpipe.runfolder import Run
from onnxpipe.core.runtime import SessionSetting
from onnxpipe.core.timing import thread_candidates
from onnxpipe.stages.select import NEAR_TIE, SelectConfig, best_setting, choose, score, select, verdict


def v(b1, b64, *, parent=None, lossy=False, eligible=True, why=""):
    return {"latency_ms": {"1": b1, "64": b64}, "parent": parent, "lossy": lossy, "eligible": eligible, "why": why}


def test_fastest_variant_within_budget_is_selected():
    table = {"onnx": v(1.0, 20.0, parent="torch"), "onnx_opt": v(0.9, 19.0, parent="onnx"),
             "int8_dynamic": v(0.5, 12.0, parent="onnx", lossy=True)}
    sel = choose(table)
    assert sel.selected == "int8_dynamic" and sel.ranking == ["int8_dynamic", "onnx_opt", "onnx"]
    assert not sel.slower_than_parent and not sel.excluded


def test_quantized_variant_slower_than_its_parent_is_never_selected():
    # Fastest overall by the geometric mean, but slower than FP32 at batch 1: marked and excluded.
    table = {"onnx": v(1.0, 20.0, parent="torch"), "int8_static": v(1.05, 5.0, parent="onnx", lossy=True),
             "fp16": v(3.0, 60.0, parent="onnx", lossy=True)}
    sel = choose(table)
    assert sel.selected == "onnx"
    assert sel.slower_than_parent == {"int8_static": ["1"], "fp16": ["1", "64"]}
    assert "slower than its parent onnx at batch 1" in sel.excluded["int8_static"]


def test_lossless_variants_are_not_held_to_their_parent_and_ineligible_ones_never_win():
    table = {"onnx": v(1.0, 20.0, parent="torch"), "onnx_opt": v(1.1, 16.0, parent="onnx"),
             "int8_static": v(0.2, 2.0, parent="onnx", lossy=True, eligible=False, why="over budget")}
    sel = choose(table)
    assert sel.selected == "onnx_opt" and sel.excluded == {"int8_static": "over budget"}
    assert "onnx_opt" not in sel.slower_than_parent


def test_objective_picks_one_batch_size():
    table = {"a": v(1.0, 10.0, parent="torch"), "b": v(2.0, 8.0, parent="torch")}
    assert choose(table, "1").selected == "a" and choose(table, "64").selected == "b"
    assert score({"1": 1.0, "64": 16.0}) == pytest.approx(4.0)


def test_student_variants_compete_through_their_verdicts():
    # A distilled student's INT8 child competes like any variant; its FP32 parent is student_onnx.
    table = {"onnx": v(1.0, 20.0, parent="torch"), "student_onnx": v(0.4, 6.0, parent="student"),
             "student_int8_static": v(0.3, 4.0, parent="student_onnx", lossy=True)}
    assert choose(table).selected == "student_int8_static"
    assert choose({}).selected is None


def test_bad_select_options_are_clear_errors():
    with pytest.raises(ConfigError, match="objective"):
        SelectConfig(objective="32")
    with pytest.raises(ConfigError, match="batch sizes"):
        SelectConfig(batches=(0, 64))


def test_cpu_features_from_cpuinfo():
    avx2 = "processor\t: 0\nmodel name\t: Old EPYC\nflags\t\t: fpu sse4_2 avx fma avx2\n"
    info = parse_cpuinfo(avx2)
    f = features_from_flags(info["flags"])
    assert info["model"] == "Old EPYC" and f["avx2"] and not f["avx512f"] and not f["int8_dot"]
    vnni = features_from_flags(parse_cpuinfo(avx2.replace("avx2", "avx2 avx512f avx512_vnni"))["flags"])
    assert vnni["avx512_vnni"] and vnni["int8_dot"]
    amx = features_from_flags({"amx_int8", "amx_tile"})
    assert amx["amx_int8"] and amx["int8_dot"]
    here = cpu_features()
    assert here["usable_cpus"] >= 1 and set(here["features"]) >= {"avx2", "avx512_vnni", "amx_int8", "int8_dot"}


def test_verdicts_follow_the_manifest_and_the_lineage(copy_of, edit):
    run = Run.open(copy_of("cnn"))
    quantize(run, QuantizeConfig(mode="static", max_accuracy_drop=100.0, min_agreement=0.0),
             reload_dataset(run.manifest["dataset"]))
    assert verdict(run, "onnx") == (True, "") and verdict(run, "int8_static") == (True, "")

    def fail_onnx(m):
        for p in m["parity"]:
            if p["candidate"] == "onnx":
                p["passed"] = False

    edit(run.root, fail_onnx)
    run = Run.open(run.root)
    ok, why = verdict(run, "onnx")
    assert not ok and "failed its tensor check against torch" in why
    ok, why = verdict(run, "int8_static")
    assert not ok and "its parent onnx is not eligible" in why
    edit(run.root, lambda m: m.__setitem__("parity", [p for p in m["parity"] if p["candidate"] != "int8_static"]))
    assert "no verdict against its parent onnx" in verdict(Run.open(run.root), "int8_static")[1]


def test_select_times_every_onnx_variant_and_records_the_machine(copy_of):
    run = Run.open(copy_of("cnn"))
    quantize(run, QuantizeConfig(mode="auto"), reload_dataset(run.manifest["dataset"]))
    sel = select(run, SelectConfig(warmup=1, runs=3, min_seconds=0.0))
    run = Run.open(run.root)
    onnx_variants = [x for x in run.variants() if run.artifact(x).format == "onnx"]
    for name in onnx_variants:
        lat = run.metrics(name)["latency_ms"]
        assert set(lat) == {"1", "64"} and all(t > 0 for t in lat.values())
        if run.artifact(name).lossy:
            assert run.metrics(name)["slower_than_parent"] == (name in sel.slower_than_parent)
    assert run.manifest["selected"] == sel.selected and sel.selected in onnx_variants
    assert sel.selected not in sel.slower_than_parent
    machine = run.manifest["machine"]
    assert machine["onnxruntime"]["intra_op_num_threads"] >= 1 and "avx2" in machine["cpu"]["features"]
    assert run.manifest["selection"]["ranking"][0] == sel.selected
    # every variant was timed at every thread count of the sweep and competes at its recorded best setting
    for name in onnx_variants:
        m = run.metrics(name)
        timed = m["settings_timed"]
        assert {SessionSetting.from_json(m["session_setting"]).threads} <= set(thread_candidates())
        assert {int(k.split("t/")[0]) for k in timed} == set(thread_candidates())
        chosen = SessionSetting(m["session_setting"]["threads"], m["session_setting"]["execution_mode"]).key
        assert m["latency_ms"] == timed[chosen]
        assert set(m["best_setting_by_batch"]) == {"1", "64"}
    chosen = run.manifest["selection"]["session_setting"]
    assert chosen == run.metrics(sel.selected)["session_setting"]
    assert set(run.manifest["selection"]["spinning_ms"]) == {"spin", "no-spin"}
    assert machine["onnxruntime"]["intra_op_num_threads"] == chosen["threads"]


S1, S2, P2 = SessionSetting(1), SessionSetting(2), SessionSetting(2, "parallel")
SETTINGS = {s.key: s for s in (S1, S2, P2)}


def test_best_setting_is_the_fastest_by_the_objective_and_per_batch():
    # 2 threads lose at batch 1 (wake-up cost) and win at batch 64: per batch each wins its own,
    # and the geometric mean picks 2 threads overall (0.06 * 0.8 < 0.03 * 1.9).
    timed = {S1.key: {"1": 0.030, "64": 1.90}, S2.key: {"1": 0.060, "64": 0.80}, P2.key: {"1": 0.070, "64": 1.20}}
    chosen, per_batch = best_setting(timed, SETTINGS)
    assert chosen == S2.key and per_batch == {"1": S1.key, "64": S2.key}
    assert best_setting(timed, SETTINGS, "1")[0] == S1.key and best_setting(timed, SETTINGS, "64")[0] == S2.key


def test_best_setting_takes_the_cheapest_among_near_ties():
    # 2 threads 1 % faster than 1 thread: within the near-tie margin, so the cheaper 1-thread setting
    # wins; 10 % faster is a real gain and wins. The parallel mode never wins a tie with sequential.
    tie = {S1.key: {"1": 1.00, "64": 10.0}, S2.key: {"1": 0.99, "64": 9.9}, P2.key: {"1": 0.985, "64": 9.88}}
    assert best_setting(tie, SETTINGS) == (S1.key, {"1": S1.key, "64": S1.key})
    gain = {S1.key: {"1": 1.00, "64": 10.0}, S2.key: {"1": 0.90, "64": 9.0}, P2.key: {"1": 0.90, "64": 9.0}}
    assert best_setting(gain, SETTINGS)[0] == S2.key
    assert best_setting(gain, SETTINGS, margin=0.2)[0] == S1.key
    assert 0 < NEAR_TIE < 0.1


def test_session_settings_are_checked_and_round_trip():
    assert SessionSetting.from_json(P2.to_json()) == P2 and P2.key == "2t/parallel/no-spin"
    with pytest.raises(ConfigError, match="execution_mode"):
        SessionSetting(2, "both")
    with pytest.raises(ConfigError, match="threads"):
        SessionSetting(0)
    assert thread_candidates(1) == (1,) and thread_candidates(2) == (1, 2) and thread_candidates(6) == (1, 2, 4, 6)


def test_parallel_branches_count_independent_compute_nodes():
    import onnx
    from onnx import TensorProto, helper

    from onnxpipe.core.onnxgraph import parallel_branches

    def graph(two_heads: bool):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [4, 4], [0.1] * 16) for n in ("w1", "w2")]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"])]
        nodes.append(helper.make_node("MatMul", ["x" if two_heads else "a", "w2"], ["b"]))
        nodes.append(helper.make_node("Add", ["a", "b"], ["y"]))
        return helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)

    assert parallel_branches(graph(True)) == 2 and parallel_branches(graph(False)) == 1
    assert onnx.checker.check_graph(graph(True)) is None


def test_compression_stages_run_in_pipeline_order(copy_of):
    names = [n for n, _ in STAGES]
    assert names.index("export") < names.index("optimize") < names.index("quantize") < names.index("verify") \
        < names.index("select")
    run = Run.open(copy_of("lstm"))
    ctx = Context(progress=False, sections={"select": {"warmup": 1, "runs": 2, "min_seconds": 0.0}})
    for name, fn in STAGES:
        if name in ("optimize", "quantize", "verify", "select"):
            fn(run, ctx)
    run = Run.open(run.root)
    assert {"onnx_opt", "fp16"} <= set(run.variants())
    assert run.manifest["selected"] in run.variants() and run.manifest["machine"]["cpu"]["features"]
    assert all(p["passed"] for p in run.manifest["parity"])


def test_serve_and_export_triton_start_from_the_setting_select_recorded(tiny_run, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from onnxpipe.cli import app
    from test_triton_export import parse

    root = tmp_path / "work" / "exports" / "cnn"   # served as exports/cnn from tmp_path/work, as a user would
    shutil.copytree(tiny_run("cnn"), root)
    run = Run.open(root)
    # what select records: written through the run's API so the test knows the setting to look for
    run.set_metrics(run.selected, session_setting=SessionSetting(1, "parallel").to_json())
    r = CliRunner().invoke(app, ["export-triton", str(root), str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "threads 1, parallel from `onnxpipe select`" in r.output
    cfg, _ = parse((tmp_path / "m" / "cnn" / "config.pbtxt").read_text())
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"
    assert cfg.parameters["execution_mode"].string_value == "1"
    assert cfg.parameters["inter_op_thread_count"].string_value == "1"
    r = CliRunner().invoke(app, ["export-triton", str(root), str(tmp_path / "m"), "--force", "--threads", "2",
                                 "--execution-mode", "sequential"])
    cfg, _ = parse((tmp_path / "m" / "cnn" / "config.pbtxt").read_text())
    assert cfg.parameters["intra_op_thread_count"].string_value == "2" and "execution_mode" not in cfg.parameters

    def start_line(*flags):
        proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", "exports/cnn", "--port", "0",
                                 "--device", "cpu", *flags], stderr=subprocess.PIPE, text=True, cwd=root.parent.parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line, deadline = "", time.monotonic() + 60
            while "serving model" not in line and time.monotonic() < deadline:
                line = proc.stderr.readline()
            return line
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0

    assert "session: 1 thread(s), parallel (chosen by `onnxpipe select`)" in start_line()
    assert "session: 2 thread(s), sequential (the server's settings)" in start_line("--threads", "2")
