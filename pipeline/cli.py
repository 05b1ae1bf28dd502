"""The `onnxpipe` command line (front end, layer 5): each command parses, calls, prints.

Options default to None so that the stage's config dataclass decides (pipeline/stages/configs.py: its
defaults, then the command's `--config` section, then the flags given), exactly as in `onnxpipe run`;
their help text is the dataclass field's. User errors print one line (`error: ...`) and exit 1; heavy
libraries are imported inside commands, so `--help` is instant."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .serving.config import ServeConfig, TritonConfig, TuneConfig
from .stages.configs import (BenchConfig, DistillConfig, ExplainConfig, ExportConfig, OptimizeConfig, PackageConfig,
                             PruneConfig, QuantizeConfig, SelectConfig, TrainConfig, TransferConfig, VerifyConfig,
                             help_of)

app = typer.Typer(
    help="Carry PyTorch models to verified, compressed ONNX Runtime deployments.\n\n"
    "Start with `onnxpipe run` (train, export and verify every built-in model on the bundled digits data); "
    "every stage also works alone on a run folder (exports/<model>).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,   # help texts hold [model]-style section names: print them as written
)

RunArg = Annotated[Path, typer.Argument(help="Run folder, e.g. exports/cnn (made by `onnxpipe train` or `onnxpipe run`).")]
DataOpt = Annotated[str, typer.Option("--data", help="digits (bundled, default), mnist:DIR (IDX files) or npz:FILE (arrays x, y).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a model config field, e.g. --set d_model=256 (repeatable).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="JSON or TOML file with sections [model], [train], "
                                                   "[export], [optimize], [quantize], [distill], [prune], [transfer], "
                                                   "[verify], [select], [bench], [explain], [package]; flags override it.")]
SizeOpt = Annotated[Optional[str], typer.Option("--size", help="Model size preset: default or base (bigger, for compression experiments).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the data split, initialization and batch order.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use a seeded subset of N training samples (quick experiments).", min=1)]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="Keep only these labels of the data, relabelled "
                                                   "0..k-1 in this order, e.g. 0-4 or 5,7,9 (the model gets k classes).")]
PerClassOpt = Annotated[Optional[int], typer.Option("--per-class", min=1, help="At most N labelled training (and "
                                                    "validation) rows per class; the test split stays whole.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or stage lines.")]
VariantOpt = Annotated[Optional[str], typer.Option("--variant", help="Variant to use (default: the run's selected one).")]


def user_errors(fn):
    """Turn onnxpipe's typed errors into one clear line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .console import configure_logging
        from .errors import OnnxpipeError

        configure_logging()
        try:
            return fn(*args, **kwargs)
        except OnnxpipeError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


def _open(run_dir: Path):
    from .core import sources  # noqa: F401  (model-source resolvers)
    from .runfolder import Run

    return Run.open(run_dir)


def _ctx(config: Path | None = None, *, seed: int = 0, progress: bool = True, **flags):
    """A Context whose per-stage flags are `flags` ({stage: {field: value or None}})."""
    from .orchestrate import Context
    from .stages.configs import read_config_file

    file_cfg = read_config_file(config)
    return Context(seed=seed, progress=progress, sections={k: v for k, v in file_cfg.items() if k != "model"},
                   flags=flags)


def resolve_models(names: str) -> list[str]:
    """'all', or comma-separated registered names and user factories (pkg.module:build, file.py:build)."""
    from .core.byo import resolve_model
    from .models import list_models

    if names == "all":
        return list_models()
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        resolve_model(n)  # fails early, with the reason, before any run folder is made
    return out


def _stage_line(quiet: bool):
    return None if quiet else (lambda m, s: typer.echo(f"[{m}] {s}", err=True))


# --- commands ---------------------------------------------------------------------------------------

@app.command("models")
def models_cmd() -> None:
    """List the registered models with their family and default config."""
    from dataclasses import asdict

    from .models import get_model, list_models

    for name in list_models():
        spec = get_model(name)
        typer.echo(f"{name:12s} {spec.family:9s} {spec.description}")
        typer.echo(f"{'':22s}config: {json.dumps(asdict(spec.make_config()))}")


@app.command("run")
@user_errors
def run_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Comma-separated model names, or 'all', or your own "
                                       "factory: my_pkg.my_module:build or path/to/file.py:build.")] = "all",
    data: DataOpt = "digits",
    out: Annotated[Path, typer.Option("--out", help="Folder for the run folders (one per model).")] = Path("exports"),
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default: the model's tuned setting).", min=1)] = None,
    size: SizeOpt = None,
    set_: SetOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Comma-separated subset of stages to run, in pipeline order.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing run folders.")] = False,
    no_train: Annotated[bool, typer.Option("--no-train", help="Skip training: export the model as its factory "
                                           "builds it (or with --weights).")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="A state_dict file (torch.save) to use "
                                                    "instead of training; implies --no-train.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline (train -> export -> verify -> ...) for each model; end with a table."""
    import time

    from .console import print_summary
    from .core.byo import model_folder
    from .core.data import parse_classes
    from .errors import ConfigError
    from .orchestrate import Context, parse_stages, run_model
    from .stages.configs import parse_sets, read_config_file

    file_cfg = read_config_file(config)
    overrides = {**file_cfg.get("model", {}), **parse_sets(set_)}
    names = resolve_models(model)
    wanted = parse_stages(stages)
    if overrides and len(names) > 1:
        raise ConfigError("--set and [model] settings apply to one model; pick it with --model NAME")
    t0 = time.monotonic()
    runs = []
    for name in names:
        ctx = Context(data=data, seed=seed, limit=limit, progress=not quiet, train=not no_train, weights=weights,
                      classes=parse_classes(classes), per_class=per_class,
                      sections={k: v for k, v in file_cfg.items() if k != "model"}, flags={"train": {"epochs": epochs}})
        runs.append(run_model(name, out / model_folder(name), ctx, overrides=overrides, size=size, force=force,
                              stages=wanted, on_stage=_stage_line(quiet)))
    for run in runs:
        print_summary(run)
    for run in runs:
        if (run.root / "report.html").is_file():
            typer.echo(f"report: {run.root / 'report.html'} (and report.md)")
    typer.echo(f"done in {time.monotonic() - t0:.1f} s; run folders: {', '.join(str(r.root) for r in runs)}")


@app.command("train")
@user_errors
def train_cmd(
    model: Annotated[str, typer.Argument(help="Registered model name (see `onnxpipe models`), or your own factory: "
                                         "my_pkg.my_module:build or path/to/file.py:build.")],
    data: DataOpt = "digits",
    run_dir: Annotated[Optional[Path], typer.Option("--run", help="Run folder (default exports/MODEL).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help=help_of(TrainConfig, "epochs"))] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=help_of(TrainConfig, "lr"))] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help=help_of(TrainConfig, "batch_size"))] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", min=1, help=help_of(TrainConfig, "patience"))] = None,
    size: SizeOpt = None,
    set_: SetOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes on this machine (DDP; "
                                       "--batch-size stays the global batch). Under torchrun leave it at 1.")] = 1,
    train_device: Annotated[str, typer.Option("--device", help="Training device: cpu (gloo) or cuda (nccl, one GPU per process).")] = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Train MODEL and write variant `torch` (model.pt) into its run folder."""
    from .core.byo import model_folder
    from .core.data import parse_classes
    from .orchestrate import prepare_run, warn_if_near_chance
    from .stages.configs import parse_sets, read_config_file
    from .stages.train import launch, train_config_for

    file_cfg = read_config_file(config)
    root = run_dir or Path("exports") / model_folder(model)
    flags = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "patience": patience, "seed": seed}

    def prepare():
        return prepare_run(model, root, data=data, overrides={**file_cfg.get("model", {}), **parse_sets(set_)},
                           size=size, seed=seed, limit=limit, force=force, resume=resume,
                           classes=parse_classes(classes), per_class=per_class)

    def config_for(run):
        return train_config_for(run.spec, **{**file_cfg.get("train", {}), **flags})

    run = launch(prepare, config_for, nproc=nproc, device=train_device, resume=resume, progress=not quiet)
    if run is None:
        return  # not rank 0 of a torchrun job: rank 0 reports
    warn_if_near_chance(run)
    t = run.section("training")
    typer.echo(f"{model}: test accuracy {run.metrics('torch')['accuracy']:.4f} after {t['epochs_run']} epochs "
               f"(best validation {t['best_val_accuracy']:.4f} at epoch {t['best_epoch']}, {t['seconds']} s) -> {run.path('torch')}")


@app.command("export")
@user_errors
def export_cmd(
    run_dir: RunArg,
    opset: Annotated[Optional[int], typer.Option("--opset", help=help_of(ExportConfig, "opset"))] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help=help_of(ExportConfig, "atol"))] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help=help_of(ExportConfig, "rtol"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Export the run's torch model to ONNX (dynamic batch / sequence axes), checked on a grid of shapes."""
    from .orchestrate import stage_export

    run = _open(run_dir)
    stage_export(run, _ctx(config, export={"opset": opset, "atol": atol, "rtol": rtol}))
    art = run.artifact("onnx")
    p = run.parity(reference="torch", candidate="onnx")[0]
    typer.echo(f"exported {run.root / art.path} (opset {art.opset}, {art.bytes / 1024:.1f} KiB); "
               f"parity vs torch over {len(p['shapes'])} shapes: max abs {p['max_abs']:.2e}")


@app.command("verify")
@user_errors
def verify_cmd(
    run_dir: RunArg,
    device: Annotated[Optional[str], typer.Option("--device", help=help_of(VerifyConfig, "device"))] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help=help_of(VerifyConfig, "max_accuracy_drop"))] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help=help_of(VerifyConfig, "min_agreement"))] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help=help_of(VerifyConfig, "atol"))] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help=help_of(VerifyConfig, "rtol"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Parity of every variant against its parent and its root; exit 1 if any check fails."""
    from .console import print_parity
    from .stages.verify import failures, verify

    run = _open(run_dir)
    ctx = _ctx(config, verify={"device": device, "max_accuracy_drop": max_drop, "min_agreement": min_agreement,
                               "atol": atol, "rtol": rtol})
    reports = verify(run, ctx.config(VerifyConfig, "verify", run), ctx.data_for(run) if run.dataset_info else None)
    print_parity(run, reports)
    for r in reports:
        if not r:
            typer.echo(r.summary(), err=True)
    if failures(reports):
        raise typer.Exit(1)


@app.command("optimize")
@user_errors
def optimize_cmd(
    run_dir: RunArg,
    level: Annotated[Optional[str], typer.Option("--level", help=help_of(OptimizeConfig, "level"))] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help=help_of(OptimizeConfig, "atol"))] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help=help_of(OptimizeConfig, "rtol"))] = None,
    config: ConfigOpt = None,
) -> None:
    """ONNX Runtime graph optimization of variant onnx -> onnx_opt (fusions counted, parity on the shape grid)."""
    from .orchestrate import stage_optimize

    run = _open(run_dir)
    stage_optimize(run, _ctx(config, optimize={"level": level, "atol": atol, "rtol": rtol}))
    art = run.artifact("onnx_opt")
    p = run.parity(reference=art.parent, candidate=art.variant)[0]
    fused = ", ".join(f"{op.rsplit('.', 1)[-1]} x{n}" for op, n in art.extra["fused_nodes"].items()) or "none"
    typer.echo(f"{art.variant}: {run.root / art.path} saved at level {art.extra['saved_level']} (sessions apply "
               f"{art.extra['load_level']} at load); nodes {art.extra['nodes_before']} -> {art.extra['nodes_after']}; "
               f"fused: {fused}; attention nodes: {art.extra['attention_nodes']}; parity vs {art.parent} over "
               f"{len(p['shapes'])} shapes: max abs {p['max_abs']:.2e}")


@app.command("quantize")
@user_errors
def quantize_cmd(
    run_dir: RunArg,
    mode: Annotated[Optional[str], typer.Option("--mode", help=help_of(QuantizeConfig, "mode"))] = None,
    calibration: Annotated[Optional[str], typer.Option("--calibration", help=help_of(QuantizeConfig, "calibration"))] = None,
    calib_samples: Annotated[Optional[int], typer.Option("--calib-samples", help=help_of(QuantizeConfig, "calib_samples"))] = None,
    per_channel: Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor", help=help_of(QuantizeConfig, "per_channel"))] = None,
    activation_type: Annotated[Optional[str], typer.Option("--activation-type", help=help_of(QuantizeConfig, "activation_type"))] = None,
    weight_type: Annotated[Optional[str], typer.Option("--weight-type", help=help_of(QuantizeConfig, "weight_type"))] = None,
    reduce_range: Annotated[Optional[bool], typer.Option("--reduce-range/--full-range", help=help_of(QuantizeConfig, "reduce_range"))] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help=help_of(QuantizeConfig, "max_accuracy_drop"))] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help=help_of(QuantizeConfig, "min_agreement"))] = None,
    exclusion_rounds: Annotated[Optional[int], typer.Option("--exclusion-rounds", help=help_of(QuantizeConfig, "exclusion_rounds"))] = None,
    source: Annotated[str, typer.Option("--source", help="FP32 ONNX variant to start from.")] = "onnx",
    seed: Annotated[Optional[int], typer.Option("--seed", help=help_of(QuantizeConfig, "seed"))] = None,
    layout_search: Annotated[Optional[bool], typer.Option("--layout-search/--no-layout-search",
                                                          help=help_of(QuantizeConfig, "layout_search"))] = None,
    config: ConfigOpt = None,
) -> None:
    """INT8 (dynamic / static QDQ) and FP16 variants, each held to an accuracy budget against its parent."""
    from .console import print_quantize
    from .stages.quantize import quantize

    run = _open(run_dir)
    ctx = _ctx(config, quantize={
        "mode": mode, "calibration": calibration, "calib_samples": calib_samples, "per_channel": per_channel,
        "activation_type": activation_type, "weight_type": weight_type, "reduce_range": reduce_range,
        "max_accuracy_drop": max_drop, "min_agreement": min_agreement, "exclusion_rounds": exclusion_rounds,
        "seed": seed, "layout_search": layout_search})
    cfg = ctx.config(QuantizeConfig, "quantize", run)
    print_quantize(run, quantize(run, cfg, ctx.data_for(run), source=source), cfg)


@app.command("distill")
@user_errors
def distill_cmd(
    run_dir: RunArg,
    student_scale: Annotated[Optional[float], typer.Option("--student-scale", help=help_of(DistillConfig, "student_scale"))] = None,
    student_set: Annotated[Optional[list[str]], typer.Option("--student-set", help=help_of(DistillConfig, "student_set") + " Repeatable.")] = None,
    student_model: Annotated[Optional[str], typer.Option("--student-model", help=help_of(DistillConfig, "student_model"))] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help=help_of(DistillConfig, "temperature"))] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help=help_of(DistillConfig, "alpha"))] = None,
    mixup: Annotated[Optional[float], typer.Option("--mixup", help=help_of(DistillConfig, "mixup"))] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help=help_of(DistillConfig, "epochs"))] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help=help_of(DistillConfig, "max_accuracy_drop"))] = None,
    scratch: Annotated[Optional[bool], typer.Option("--scratch/--no-scratch", help=help_of(DistillConfig, "scratch_baseline"))] = None,
    seed: SeedOpt = 0,
    resume: Annotated[Optional[bool], typer.Option("--resume", help=help_of(DistillConfig, "resume"))] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Distill a smaller student from the run's teacher, then export, optimize, quantize, verify and select as for the teacher."""
    from .console import print_speedup, print_table
    from .orchestrate import stage_distill, stage_select, stage_verify

    run = _open(run_dir)
    from .stages.configs import parse_sets

    ctx = _ctx(config, seed=seed, progress=not quiet, distill={
        "student_scale": student_scale, "student_set": tuple(parse_sets(student_set).items()) or None,
        "student_model": student_model, "temperature": temperature, "alpha": alpha,
        "mixup": mixup, "epochs": epochs, "max_accuracy_drop": max_drop, "scratch_baseline": scratch, "resume": resume})
    for step in (stage_distill, stage_verify, stage_select):
        step(run, ctx)
    d = run.section("distillation")
    rows = [{"model": f"teacher ({run.model_name})", "params": d["teacher_params"], "accuracy": d["teacher_accuracy"]},
            {"model": f"distilled student ({d['student_model']})", "params": d["student_params"], "accuracy": d["distilled_accuracy"]}]
    if "scratch_accuracy" in d:
        rows.append({"model": "same student from scratch", "params": d["student_params"], "accuracy": d["scratch_accuracy"]})
    print_table(rows, ["model", "params", "accuracy"],
                title=f"distill: {run.root} (T={d['temperature']}, alpha={d['alpha']}, mixup={d['mixup']})")
    print_speedup(run, d.get("speedup"), "student", "the teacher's fastest", "the teacher")


@app.command("prune")
@user_errors
def prune_cmd(
    run_dir: RunArg,
    ratio: Annotated[Optional[float], typer.Option("--ratio", help=help_of(PruneConfig, "ratio"))] = None,
    target_params: Annotated[Optional[float], typer.Option("--target-params", help=help_of(PruneConfig, "target_params"))] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", help=help_of(PruneConfig, "target_flops"))] = None,
    scope: Annotated[Optional[str], typer.Option("--scope", help=help_of(PruneConfig, "scope"))] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help=help_of(PruneConfig, "importance"))] = None,
    taylor_samples: Annotated[Optional[int], typer.Option("--taylor-samples", min=1, help=help_of(PruneConfig, "taylor_samples"))] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=0, help=help_of(PruneConfig, "epochs"))] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=help_of(PruneConfig, "lr"))] = None,
    soft_targets: Annotated[Optional[bool], typer.Option("--soft-targets/--hard-labels", help=help_of(PruneConfig, "soft_targets"))] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help=help_of(PruneConfig, "temperature"))] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help=help_of(PruneConfig, "alpha"))] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help=help_of(PruneConfig, "max_accuracy_drop"))] = None,
    seed: SeedOpt = 0,
    resume: Annotated[Optional[bool], typer.Option("--resume", help=help_of(PruneConfig, "resume"))] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Structured pruning into a smaller dense model, fine-tuned, then exported, optimized, quantized, verified and selected as for the teacher."""
    from .console import print_pruning
    from .orchestrate import stage_prune, stage_select, stage_verify

    run = _open(run_dir)
    ctx = _ctx(config, seed=seed, progress=not quiet, prune={
        "ratio": ratio, "target_params": target_params, "target_flops": target_flops, "scope": scope,
        "importance": importance, "taylor_samples": taylor_samples, "epochs": epochs, "lr": lr, "soft_targets": soft_targets,
        "temperature": temperature, "alpha": alpha, "max_accuracy_drop": max_drop, "resume": resume})
    for step in (stage_prune, stage_verify, stage_select):
        step(run, ctx)
    print_pruning(run)


@app.command("transfer")
@user_errors
def transfer_cmd(
    run_dir: RunArg,
    data: Annotated[str, typer.Option("--data", help="The new data: digits, mnist:DIR or npz:FILE (scaled with the "
                                      "source run's normalization).")],
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    freeze: Annotated[Optional[str], typer.Option("--freeze", help=help_of(TransferConfig, "freeze"))] = None,
    head: Annotated[Optional[str], typer.Option("--head", help=help_of(TransferConfig, "head"))] = None,
    out: Annotated[Optional[Path], typer.Option("--run", help="The new run folder (default: RUN-transfer beside RUN).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help=help_of(TransferConfig, "epochs"))] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=help_of(TransferConfig, "lr"))] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", min=1, help=help_of(TransferConfig, "patience"))] = None,
    scratch: Annotated[Optional[bool], typer.Option("--scratch/--no-scratch", help=help_of(TransferConfig, "scratch_baseline"))] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Stages to run on the new run folder afterwards: "
                                                  "'all' (every stage but train) or a list, e.g. export,optimize,quantize,verify,select.")] = None,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a run's model on new data (head replaced or kept, layers frozen) into a new run folder, beside a from-scratch twin."""
    from .console import print_summary, print_transfer
    from .core.data import parse_classes
    from .orchestrate import STAGE_NAMES, parse_stages, transfer_run

    wanted = None
    if stages:
        wanted = [n for n in STAGE_NAMES if n != "train"] if stages.strip() == "all" else parse_stages(stages)
    ctx = _ctx(config, seed=seed, progress=not quiet, transfer={"freeze": freeze, "head": head, "epochs": epochs,
                                                                 "lr": lr, "patience": patience,
                                                                 "scratch_baseline": scratch})
    ctx.data, ctx.limit, ctx.classes, ctx.per_class = data, limit, parse_classes(classes), per_class
    root = out or run_dir.parent / f"{run_dir.name}-transfer"
    run = transfer_run(run_dir, root, ctx, force=force, stages=wanted, on_stage=_stage_line(quiet))
    print_transfer(run)
    if wanted:
        print_summary(run)


@app.command("compare")
@user_errors
def compare_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run folders, e.g. exports/cnn exports/cnn-b.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for compare.md, compare.html and compare_files/.")] = Path("exports/compare"),
    batch: Annotated[Optional[str], typer.Option("--batch", help="Batch sizes to plot (default: every one timed).")] = None,
    measure: Annotated[bool, typer.Option("--measure/--recorded", help="Time every ONNX variant of every run here, "
                                          "interleaved in one process (comparable ratios), instead of reading the "
                                          "timings each run recorded (measured at other times).")] = False,
    runs: Annotated[int, typer.Option("--runs", min=1, help="With --measure: timed rounds per batch size.")] = 20,
) -> None:
    """One table and an accuracy-vs-latency plot (Pareto front marked) across several run folders."""
    from .console import print_table
    from .stages.compare import compare
    from .stages.configs import parse_int_list

    runs_open = [_open(d) for d in run_dirs]
    result = compare(runs_open, out, batches=parse_int_list(batch, "--batch"), measure=measure, rounds=runs)
    print_table(result.rows, result.columns, title=f"compare ({result.timing})")
    typer.echo(f"compare: {result.markdown} (and {result.html.name}, {result.png.name})")


@app.command("select")
@user_errors
def select_cmd(
    run_dir: RunArg,
    batches: Annotated[Optional[str], typer.Option("--batches", help=help_of(SelectConfig, "batches"))] = None,
    runs: Annotated[Optional[int], typer.Option("--runs", min=1, help=help_of(SelectConfig, "runs"))] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help=help_of(SelectConfig, "warmup"))] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=help_of(SelectConfig, "threads"))] = None,
    objective: Annotated[Optional[str], typer.Option("--objective", help=help_of(SelectConfig, "objective"))] = None,
    max_bytes: Annotated[Optional[int], typer.Option("--max-bytes", min=1, help=help_of(SelectConfig, "max_bytes"))] = None,
    max_rss_mb: Annotated[Optional[float], typer.Option("--max-rss-mb", help=help_of(SelectConfig, "max_rss_mb"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Time every ONNX variant here and mark the fastest one within budget (and the edge limits) as `selected`."""
    from .console import print_table
    from .stages.configs import parse_int_list
    from .stages.select import select

    run = _open(run_dir)
    ctx = _ctx(config, select={"batches": parse_int_list(batches, "--batches"), "runs": runs, "warmup": warmup,
                               "threads": threads, "objective": objective, "max_bytes": max_bytes,
                               "max_rss_mb": max_rss_mb})
    cfg = ctx.config(SelectConfig, "select")
    sel = select(run, cfg, log_line=lambda msg: typer.echo(msg, err=True))
    run.reload()
    memory = cfg.max_rss_mb is not None
    rows = []
    for v in [*sel.ranking, *sel.excluded]:
        lat = run.metrics(v).get("latency_ms", {})
        rss = (run.metrics(v).get("edge_memory") or {}).get("peak_rss_mb")
        setting = run.metrics(v).get("session_setting") or {}
        rows.append({"variant": v, **{f"b{b} ms": lat.get(str(b)) for b in cfg.batches},
                     "threads": setting.get("threads"), "bytes": run.artifact(v).bytes, "peak RSS MB": rss,
                     "selected": v == sel.selected,
                     "note": sel.excluded.get(v, "")})
    print_table(rows, ["variant", *[f"b{b} ms" for b in cfg.batches], "threads", "bytes",
                       *(["peak RSS MB"] if memory else []),
                       "selected", "note"],
                title=f"select: {run.root} (p50 latency, objective {cfg.objective})")
    chosen = run.metrics(sel.selected).get("session_setting") or {}
    typer.echo(f"selected: {sel.selected} ({chosen.get('threads')} thread(s), {chosen.get('execution_mode')}, "
               f"spinning {'on' if chosen.get('spinning') else 'off'}: serve and export-triton start from this)")


@app.command("package")
@user_errors
def package_cmd(
    run_dir: RunArg,
    out_dir: Annotated[Path, typer.Argument(help="The package folder to write (new, empty, or an earlier package with --force).")],
    target: Annotated[Optional[str], typer.Option("--target", help=help_of(PackageConfig, "target"))] = None,
    variant: VariantOpt = None,
    check: Annotated[Optional[bool], typer.Option("--check", help=help_of(PackageConfig, "check"))] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help=help_of(PackageConfig, "force"))] = None,
    ort_level: Annotated[Optional[str], typer.Option("--ort-level", help=help_of(PackageConfig, "ort_level"))] = None,
    chromium: Annotated[Optional[str], typer.Option("--chromium", help=help_of(PackageConfig, "chromium"))] = None,
    npm_cache: Annotated[Optional[str], typer.Option("--npm-cache", help=help_of(PackageConfig, "npm_cache"))] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help=help_of(PackageConfig, "timeout_s"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a deployment folder for the edge: ORT format + reduced-build operator config, or a web page (WASM)."""
    from .console import print_package
    from .orchestrate import run_package

    run = _open(run_dir)
    ctx = _ctx(config, package={"target": target, "variant": variant, "check": check, "force": force,
                                "ort_level": ort_level, "chromium": chromium, "npm_cache": npm_cache,
                                "timeout_s": timeout})
    print_package(run_package(run, ctx, out_dir))


@app.command("import")
@user_errors
def import_cmd(
    model_file: Annotated[Path, typer.Argument(help="An ONNX model from any framework (external-data files beside it are read).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Data for accuracy, calibration and parity budgets: digits, "
                                                "mnist:DIR or npz:FILE (scaled and standardized as for onnxpipe's own models).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run", help="Run folder (default exports/<file stem>).")] = None,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Pipeline stages to run after the import: 'all' "
                                                  "(those that apply) or a list, e.g. optimize,quantize,verify,select.")] = None,
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Make a run folder around an ONNX model (variant `onnx` is the root), ready for optimize, quantize, verify, serve."""
    from .console import print_summary
    from .orchestrate import run_stages, stages_for_import
    from .stages.importer import import_onnx

    names = stages_for_import(stages) if stages else []  # a bad stage name stops us before the import
    ctx = _ctx(config, seed=seed, progress=not quiet)     # and so does a bad config file
    root = run_dir or Path("exports") / model_file.stem
    run = import_onnx(model_file, root, data=data, seed=seed, limit=limit, force=force)
    acc = run.metrics("onnx").get("accuracy")
    typer.echo(f"imported {model_file} -> {run.path('onnx')} (opset {run.artifact('onnx').opset}"
               + (f", test accuracy {acc:.4f}" if acc is not None else ", no data: pass --data for accuracy") + ")")
    if names:
        run_stages(run, ctx, names, on_stage=_stage_line(quiet))
        print_summary(run)


@app.command("show")
@user_errors
def show_cmd(run_dir: RunArg) -> None:
    """Summarize a run folder: variants, accuracy, parity, sizes."""
    from .console import print_summary

    print_summary(_open(run_dir))


# --- serving (pipeline/serving/, pipeline/stages/predict.py) ------------------------------------------

def _serve_opt(field: str, flag: str | None = None, **kw):
    """A `serve`/`tune` option whose help text (and default) is ServeConfig's."""
    return typer.Option(flag or "--" + field.replace("_", "-"), help=help_of(ServeConfig, field), **kw)


@app.command("serve")
@user_errors
def serve_cmd(
    run_dirs: Annotated[Optional[list[Path]], typer.Argument(help="Run folders to serve, e.g. exports/cnn; several: several "
                                                             "models, and runs of the same model are its versions 1, 2, ... in this order.")] = None,
    repository: Annotated[Optional[Path], typer.Option("--repository", help="Serve every run folder under DIR: DIR/NAME "
                                                        "(version 1) or DIR/NAME/N (version N), Triton's layout.")] = None,
    variant: VariantOpt = None,
    host: Annotated[Optional[str], _serve_opt("host")] = None,
    port: Annotated[Optional[int], _serve_opt("port")] = None,
    grpc_port: Annotated[Optional[int], _serve_opt("grpc_port")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if ONNX Runtime has it, else CPU; the log says which), cpu, or cuda (an error if CUDA is not usable).")] = "auto",
    max_batch: Annotated[Optional[int], _serve_opt("max_batch")] = None,
    max_delay_ms: Annotated[Optional[float], _serve_opt("max_delay_ms")] = None,
    threads: Annotated[Optional[int], _serve_opt("threads", min=1)] = None,
    workers: Annotated[Optional[int], _serve_opt("workers")] = None,
    max_body_mb: Annotated[Optional[float], _serve_opt("max_body_mb")] = None,
    max_queue: Annotated[Optional[int], _serve_opt("max_queue")] = None,
    max_inflight_mb: Annotated[Optional[float], _serve_opt("max_inflight_mb")] = None,
    timeout_ms: Annotated[Optional[float], _serve_opt("timeout_ms")] = None,
    header_timeout_s: Annotated[Optional[float], _serve_opt("header_timeout_s")] = None,
    body_timeout_s: Annotated[Optional[float], _serve_opt("body_timeout_s")] = None,
    shadow_rate: Annotated[Optional[float], _serve_opt("shadow_rate")] = None,
    shadow_window: Annotated[Optional[int], _serve_opt("shadow_window")] = None,
    poll_s: Annotated[Optional[float], _serve_opt("poll_s")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Model name in the URLs (default: the run's model, e.g. cnn).")] = None,
    access_log: Annotated[Optional[bool], typer.Option("--access-log/--no-access-log", help=help_of(ServeConfig, "access_log"))] = None,
) -> None:
    """Serve run folders over the Open Inference Protocol (KServe v2 REST, and gRPC with --grpc-port) until SIGTERM / Ctrl-C."""
    from .serving.launch import main

    flags = {"host": host, "port": port, "grpc_port": grpc_port, "max_batch": max_batch, "max_delay_ms": max_delay_ms,
             "threads": threads, "workers": workers, "max_body_mb": max_body_mb, "max_queue": max_queue,
             "max_inflight_mb": max_inflight_mb, "timeout_ms": timeout_ms, "header_timeout_s": header_timeout_s,
             "body_timeout_s": body_timeout_s, "shadow_rate": shadow_rate, "shadow_window": shadow_window,
             "poll_s": poll_s, "access_log": access_log}
    raise typer.Exit(main(list(run_dirs or []), repository, variant=variant, name=name, device=device, flags=flags))


@app.command("tune")
@user_errors
def tune_cmd(
    run_dir: RunArg,
    p99_ms: Annotated[Optional[float], typer.Option("--p99-ms", help=help_of(TuneConfig, "p99_ms"))] = None,
    threads: Annotated[Optional[str], typer.Option("--threads", help=help_of(TuneConfig, "threads"))] = None,
    workers: Annotated[Optional[str], typer.Option("--workers", help=help_of(TuneConfig, "workers"))] = None,
    max_batch: Annotated[Optional[str], typer.Option("--max-batch", help=help_of(TuneConfig, "max_batch"))] = None,
    max_delay_ms: Annotated[Optional[str], typer.Option("--max-delay-ms", help=help_of(TuneConfig, "max_delay_ms"))] = None,
    concurrency: Annotated[Optional[str], typer.Option("--concurrency", help=help_of(TuneConfig, "concurrency"))] = None,
    seconds: Annotated[Optional[float], typer.Option("--seconds", help=help_of(TuneConfig, "seconds"))] = None,
    warmup_s: Annotated[Optional[float], typer.Option("--warmup-s", help=help_of(TuneConfig, "warmup_s"))] = None,
    binary: Annotated[Optional[bool], typer.Option("--binary/--json", help=help_of(TuneConfig, "binary"))] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", help=help_of(TuneConfig, "batch"))] = None,
    confirm: Annotated[Optional[int], typer.Option("--confirm", help=help_of(TuneConfig, "confirm"))] = None,
    write: Annotated[Optional[bool], typer.Option("--write/--no-write", help=help_of(TuneConfig, "write"))] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda: the device the servers run on.")] = "cpu",
) -> None:
    """Sweep serving settings (threads, workers, max batch, max delay) with a bounded load on loopback; write the best
    one whose p99 meets --p99-ms into the run (serve's and export-triton's defaults) and its plot into the report."""
    from .console import print_table
    from .serving.tune import tune
    from .stages.configs import build_config, parse_float_list, parse_int_list
    from .stages.report import write_report

    cfg = build_config(TuneConfig, None, {
        "p99_ms": p99_ms, "threads": parse_int_list(threads, "--threads", "1,2"),
        "workers": parse_int_list(workers, "--workers", "1,2"), "max_batch": parse_int_list(max_batch, "--max-batch", "1,8,32"),
        "max_delay_ms": parse_float_list(max_delay_ms, "--max-delay-ms"),
        "concurrency": parse_int_list(concurrency, "--concurrency", "1,8,32"), "seconds": seconds, "warmup_s": warmup_s,
        "binary": binary, "batch": batch, "confirm": confirm, "write": write}, stage="tune")
    run = _open(run_dir)
    record = tune(run, cfg, device=device, progress=lambda line: typer.echo(line, err=True))
    rows = [{"threads": p["setting"]["threads"], "workers": p["setting"]["workers"], "max batch": p["setting"]["max_batch"],
             "delay ms": f"{p['setting']['max_delay_ms']:g}", "clients": p["concurrency"], "req/s": f"{p['rps']:.0f}",
             "p50 ms": f"{p['p50_ms']:.2f}" if p["p50_ms"] is not None else "-",
             "p99 ms": f"{p['p99_ms']:.2f}" if p["p99_ms"] is not None else "-",
             "rows/call": p.get("rows_per_call", "-"), "errors": p["errors"] + p["non_200"]} for p in record["sweep"]]
    print_table(rows, list(rows[0]), title=f"serving sweep of {run.root} (variant {record['variant']})")
    for p in record["confirmation"]:
        m = p["measurements"]
        typer.echo(f"confirmed: threads {p['setting']['threads']}, workers {p['setting']['workers']}, max batch "
                   f"{p['setting']['max_batch']}, delay {p['setting']['max_delay_ms']:g} ms at {p['concurrency']} clients: "
                   f"{m[0]['rps']:.0f} then {m[1]['rps']:.0f} req/s, p99 {m[0]['p99_ms']:.2f} then {m[1]['p99_ms']:.2f} ms")
    s, c = record["settings"], record["chosen"]
    typer.echo(f"chosen: threads {s['threads']}, workers {s['workers']}, max batch {s['max_batch']}, max delay "
               f"{s['max_delay_ms']:g} ms: {c['rps']:.0f} req/s at {c['concurrency']} clients, p99 {c['p99_ms']:.2f} ms "
               f"(target {record['p99_ms']:g} ms)")
    if cfg.write:
        page, _ = write_report(run)
        typer.echo(f"written into {run.root}/manifest.json (section serving): `onnxpipe serve {run_dir}` and "
                   f"`onnxpipe export-triton` now start from it; plot in {page}")


@app.command("predict")
@user_errors
def predict_cmd(
    run_dir: RunArg,
    inputs: Annotated[list[Path], typer.Argument(help=".npy/.npz arrays (model inputs: one sample or a batch) or PNG/JPEG images.")],
    variant: VariantOpt = None,
    device: Annotated[str, typer.Option("--device", help="Execution provider: cpu or cuda (cuda without a CUDA provider is an error).")] = "cpu",
    raw: Annotated[bool, typer.Option("--raw", help="Arrays hold raw source data (e.g. digits 0..16): apply the run's normalization first.")] = False,
    invert: Annotated[str, typer.Option("--invert", help="Images: auto (invert dark-on-light images), yes, or no.")] = "auto",
    top: Annotated[int, typer.Option("--top", min=1, help="Show the K most likely classes.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prediction.")] = False,
) -> None:
    """Classify arrays and images with a run's selected variant; prints class and probability."""
    from .stages.predict import predict_files

    for p in predict_files(_open(run_dir), inputs, variant=variant, device=device, raw=raw, invert=invert, top=top):
        if as_json:
            typer.echo(json.dumps(p.to_json()))
        else:
            others = "".join(f", {c}: {q:.3f}" for c, q in p.top[1:])
            typer.echo(f"{p.source}: class {p.label} (p={p.probability:.3f}{others})")


@app.command("export-triton")
@user_errors
def export_triton_cmd(
    run_dir: RunArg,
    out_dir: Annotated[Path, typer.Argument(help="Model repository folder (created); the model goes to OUT_DIR/NAME/.")],
    variant: VariantOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help=help_of(TritonConfig, "name"))] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help=help_of(TritonConfig, "max_batch"))] = None,
    max_delay_ms: Annotated[Optional[float], typer.Option("--max-delay-ms", help=help_of(TritonConfig, "max_delay_ms"))] = None,
    device: Annotated[Optional[str], typer.Option("--device", help=help_of(TritonConfig, "device"))] = None,
    instances: Annotated[Optional[int], typer.Option("--instances", help=help_of(TritonConfig, "instances"))] = None,
    preferred_batch: Annotated[Optional[str], typer.Option("--preferred-batch", help=help_of(TritonConfig, "preferred_batch"))] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help=help_of(TritonConfig, "threads"))] = None,
    execution_mode: Annotated[Optional[str], typer.Option("--execution-mode",
                                                          help=help_of(TritonConfig, "execution_mode"))] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help=help_of(TritonConfig, "force"))] = None,
) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt + 1/model.onnx) for scaling out; after
    `onnxpipe tune RUN`, with the measured instance count, preferred batch size, queue delay and threads; else
    with the threads and execution mode `onnxpipe select` measured fastest for the variant."""
    from .serving.triton import export_triton, recorded_triton
    from .stages.configs import build_config, parse_int_list

    run = _open(run_dir)
    recorded, source = recorded_triton(run, variant)
    flags = {"name": name, "max_batch": max_batch, "max_delay_ms": max_delay_ms, "device": device, "instances": instances,
             "preferred_batch": parse_int_list(preferred_batch, "--preferred-batch", "8,32"), "threads": threads,
             "execution_mode": execution_mode, "force": force}
    cfg = build_config(TritonConfig, recorded, flags, stage="triton")
    if source:
        typer.echo(f"settings recorded in the run: {source} (flags given win)")
    entry = export_triton(run, out_dir, variant, cfg)
    typer.echo(f"wrote {entry}/config.pbtxt and {entry}/1/model.onnx; serve with "
               f"`tritonserver --model-repository {out_dir}`")


@app.command("bench")
@user_errors
def bench_cmd(
    run_dir: RunArg,
    batch: Annotated[Optional[str], typer.Option("--batch", help=help_of(BenchConfig, "batches"))] = None,
    threads: Annotated[Optional[str], typer.Option("--threads", help=help_of(BenchConfig, "threads"))] = None,
    device: Annotated[Optional[str], typer.Option("--device", help=help_of(BenchConfig, "device"))] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help=help_of(BenchConfig, "warmup"))] = None,
    runs: Annotated[Optional[int], typer.Option("--runs", min=1, help=help_of(BenchConfig, "runs"))] = None,
    variants: Annotated[Optional[str], typer.Option("--variants", help=help_of(BenchConfig, "variants"))] = None,
    memory: Annotated[Optional[bool], typer.Option("--memory/--no-memory", help=help_of(BenchConfig, "memory"))] = None,
    profile: Annotated[Optional[bool], typer.Option(
        "--profile/--no-profile", help="Profile every variant (--profile) or none (--no-profile); by default the "
        "selected one and torch eager. " + help_of(BenchConfig, "profile"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Time every variant side by side with PyTorch eager; FLOPs, fraction of the machine's peak, memory, and
    where each profiled variant's time goes (by op type and node, Q/DQ and layout shares, thread use)."""
    from .console import print_bench
    from .orchestrate import stage_bench
    from .stages.configs import parse_int_list, parse_name_list

    run = _open(run_dir)
    ctx = _ctx(config, bench={"batches": parse_int_list(batch, "--batch"),
                              "threads": parse_int_list(threads, "--threads", "1,2"), "device": device,
                              "warmup": warmup, "runs": runs, "memory": memory, "variants": parse_name_list(variants),
                              "profile": None if profile is None else ("all" if profile else "none")})
    cfg = ctx.config(BenchConfig, "bench")   # a bad setting stops here, before anything is measured
    info = stage_bench(run, ctx, log_line=lambda msg: typer.echo(msg, err=True))
    print_bench(run, info, cfg.device)


@app.command("report")
@user_errors
def report_cmd(
    run_dir: RunArg,
    divergence: Annotated[bool, typer.Option("--divergence/--no-divergence", help="Measure the per-node divergence "
                                             "of quantized variants where the manifest lacks it (64 training samples).")] = True,
) -> None:
    """Write report.html (self-contained, opens offline) and report.md into the run folder."""
    from .orchestrate import stage_report

    page, md = stage_report(_open(run_dir), _ctx(), divergence=divergence)
    typer.echo(f"report: {page} (and {md.name})")


@app.command("explain")
@user_errors
def explain_cmd(
    run_dir: RunArg,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, max=64, help=help_of(ExplainConfig, "samples"))] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help=help_of(ExplainConfig, "steps"))] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=help_of(ExplainConfig, "seed"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Attributions of the torch model (integrated gradients; attention maps for attention models) as PNG grids."""
    from .orchestrate import stage_explain

    run = _open(run_dir)
    info = stage_explain(run, _ctx(config, explain={"samples": samples, "steps": steps, "seed": seed}))
    typer.echo(f"{info['method']}; torch misclassifies {info['misclassified_by_torch']} test samples")
    for g in info["groups"]:
        typer.echo(f"  {g['title']}: {run.root / g['png']}")
    typer.echo("`onnxpipe report RUN` shows them beside the variants")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
