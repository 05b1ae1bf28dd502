"""`onnxpipe run`: every stage, in order, for each model.

A stage is a function `(run, ctx) -> None` registered in STAGES; later stages (optimize,
quantize, distill, bench, report) plug in by adding one entry, without touching the loop."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .core.data import Dataset, load_dataset, reload_dataset
from .errors import ConfigError, DataError, OnnxpipeError, RunFolderError
from .runfolder import Run


@dataclass
class Context:
    """What the stages of one model's run share: options and the data, loaded once."""

    data: str = "digits"
    seed: int = 0
    limit: int | None = None
    progress: bool = True
    train: bool = True                 # False: no training; variant torch from `weights` or the model's own init
    weights: Path | None = None        # a state_dict file for variant torch (implies train=False)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: Dataset | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def data_for(self, run: Run) -> Dataset:
        if self.dataset is None:
            self.dataset = reload_dataset(run.manifest["dataset"])
        return self.dataset

    def options(self, stage: str) -> dict[str, Any]:
        return self.stage_options.get(stage, {})


def prepare_run(model: str, root: Path, *, data: str = "digits", overrides: dict | None = None, size: str | None = None,
                seed: int = 0, limit: int | None = None, force: bool = False, resume: bool = False) -> tuple[Run, Dataset]:
    """Open (resume) or create the run folder for `model` (a registered name or a user factory
    "pkg.module:build" / "file.py:build"), with the data loaded and the config adapted to it."""
    from .core.byo import resolve_model

    spec = resolve_model(model)
    if resume:
        run = Run.open(root)
        if run.model_name != spec.name:
            raise RunFolderError(f"{root} holds a {run.model_name!r} run, not {model!r}")
        return run, reload_dataset(run.manifest["dataset"])
    try:
        cfg = spec.make_config(overrides, size)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    ds = load_dataset(data, spec.family, image_size=getattr(cfg, "image_size", 28), num_classes=cfg.num_classes,
                      seed=seed, limit=limit)
    try:
        cfg = spec.adapt_to_data(cfg, ds.sample_shape)
    except ValueError as e:
        raise DataError(str(e)) from None
    run = Run.create(root, spec.name, asdict(cfg), ds.info, force=force)
    run.manifest["size"] = size or "default"
    if spec.source:
        run.manifest["model_source"] = spec.source
    run.save()
    return run, ds


# --- the stages --------------------------------------------------------------------------------------

def stage_train(run: Run, ctx: Context) -> None:
    from .stages.train import train, train_config_for

    if not ctx.train or ctx.weights is not None:
        from .core.byo import adopt_weights

        adopt_weights(run, ctx.weights, ctx.data_for(run), seed=ctx.seed)
        return

    cfg = train_config_for(run.spec, seed=ctx.seed, **ctx.train_overrides)
    train(run, cfg, ctx.data_for(run), progress=ctx.progress)


def stage_export(run: Run, ctx: Context) -> None:
    from .stages.export import ExportConfig, export

    export(run, stage_config(ExportConfig, ctx, "export"), test_inputs=ctx.data_for(run).x_test)


def stage_config(cls, ctx: Context, stage: str, **defaults):
    """cls(**defaults, **[stage] options), with a clear error for an unknown setting."""
    try:
        return cls(**{**defaults, **ctx.options(stage)})
    except TypeError as e:
        raise ConfigError(f"bad [{stage}] setting: {e}") from None


def stage_optimize(run: Run, ctx: Context) -> None:
    from .stages.optimize import OptimizeConfig, optimize

    optimize(run, stage_config(OptimizeConfig, ctx, "optimize"))


def stage_quantize(run: Run, ctx: Context) -> None:
    from .stages.quantize import QuantizeConfig, quantize

    quantize(run, stage_config(QuantizeConfig, ctx, "quantize", mode="auto"), ctx.data_for(run))


def stage_distill(run: Run, ctx: Context) -> None:
    """Train the student, then put it through the same export / optimize / quantize functions as the teacher."""
    from .stages.distill import DistillConfig, distill
    from .stages.export import ExportConfig, export
    from .stages.optimize import OptimizeConfig, optimize
    from .stages.quantize import QuantizeConfig, quantize

    ds = ctx.data_for(run)
    distill(run, stage_config(DistillConfig, ctx, "distill", seed=ctx.seed), ds, progress=ctx.progress)
    export(run, stage_config(ExportConfig, ctx, "export"), source="student", target="student_onnx")
    optimize(run, stage_config(OptimizeConfig, ctx, "optimize"), source="student_onnx")
    quantize(run, stage_config(QuantizeConfig, ctx, "quantize", mode="auto"), ds, source="student_onnx")


def stage_select(run: Run, ctx: Context) -> None:
    from .stages.select import SelectConfig, select

    select(run, stage_config(SelectConfig, ctx, "select"))
    if "distillation" in run.manifest:  # the student's speedup over the teacher's fastest variant, as timed here
        from .stages.distill import student_speedup

        run.manifest["distillation"]["speedup"] = student_speedup(run)
        run.save()


def stage_verify(run: Run, ctx: Context) -> None:
    from .errors import ParityError
    from .stages.verify import VerifyConfig, failures, verify

    reports = verify(run, stage_config(VerifyConfig, ctx, "verify"), ctx.data_for(run))
    failed = failures(reports)
    if failed:
        raise ParityError(failed[0])


def stage_bench(run: Run, ctx: Context) -> None:
    from .stages.bench import BenchConfig, bench

    bench(run, stage_config(BenchConfig, ctx, "bench"))


def stage_explain(run: Run, ctx: Context) -> None:
    from .stages.explain import ExplainConfig, explain

    explain(run, stage_config(ExplainConfig, ctx, "explain"), ctx.data_for(run))


def stage_report(run: Run, ctx: Context) -> None:
    from .stages.divergence import record_node_divergence
    from .stages.report import write_report

    record_node_divergence(run, ctx.data_for(run))  # the per-node chart of quantized variants
    write_report(run)  # report.html + report.md in the run folder; `onnxpipe run` prints the path


StageFn = Callable[[Run, Context], None]
STAGES: list[tuple[str, StageFn]] = [
    ("train", stage_train),
    ("export", stage_export),
    ("optimize", stage_optimize),
    ("quantize", stage_quantize),
    ("distill", stage_distill),
    ("verify", stage_verify),
    ("select", stage_select),
    ("bench", stage_bench),
    ("explain", stage_explain),
    ("report", stage_report),
]


def run_model(model: str, root: Path, ctx: Context, *, overrides: dict | None = None, size: str | None = None,
              force: bool = False, stages: list[str] | None = None, on_stage: Callable[[str, str], None] | None = None) -> Run:
    run, ds = prepare_run(model, root, data=ctx.data, overrides=overrides, size=size, seed=ctx.seed,
                          limit=ctx.limit, force=force)
    ctx.dataset = ds
    return run_stages(run, ctx, stages, on_stage=on_stage)


def run_stages(run: Run, ctx: Context, stages: list[str] | None = None,
               on_stage: Callable[[str, str], None] | None = None) -> Run:
    """Run the STAGES named in `stages` (all when empty), in pipeline order, on an existing run folder."""
    names = [n for n, _ in STAGES]
    unknown = set(stages or []) - set(names)
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(names)}")
    for name, fn in STAGES:
        if stages and name not in stages:
            continue
        if on_stage:
            on_stage(run.model_name, name)
        t0 = time.monotonic()
        fn(run, ctx)
        ctx.timings[name] = round(time.monotonic() - t0, 2)
    run.manifest.setdefault("timings", {}).update(ctx.timings)
    run.save()
    return run


def summary_rows(run: Run) -> list[dict]:
    """One row per variant: accuracy, parity against its parent, size."""
    parity = {(p["reference"], p["candidate"]): p for p in run.manifest["parity"]}
    rows = []
    for v in run.variants():
        art = run.artifact(v)
        p = parity.get((art.parent, v)) if art.parent else None
        if p is None:
            check = "-"
        elif p["rule"] == "tensor":
            check = f"{'pass' if p['passed'] else 'FAIL'} max|d| {p['max_abs']:.1e}"
        else:
            verdict = "pass" if p["passed"] else ("over budget" if p.get("gate") else "FAIL")
            check = f"{verdict} agree {p['agreement']:.3f}"
        rows.append({
            "model": run.model_name, "variant": v, "parent": art.parent or "-",
            "accuracy": run.metrics(v).get("accuracy"), "parity": check, "bytes": art.bytes,
            "selected": run.manifest.get("selected") == v,
        })
    return rows
