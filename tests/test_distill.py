"""Distillation: a smaller student with its own export parity, lineage, scratch baseline and budget."""
import pytest

from onnxpipe.atomic import sha256_file
from onnxpipe.core.data import reload_dataset
from onnxpipe.stages.distill import DistillConfig, distill, student_spec_and_config
from onnxpipe.errors import ConfigError
from onnxpipe.stages.export import ExportConfig, export
from onnxpipe.runfolder import Run
from onnxpipe.stages.verify import VerifyConfig, verify

TINY = dict(epochs=2, scratch_baseline=True)


def test_student_is_smaller_exports_with_parity_and_records_scratch(copy_of):
    run = Run.open(copy_of("cnn"))
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(**TINY), ds, progress=False)
    d = run.manifest["distillation"]
    assert d["student_params"] < d["teacher_params"] / 3
    assert 0.0 <= d["scratch_accuracy"] <= 1.0 and 0.0 <= d["distilled_accuracy"] <= 1.0
    assert d["distillation_gain_pt"] == pytest.approx(100 * (d["distilled_accuracy"] - d["scratch_accuracy"]))
    assert d["distilled_accuracy"] > 0.3  # well above chance (0.1) after two epochs

    from onnxpipe.core.predictors import load_torch_variant

    _, spec, cfg = load_torch_variant(run, "student")  # the student rebuilds as itself, not as its teacher
    assert spec.name == "cnn" and cfg.channels1 == 16 and cfg.hidden == 32
    export(run, ExportConfig(batches=(1, 7)), source="student", target="student_onnx")
    arts = run.manifest["artifacts"]
    assert arts["student"]["parent"] == "torch" and arts["student_onnx"]["parent"] == "student"
    for v in ("student", "student_onnx"):
        assert sha256_file(run.root / arts[v]["path"]) == arts[v]["sha256"]
    p = next(p for p in run.manifest["parity"] if (p["reference"], p["candidate"]) == ("student", "student_onnx"))
    assert p["passed"] and p["max_abs"] < 1e-4 and p["rule"] == "tensor"

    # against the teacher the student is judged by its own budget (accuracy drop only)
    assert run.budget_for("student_onnx", "torch") == {"max_accuracy_drop": 1.5, "min_agreement": 0.0, "gate": True}
    reports = {(r.reference, r.candidate): r for r in verify(run, VerifyConfig(batches=(1, 7)), ds)}
    vs_teacher = reports[("torch", "student_onnx")]
    assert vs_teacher.rule == "task" and vs_teacher.max_accuracy_drop == 1.5
    assert reports[("student", "student_onnx")].rule == "tensor" and reports[("student", "student_onnx")]

    # speedup over the teacher's fastest ONNX variant, from recorded timings (not wall-clock here)
    from onnxpipe.stages.distill import student_speedup

    run.set_metrics("onnx", latency_ms={"1": 0.08, "64": 2.0})
    run.set_metrics("student_onnx", latency_ms={"1": 0.05, "64": 0.5})
    eligible = vs_teacher.passed  # a two-epoch student may miss its budget: then it must not count
    sp = student_speedup(run)
    assert sp["64"]["teacher_best"] == "onnx" and sp["64"]["teacher_ms"] == 2.0
    if eligible:
        assert sp["64"]["student_best"] == "student_onnx" and sp["64"]["speedup"] == pytest.approx(4.0)
    else:
        assert sp["64"]["student_best"] is None and sp["64"]["speedup"] is None


def test_cross_model_student_for_sequences(copy_of):
    run = Run.open(copy_of("transformer"))
    spec, cfg = student_spec_and_config(run, DistillConfig(student_model="gru", student_scale=0.5))
    assert spec.name == "gru" and cfg.hidden == 32 and cfg.seq_len == run.model_config().seq_len
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(student_model="gru", epochs=1, scratch_baseline=False), ds, progress=False)
    assert run.manifest["artifacts"]["student"]["model"]["name"] == "gru" and run.spec_of("student").name == "gru"
    export(run, ExportConfig(batches=(2,)), source="student", target="student_onnx")
    shapes = {tuple(s) for p in run.manifest["parity"] if p["candidate"] == "student_onnx" for s in p["shapes"]}
    assert {s[1] for s in shapes} == {1, 8, 16}  # the GRU student keeps the sequence axis dynamic


def test_student_from_another_family_is_an_error(copy_of):
    run = Run.open(copy_of("lstm"))
    with pytest.raises(ConfigError, match="student model 'cnn' takes image inputs but the teacher 'lstm' takes sequence"):
        student_spec_and_config(run, DistillConfig(student_model="cnn"))


def test_student_scale_shrinks_width_fields(tiny_run):
    run = Run.open(tiny_run("transformer"))
    _, cfg = student_spec_and_config(run, DistillConfig(student_scale=0.25))
    assert cfg.d_model == 16 and cfg.d_model % cfg.heads == 0 and cfg.ff == 32


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"student_scale": 2.0}, "student_scale must be in"),
])
def test_bad_distill_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**kwargs)


def test_distill_command_runs_student_through_compression_and_selection(copy_of):
    from typer.testing import CliRunner

    from onnxpipe.cli import app

    root = copy_of("gru")
    r = CliRunner().invoke(app, ["distill", str(root), "--epochs", "2", "--quiet", "--alpha", "0.5", "--temperature", "2"])
    assert r.exit_code == 0, r.output
    run = Run.open(root)
    arts = run.manifest["artifacts"]
    assert {"student", "student_onnx"} <= set(arts)
    quantized = [v for v, a in arts.items() if a["parent"] in ("student_onnx", "student_onnx_opt") and a["lossy"]]
    assert quantized, "the student went through quantization"
    for v in ("student_onnx", *quantized):
        assert run.lineage(v)[-1] == "torch"  # every student variant traces back to the teacher
    assert "distilled student (gru)" in r.output and run.manifest["selected"] in arts
    assert set(run.manifest["distillation"]["speedup"]) == {"1", "64"}
    teacher_pairs = [p for p in run.manifest["parity"] if p["reference"] == "torch" and p["candidate"] == "student_onnx"]
    assert teacher_pairs and teacher_pairs[0]["max_accuracy_drop"] == 1.5


def test_mixup_draw_is_seeded_and_folded():
    import torch

    from onnxpipe.stages.train import _mixup_draw

    a = [_mixup_draw(0.4, 16, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0][0] == a[1][0] and torch.equal(a[0][1], a[1][1])
    lams = [_mixup_draw(0.4, 4, torch.Generator().manual_seed(s))[0] for s in range(50)]
    assert all(0.5 <= x <= 1.0 for x in lams) and len(set(lams)) > 40


def test_distill_with_mixup_records_it(copy_of):
    run = Run.open(copy_of("lstm"))
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(epochs=2, mixup=0.4, scratch_baseline=False), ds, progress=False)
    d = run.manifest["distillation"]
    assert d["mixup"] == 0.4 and d["train"]["mixup"] == 0.4 and d["distilled_accuracy"] > 0.2


def test_student_over_budget_is_kept_but_never_selected(copy_of):
    """A student that misses its budget against the teacher is a selection gate, not a verify failure."""
    from onnxpipe.stages.select import verdict
    from onnxpipe.stages.verify import failures

    run = Run.open(copy_of("cnn"))
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(epochs=1, scratch_baseline=False, max_accuracy_drop=0.0, lr=1e-5), ds, progress=False)
    export(run, ExportConfig(batches=(2,)), source="student", target="student_onnx")
    reports = verify(run, VerifyConfig(batches=(2,)), ds)
    gate = next(r for r in reports if (r.reference, r.candidate) == ("torch", "student"))
    assert not gate and gate.gate and "over budget" in gate.summary() and gate.verdict == "over budget"
    assert gate.accuracy_drop > 0.0
    assert failures(reports) == []  # torch -> onnx and student -> student_onnx still pass
    ok, why = verdict(run, "student_onnx")
    assert not ok and "against torch" in why


def test_summary_shows_a_missed_gate_as_over_budget(copy_of):
    from onnxpipe.orchestrate import summary_rows

    run = Run.open(copy_of("gru"))
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(epochs=1, scratch_baseline=False, max_accuracy_drop=0.0, lr=1e-5), ds, progress=False)
    verify(run, VerifyConfig(batches=(2,)), ds)
    row = next(r for r in summary_rows(run) if r["variant"] == "student")
    assert row["parity"].startswith("over budget")


def test_report_and_show_agree_on_an_over_budget_student(copy_of):
    """One verdict wording everywhere: the report's matrix and checks say "over budget", never FAIL, for a
    student that only missed its selection gate, as `onnxpipe show` does."""
    from onnxpipe.orchestrate import summary_rows
    from onnxpipe.stages.report import write_report

    run = Run.open(copy_of("gru"))
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(epochs=1, scratch_baseline=False, max_accuracy_drop=0.0, lr=1e-5), ds, progress=False)
    verify(run, VerifyConfig(batches=(2,)), ds)
    shown = next(r for r in summary_rows(run) if r["variant"] == "student")["parity"]
    _, md = write_report(run)
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| torch | student | task |"))
    assert shown.startswith("over budget") and "| over budget |" in row
    assert "FAIL" not in text


def test_a_student_of_another_model_goes_through_every_stage_with_its_own_spec(copy_of):
    """A GRU student under a Transformer teacher: optimize, verify, select, flops and bench read the GRU's
    own spec and config (the teacher's would announce missing attention, and count no GRU work)."""
    from onnxpipe.stages.bench import BenchConfig, bench
    from onnxpipe.stages.optimize import OptimizeConfig, optimize
    from onnxpipe.stages.select import SelectConfig, select

    run = Run.open(copy_of("transformer"))
    ds = reload_dataset(run.manifest["dataset"])
    distill(run, DistillConfig(student_model="gru", epochs=1, scratch_baseline=False), ds, progress=False)
    export(run, ExportConfig(batches=(1, 3)), source="student", target="student_onnx")
    optimize(run, OptimizeConfig(batches=(1, 3)), source="student_onnx")
    for v in ("student", "student_onnx", "student_onnx_opt"):
        assert run.spec_of(v).name == "gru" and run.model_config_of(v).hidden == 64  # the GRU's own default
    assert run.spec_of("onnx").name == "transformer" and run.model_config_of("onnx").heads == 4
    (opt,) = run.parity(reference="student_onnx", candidate="student_onnx_opt")
    assert opt["passed"] and not opt.get("notes")  # the teacher's spec would add "the model has attention ..."
    reports = {(r.reference, r.candidate): r for r in verify(run, VerifyConfig(batches=(1, 3)), ds)}
    grid = reports[("student_onnx", "student_onnx_opt")]
    assert grid and {tuple(c.shape) for c in grid.checks} == {(1, 1, 8), (1, 8, 8), (1, 16, 8), (3, 1, 8), (3, 8, 8),
                                                                 (3, 16, 8)}
    select(run, SelectConfig(warmup=1, runs=2, min_seconds=0.0))
    assert all(run.metrics(v).get("latency_ms") for v in ("student_onnx", "student_onnx_opt"))
    bench(run, BenchConfig(batches=(2,), threads=(1,), warmup=0, runs=2, block=2, memory=False,
                           variants=("student", "student_onnx_opt", "onnx")))
    flops = run.metrics("student_onnx_opt")["bench"]["flops"]
    assert any(op.startswith("GRU") for op in flops["by_op"]) and flops["total"] > 0
    teacher = run.metrics("onnx")["bench"]["flops"]
    assert any("Attention" in op for op in teacher["by_op"])
    assert run.metrics("student")["bench"]["latency"]["1"]["2"]["p50_ms"] > 0  # torch student timed too
