"""`onnxpipe run`: every stage, in order, for each model (layer 4).

Each entry of STAGES runs one stage function, `stage(run, cfg, data, ...)`, with its config built the
one way (pipeline/stages/configs.py: dataclass defaults, then the `--config` file's section, then
flags). The stage commands of the CLI call the same entries, so `onnxpipe distill RUN` and the distill
step of `onnxpipe run` are one code path. A later stage plugs in by adding one entry."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .core.data import Dataset, load_dataset, recorded_inputs, recorded_normalizations, reload_dataset
from .core.policy import POLICY, entry_verdict, policy_for
from .errors import ConfigError, DataError, RunFolderError
from .runfolder import Run
from .stages.configs import (BenchConfig, DistillConfig, ExplainConfig, ExportConfig, OptimizeConfig, PackageConfig,
                             PruneConfig, QuantizeConfig, SelectConfig, TrainConfig, TransferConfig, VerifyConfig,
                             build_config)

log = logging.getLogger("onnxpipe")


@dataclass
class Context:
    """What the stages of one model's run share: options and the data, loaded once."""

    data: str = "digits"
    seed: int = 0
    limit: int | None = None
    classes: tuple[int, ...] | None = None   # keep these source labels, relabelled 0..k-1 (--classes 0-4)
    per_class: int | None = None             # at most N labelled train / validation rows per class
    progress: bool = True
    train: bool = True                 # False: no training; variant torch from `weights` or the model's own init
    weights: Path | None = None        # a state_dict file for variant torch (implies train=False)
    # Per stage: the --config file's section ("sections") and the command's flags ("flags", None = not given).
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: Dataset | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def data_for(self, run: Run) -> Dataset:
        if self.dataset is None:
            self.dataset = reload_dataset(run.dataset_info)
        return self.dataset

    def config(self, cls, stage: str, run: Run | None = None, **defaults):
        """The stage's config: dataclass defaults, then the model's own parity overrides (with `run`),
        then `defaults`, then the file's section, then flags."""
        model = policy_defaults(run, cls) if run is not None else {}
        return build_config(cls, self.sections.get(stage), self.flags.get(stage), stage=stage, **{**model, **defaults})


def policy_defaults(run: Run, cls) -> dict:
    """The tolerance and budget fields of `cls` as the run's model sets them (ModelSpec.parity), if it does."""
    from dataclasses import fields

    policy = policy_for(run.spec)
    if policy is POLICY:
        return {}
    values = {"atol": policy.tensor.atol, "rtol": policy.tensor.rtol}
    if cls in (DistillConfig, PruneConfig):   # selection gates against the teacher
        values["max_accuracy_drop"] = policy.student.max_accuracy_drop
    else:
        values.update(max_accuracy_drop=policy.lossy.max_accuracy_drop, min_agreement=policy.lossy.min_agreement)
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def prepare_run(model: str, root: Path, *, data: str = "digits", overrides: dict | None = None, size: str | None = None,
                seed: int = 0, limit: int | None = None, force: bool = False, resume: bool = False,
                classes: tuple[int, ...] | None = None, per_class: int | None = None) -> tuple[Run, Dataset]:
    """Open (resume) or create the run folder for `model` (a registered name or a user factory
    "pkg.module:build" / "file.py:build"), with the data loaded and the config adapted to it.

    With `classes`, the model gets as many outputs as classes are kept, unless num_classes is set."""
    from .core.byo import resolve_model

    spec = resolve_model(model)
    if resume:
        run = Run.open(root)
        if run.model_name != spec.name:
            raise RunFolderError(f"{root} holds a {run.model_name!r} run, not {model!r}")
        return run, reload_dataset(run.dataset_info)
    overrides = dict(overrides or {})
    if classes and "num_classes" not in overrides and any(f == "num_classes" for f in spec.config_fields()):
        overrides["num_classes"] = len(classes)
    try:
        cfg = spec.make_config(overrides, size)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    ds = load_dataset(data, spec.input_specs(cfg), num_classes=cfg.num_classes, seed=seed, limit=limit,
                      classes=classes, per_class=per_class)
    try:
        cfg = spec.adapt_to_data(cfg, ds.sample_shapes)
    except ValueError as e:
        raise DataError(str(e)) from None
    # Record the inputs as the adapted config has them (sequence lengths and widths from the data).
    adapted = {s.name: s.to_json() for s in spec.input_specs(cfg)}
    ds.info["inputs"] = [{**r, **adapted.get(r["name"], {})} for r in ds.info["inputs"]]
    extra = {"size": size or "default", **({"model_source": spec.source} if spec.source else {})}
    run = Run.create(root, spec.name, asdict(cfg), ds.info, force=force, extra=extra)
    return run, ds


# --- the stages --------------------------------------------------------------------------------------

def stage_train(run: Run, ctx: Context) -> None:
    from .stages.train import adopt_weights, train, train_config_for

    if not ctx.train or ctx.weights is not None:
        adopt_weights(run, ctx.weights, ctx.data_for(run), seed=ctx.seed)
    else:
        cfg = train_config_for(run.spec, seed=ctx.seed, **{**ctx.sections.get("train", {}),
                                                            **ctx.flags.get("train", {})})
        train(run, cfg, ctx.data_for(run), progress=ctx.progress)
    warn_if_near_chance(run)


def warn_if_near_chance(run: Run) -> None:
    """A root at chance accuracy makes every budget pass with agreement 1.0: say so (printed and recorded)."""
    acc = run.metrics("torch").get("accuracy")
    classes = getattr(run.model_config(), "num_classes", None)
    if POLICY.near_chance(acc, classes):
        msg = (f"the trained model's test accuracy {acc:.3f} is within {POLICY.chance_margin_pt:g} points of chance "
               f"({1 / classes:.3f} for {classes} classes): every compression budget will pass trivially; train "
               "longer, check the data and labels, or bring trained weights (--weights)")
        log.warning(msg)
        run.update_section("warnings", near_chance=msg)


def stage_export(run: Run, ctx: Context) -> None:
    from .stages.export import export

    export(run, ctx.config(ExportConfig, "export", run), ctx.data_for(run))


def stage_optimize(run: Run, ctx: Context) -> None:
    from .stages.optimize import optimize

    optimize(run, ctx.config(OptimizeConfig, "optimize", run))


def stage_quantize(run: Run, ctx: Context) -> None:
    from .stages.quantize import quantize

    quantize(run, ctx.config(QuantizeConfig, "quantize", run), ctx.data_for(run))


def stage_distill(run: Run, ctx: Context) -> None:
    """Train the student, then put it through the same export / optimize / quantize functions as the teacher."""
    from .stages.distill import distill
    from .stages.export import export
    from .stages.optimize import optimize
    from .stages.quantize import quantize

    ds = ctx.data_for(run)
    distill(run, ctx.config(DistillConfig, "distill", run, seed=ctx.seed), ds, progress=ctx.progress)
    export(run, ctx.config(ExportConfig, "export", run), source="student", target="student_onnx")
    optimize(run, ctx.config(OptimizeConfig, "optimize", run), source="student_onnx")
    quantize(run, ctx.config(QuantizeConfig, "quantize", run), ds, source="student_onnx")


def stage_prune(run: Run, ctx: Context) -> None:
    """Prune the torch model, fine-tune it, then put it through the same export / optimize / quantize as the
    teacher and the student (variants pruned, pruned_onnx, pruned_onnx_opt, pruned_int8_*, ...)."""
    from .stages.export import export
    from .stages.optimize import optimize
    from .stages.prune import prune
    from .stages.quantize import quantize

    ds = ctx.data_for(run)
    prune(run, ctx.config(PruneConfig, "prune", run, seed=ctx.seed), ds, progress=ctx.progress)
    export(run, ctx.config(ExportConfig, "export", run), source="pruned", target="pruned_onnx")
    optimize(run, ctx.config(OptimizeConfig, "optimize", run), source="pruned_onnx")
    quantize(run, ctx.config(QuantizeConfig, "quantize", run), ds, source="pruned_onnx")


def stage_verify(run: Run, ctx: Context) -> list:
    from .errors import ParityError
    from .stages.verify import failures, verify

    ds = ctx.data_for(run) if run.dataset_info else None
    reports = verify(run, ctx.config(VerifyConfig, "verify", run), ds)
    failed = failures(reports)
    if failed:
        raise ParityError(failed[0])
    return reports


def stage_select(run: Run, ctx: Context, log_line: Callable[[str], None] | None = None) -> None:
    from .stages.select import select

    select(run, ctx.config(SelectConfig, "select"), log_line=log_line)
    from .stages.select import branch_speedup

    # the student's and the pruned model's speedup over the teacher's fastest variant, as timed here
    for branch, section in (("student", "distillation"), ("pruned", "pruning")):
        if run.section(section) and run.has(branch):
            run.update_section(section, speedup=branch_speedup(run, branch))


def stage_bench(run: Run, ctx: Context, log_line: Callable[[str], None] | None = None) -> dict:
    from .stages.bench import bench

    return bench(run, ctx.config(BenchConfig, "bench"), log=log_line)


def stage_explain(run: Run, ctx: Context) -> dict:
    from .stages.explain import explain

    return explain(run, ctx.config(ExplainConfig, "explain"), ctx.data_for(run))


def stage_report(run: Run, ctx: Context, *, divergence: bool = True) -> tuple[Path, Path]:
    """report.html + report.md in the run folder (with the per-node chart of quantized variants)."""
    from .stages.divergence import record_node_divergence
    from .stages.report import write_report

    if divergence and run.dataset_info:
        record_node_divergence(run, ctx.data_for(run))
    return write_report(run)


def run_package(run: Run, ctx: Context, out: Path):
    """`onnxpipe package RUN OUT`: not a step of `onnxpipe run` (it needs a destination), configured the same
    way ([package] section, then flags; the model's own tolerances first)."""
    from .stages.package import package

    return package(run, ctx.config(PackageConfig, "package", run), out)


StageFn = Callable[[Run, Context], Any]
STAGES: list[tuple[str, StageFn]] = [
    ("train", stage_train),
    ("export", stage_export),
    ("optimize", stage_optimize),
    ("quantize", stage_quantize),
    ("distill", stage_distill),
    ("prune", stage_prune),
    ("verify", stage_verify),
    ("select", stage_select),
    ("bench", stage_bench),
    ("explain", stage_explain),
    ("report", stage_report),
]
STAGE_NAMES = [n for n, _ in STAGES]
# Stages that need the PyTorch model, which an imported ONNX run does not have.
TORCH_STAGES = ("train", "export", "distill", "prune", "explain")


def parse_stages(requested: str | None, *, imported: bool = False) -> list[str] | None:
    """`--stages`: None (all), 'all' (every stage that applies) or a comma-separated list, checked by name."""
    if requested is None:
        return None
    applicable = [n for n in STAGE_NAMES if not (imported and n in TORCH_STAGES)]
    if requested.strip() == "all":
        return applicable
    wanted = [s.strip() for s in requested.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGE_NAMES]
    if unknown or not wanted:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown) or repr(requested)}; stages: {', '.join(STAGE_NAMES)}")
    torch_only = [s for s in wanted if imported and s in TORCH_STAGES]
    if torch_only:
        raise ConfigError(f"stage(s) {', '.join(torch_only)} need the PyTorch model, which an imported ONNX run "
                          f"does not have; stages that apply: {', '.join(applicable)}")
    return wanted


def stages_for_import(requested: str) -> list[str]:
    """`--stages` of `onnxpipe import`: 'all' (every stage that applies) or a comma-separated list."""
    return parse_stages(requested, imported=True) or []


def run_model(model: str, root: Path, ctx: Context, *, overrides: dict | None = None, size: str | None = None,
              force: bool = False, stages: list[str] | None = None, on_stage: Callable[[str, str], None] | None = None) -> Run:
    run, ds = prepare_run(model, root, data=ctx.data, overrides=overrides, size=size, seed=ctx.seed,
                          limit=ctx.limit, force=force, classes=ctx.classes, per_class=ctx.per_class)
    ctx.dataset = ds
    return run_stages(run, ctx, stages, on_stage=on_stage)


def run_stages(run: Run, ctx: Context, stages: list[str] | None = None,
               on_stage: Callable[[str, str], None] | None = None) -> Run:
    """Run the STAGES named in `stages` (all when empty), in pipeline order, on an existing run folder."""
    unknown = set(stages or []) - set(STAGE_NAMES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGE_NAMES)}")
    for name, fn in STAGES:
        if stages and name not in stages:
            continue
        if on_stage:
            on_stage(run.model_name, name)
        t0 = time.monotonic()
        fn(run, ctx)
        ctx.timings[name] = round(time.monotonic() - t0, 2)
    run.update_section("timings", **ctx.timings)
    return run


def transfer_run(source_root: Path, root: Path, ctx: Context, *, force: bool = False,
                 stages: list[str] | None = None, on_stage: Callable[[str, str], None] | None = None) -> Run:
    """`onnxpipe transfer`: the source run's model trained on ctx.data into a new run folder (keeping the
    source's normalization), then the named stages on it (train excepted: the transfer is its training)."""
    from .stages.transfer import transfer

    source = Run.open(source_root)
    if not source.has("torch") or source.artifact("torch").format != "torch":
        raise RunFolderError(f"{source_root} has no torch variant to transfer from (an imported ONNX run cannot be "
                             "trained further); train one with `onnxpipe train`")
    cfg = ctx.config(TransferConfig, "transfer", seed=ctx.seed)
    if stages and "train" in stages:
        raise ConfigError("--stages train: the transfer trains the new run itself; name the stages after it "
                          f"({', '.join(n for n in STAGE_NAMES if n != 'train')})")
    src_data = source.dataset_info or {}
    if not src_data:
        raise RunFolderError(f"{source_root} records no data; transfer needs the source's inputs and normalization")
    ds = load_dataset(ctx.data, recorded_inputs(src_data), num_classes=None, seed=ctx.seed, limit=ctx.limit,
                      classes=ctx.classes, per_class=ctx.per_class, normalization=recorded_normalizations(src_data))
    want = {r["name"]: tuple(r["sample_shape"]) for r in src_data.get("inputs", []) if r.get("sample_shape")} or \
        {ds.x_train.names[0]: tuple(src_data.get("sample_shape", ds.sample_shape))}
    got = {k: tuple(v) for k, v in ds.sample_shapes.items() if k in want}
    if got != want:
        raise DataError(f"the new data's samples are shaped {got} but the source model takes {want}")
    run = transfer(source, root, cfg, ds, force=force, progress=ctx.progress)
    ctx.dataset = ds
    if stages:
        run_stages(run, ctx, stages, on_stage=on_stage)
    return run


def summary_rows(run: Run) -> list[dict]:
    """One row per variant: accuracy, parity against its parent (worded by the policy), size."""
    rows = []
    for v in run.variants():
        art = run.artifact(v)
        p = next(iter(run.parity(reference=art.parent, candidate=v)), None) if art.parent else None
        if p is None:
            check = "-"
        elif p["rule"] == "tensor":
            check = f"{entry_verdict(p)} max|d| {p['max_abs']:.1e}"
        else:
            check = f"{entry_verdict(p)} agree {p['agreement']:.3f}"
        rows.append({
            "model": run.model_name, "variant": v, "parent": art.parent or "-",
            "accuracy": run.metrics(v).get("accuracy"), "parity": check, "bytes": art.bytes,
            "selected": run.selected == v,
        })
    return rows
