"""The `onnxpipe` command line: one thin function per command; stages do the work.

User errors print one line (`error: ...`) and exit 1; heavy libraries are imported inside commands."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Carry PyTorch models to verified, compressed ONNX Runtime deployments.\n\n"
    "Start with `onnxpipe run` (train, export and verify every built-in model on the bundled digits data); "
    "every stage also works alone on a run folder (exports/<model>).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RunArg = Annotated[Path, typer.Argument(help="Run folder, e.g. exports/cnn (made by `onnxpipe train` or `onnxpipe run`).")]
DataOpt = Annotated[str, typer.Option("--data", help="digits (bundled, default), mnist:DIR (IDX files) or npz:FILE (arrays x, y).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a model config field, e.g. --set d_model=256 (repeatable).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="JSON or TOML file with [model], [train], [export], [verify] sections.")]
SizeOpt = Annotated[Optional[str], typer.Option("--size", help="Model size preset: default or base (bigger, for compression experiments).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the data split, initialization and batch order.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use a seeded subset of N training samples (quick experiments).", min=1)]
DeviceOpt = Annotated[str, typer.Option("--device", help="Execution provider: cpu or cuda (cuda without a CUDA provider is an error).")]


def user_errors(fn):
    """Turn onnxpipe's typed errors into one clear line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import OnnxpipeError

        try:
            return fn(*args, **kwargs)
        except OnnxpipeError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except KeyError as e:
            from .models import UnknownModelError

            if isinstance(e, UnknownModelError):
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                raise typer.Exit(1) from None
            raise

    return wrapper


def parse_sets(items: list[str] | None) -> dict[str, str]:
    from .errors import ConfigError

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"bad --set {item!r}: expected KEY=VALUE, e.g. --set d_model=256")
        out[key.strip()] = value.strip()
    return out


def read_config_file(path: Path | None) -> dict:
    """{"model": {...}, "train": {...}, "export": {...}, "verify": {...}} from JSON or TOML."""
    from .errors import ConfigError

    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as e:  # json / toml decode errors
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    known = {"model", "train", "export", "optimize", "verify", "quantize", "select", "distill", "bench", "explain"}
    if not isinstance(data, dict) or set(data) - known:
        raise ConfigError(f"config file {path}: top-level keys must be sections among {', '.join(sorted(known))}")
    return data


def resolve_models(names: str) -> list[str]:
    """'all', or comma-separated registered names and user factories (pkg.module:build, file.py:build)."""
    from .models import list_models

    from .core.byo import resolve_model

    if names == "all":
        return list_models()
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        resolve_model(n)  # fails early, with the reason, before any run folder is made
    return out


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c not in ("model", "variant", "parent", "parity", "stage") else "left")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file or pipe has no width to fit: don't cut columns to 80
    console.print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "*" if v else ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _summary(run) -> None:
    from .orchestrate import summary_rows

    rows = summary_rows(run)
    for r in rows:
        r["size"] = f"{r.pop('bytes') / 1024:.1f} KiB"
    print_table(rows, ["model", "variant", "parent", "accuracy", "parity", "size"])


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
    stages: Annotated[Optional[str], typer.Option("--stages", help="Comma-separated subset of stages to run, in pipeline order.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing run folders.")] = False,
    no_train: Annotated[bool, typer.Option("--no-train", help="Skip training: export the model as its factory "
                                           "builds it (or with --weights).")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="A state_dict file (torch.save) to use "
                                                    "instead of training; implies --no-train.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the whole pipeline (train -> export -> verify -> ...) for each model; end with a table."""
    import time

    from .core.byo import model_folder
    from .orchestrate import Context, run_model

    file_cfg = read_config_file(config)
    overrides = {**file_cfg.get("model", {}), **parse_sets(set_)}
    names = resolve_models(model)
    if overrides and len(names) > 1:
        from .errors import ConfigError

        raise ConfigError("--set and [model] settings apply to one model; pick it with --model NAME")
    train_overrides = {**file_cfg.get("train", {}), **({"epochs": epochs} if epochs else {})}
    t0 = time.monotonic()
    runs = []
    for name in names:
        ctx = Context(data=data, seed=seed, limit=limit, progress=not quiet, train_overrides=train_overrides,
                      stage_options={k: v for k, v in file_cfg.items() if k not in ("model", "train")},
                      train=not no_train, weights=weights)
        run = run_model(name, out / model_folder(name), ctx, overrides=overrides, size=size, force=force,
                        stages=stages.split(",") if stages else None,
                        on_stage=None if quiet else lambda m, s: typer.echo(f"[{m}] {s}", err=True))
        runs.append(run)
    for run in runs:
        _summary(run)
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
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Maximum epochs (early stop on validation plateau).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the one-cycle schedule.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", min=1, help="Epochs without validation gain before stopping.")] = None,
    size: SizeOpt = None,
    set_: SetOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes on this machine (DDP; "
                                       "--batch-size stays the global batch). Under torchrun leave it at 1.")] = 1,
    train_device: Annotated[str, typer.Option("--device", help="Training device: cpu (gloo) or cuda (nccl, one GPU per process).")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train MODEL and write variant `torch` (model.pt) into its run folder."""
    from .core.byo import model_folder
    from .stages.distributed import Job, check_device, launched_by_torchrun, single_world, spawn_training, torchrun_training
    from .errors import ConfigError
    from .orchestrate import prepare_run
    from .runfolder import Run
    from .stages.train import train, train_config_for

    file_cfg = read_config_file(config)
    root = run_dir or Path("exports") / model_folder(model)

    def prepare():
        return prepare_run(model, root, data=data, overrides={**file_cfg.get("model", {}), **parse_sets(set_)},
                           size=size, seed=seed, limit=limit, force=force, resume=resume)

    def config_for(run):
        try:
            return train_config_for(run.spec, **{**file_cfg.get("train", {}), "epochs": epochs, "lr": lr,
                                                 "batch_size": batch_size, "patience": patience, "seed": seed})
        except TypeError as e:
            raise ConfigError(f"bad [train] setting: {e}") from None

    if launched_by_torchrun():
        if nproc > 1:
            raise ConfigError("--nproc starts its own processes; under torchrun use --nproc-per-node instead")
        run = torchrun_training(lambda: prepare()[0], config_for, device=train_device, resume=resume,
                                progress=not quiet)
        if run is None:
            return  # not rank 0: rank 0 reports
    elif nproc > 1:
        check_device(train_device, nproc)
        run, ds = prepare()
        spawn_training(Job(str(run.root), config_for(run), resume, train_device, not quiet, ds), nproc)
        run = Run.open(run.root)
    else:
        check_device(train_device, 1)
        run, ds = prepare()
        train(run, config_for(run), ds, resume=resume, progress=not quiet, world=single_world(train_device))
    t = run.manifest["training"]
    typer.echo(f"{model}: test accuracy {run.metrics('torch')['accuracy']:.4f} after {t['epochs_run']} epochs "
               f"(best validation {t['best_val_accuracy']:.4f} at epoch {t['best_epoch']}, {t['seconds']} s) -> {run.path('torch')}")


@app.command("export")
@user_errors
def export_cmd(
    run_dir: RunArg,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the model's, 18; 23 for transformer).")] = None,
    atol: Annotated[float, typer.Option("--atol", help="Max abs error allowed vs PyTorch on the shape grid.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative error allowed vs PyTorch.")] = 1e-3,
) -> None:
    """Export the run's torch model to ONNX (dynamic batch / sequence axes), checked on a grid of shapes."""
    from .core.data import reload_dataset
    from .stages.export import ExportConfig, export
    from .runfolder import Run

    run = Run.open(run_dir)
    art = export(run, ExportConfig(opset=opset, atol=atol, rtol=rtol),
                 test_inputs=reload_dataset(run.manifest["dataset"]).x_test)
    p = next(p for p in run.manifest["parity"] if p["candidate"] == "onnx" and p["reference"] == "torch")
    typer.echo(f"exported {run.root / art.path} (opset {art.opset}, {art.bytes / 1024:.1f} KiB); "
               f"parity vs torch over {len(p['shapes'])} shapes: max abs {p['max_abs']:.2e}")


@app.command("verify")
@user_errors
def verify_cmd(
    run_dir: RunArg,
    device: DeviceOpt = "cpu",
    max_drop: Annotated[float, typer.Option("--max-drop", help="Accuracy-drop budget for lossy variants, in points.")] = 1.0,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="Top-1 agreement budget for lossy variants.")] = 0.99,
    atol: Annotated[float, typer.Option("--atol")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol")] = 1e-3,
) -> None:
    """Parity of every variant against its parent and torch; exit 1 if any check fails."""
    from .core.data import reload_dataset
    from .runfolder import Run
    from .stages.verify import VerifyConfig, failures, verify

    run = Run.open(run_dir)
    reports = verify(run, VerifyConfig(atol=atol, rtol=rtol, max_accuracy_drop=max_drop,
                                       min_agreement=min_agreement, device=device),
                     reload_dataset(run.manifest["dataset"]))
    rows = []
    for r in reports:
        rows.append({"reference": r.reference, "candidate": r.candidate, "rule": r.rule,
                     "passed": "pass" if r else ("over budget" if r.gate else "FAIL"), "max_abs": f"{r.max_abs:.2e}",
                     "agreement": r.agreement, "acc_drop_pt": r.accuracy_drop, "shapes": len({tuple(c.shape) for c in r.checks})})
    print_table(rows, ["reference", "candidate", "rule", "passed", "max_abs", "agreement", "acc_drop_pt", "shapes"],
                title=f"parity: {run.root}")
    for r in reports:
        if not r:
            typer.echo(r.summary(), err=True)
    if failures(reports):
        raise typer.Exit(1)


@app.command("optimize")
@user_errors
def optimize_cmd(
    run_dir: RunArg,
    level: Annotated[str, typer.Option("--level", help="Level the saved file is optimized at: basic or extended "
                                       "(layout/all would save layouts for this CPU only).")] = "extended",
    atol: Annotated[float, typer.Option("--atol", help="Max abs error allowed vs the unoptimized graph on the shape grid.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative error allowed vs the unoptimized graph.")] = 1e-3,
) -> None:
    """ONNX Runtime graph optimization of variant onnx -> onnx_opt (fusions counted, parity on the shape grid)."""
    from .stages.optimize import OptimizeConfig, optimize
    from .runfolder import Run

    run = Run.open(run_dir)
    art = optimize(run, OptimizeConfig(level=level, atol=atol, rtol=rtol))
    p = next(p for p in run.manifest["parity"] if p["candidate"] == art.variant and p["reference"] == art.parent)
    fused = ", ".join(f"{op.rsplit('.', 1)[-1]} x{n}" for op, n in art.extra["fused_nodes"].items()) or "none"
    typer.echo(f"{art.variant}: {run.root / art.path} saved at level {art.extra['saved_level']} (sessions apply "
               f"{art.extra['load_level']} at load); nodes {art.extra['nodes_before']} -> {art.extra['nodes_after']}; "
               f"fused: {fused}; attention nodes: {art.extra['attention_nodes']}; parity vs {art.parent} over "
               f"{len(p['shapes'])} shapes: max abs {p['max_abs']:.2e}")


@app.command("quantize")
@user_errors
def quantize_cmd(
    run_dir: RunArg,
    mode: Annotated[str, typer.Option("--mode", help="dynamic, static (QDQ, calibrated), fp16, or auto (every mode).")] = "auto",
    calibration: Annotated[str, typer.Option("--calibration", help="Static: minmax, entropy or percentile.")] = "minmax",
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Static: training samples used for calibration.")] = 256,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="One weight scale per output channel.")] = False,
    activation_type: Annotated[str, typer.Option("--activation-type", help="Static activations: uint8 (fast U8S8) or int8.")] = "uint8",
    weight_type: Annotated[str, typer.Option("--weight-type", help="Weights: int8 or uint8.")] = "int8",
    reduce_range: Annotated[bool, typer.Option("--reduce-range", help="7-bit weights (avoids saturation without VNNI).")] = False,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Budget: accuracy points a variant may lose vs its parent.")] = 1.0,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="Budget: top-1 agreement with the parent.")] = 0.99,
    exclusion_rounds: Annotated[int, typer.Option("--exclusion-rounds", help="Retries keeping the most sensitive nodes in FP32 (0: none).")] = 6,
    source: Annotated[str, typer.Option("--source", help="FP32 ONNX variant to start from.")] = "onnx",
    seed: SeedOpt = 0,
) -> None:
    """INT8 (dynamic / static QDQ) and FP16 variants, each held to an accuracy budget against its parent."""
    from .core.data import reload_dataset
    from .stages.quantize import QuantizeConfig, quantize
    from .runfolder import Run

    cfg = QuantizeConfig(mode=mode, calibration=calibration, calib_samples=calib_samples, per_channel=per_channel,
                         activation_type=activation_type, weight_type=weight_type, reduce_range=reduce_range,
                         max_accuracy_drop=max_drop, min_agreement=min_agreement, exclusion_rounds=exclusion_rounds,
                         seed=seed)
    run = Run.open(run_dir)
    results = quantize(run, cfg, reload_dataset(run.manifest["dataset"]), source=source)
    rows = []
    for r in results:
        if r.artifact is None:
            rows.append({"variant": r.variant, "status": "not kept: " + r.reason})
            continue
        m, e = run.metrics(r.variant), r.artifact.extra
        rows.append({"variant": r.variant, "status": "kept", "size_ratio": e["size_ratio"], "agreement": m["agreement"],
                     "acc_drop_pt": m["accuracy_drop"], "cosine": m["cosine"],
                     "fp32_nodes": len(e["excluded_nodes"]), "preprocess": e["preprocess"]})
    print_table(rows, ["variant", "status", "size_ratio", "agreement", "acc_drop_pt", "cosine", "fp32_nodes", "preprocess"],
                title=f"quantize: {run.root} (budget {max_drop} pt, agreement >= {min_agreement})")


@app.command("distill")
@user_errors
def distill_cmd(
    run_dir: RunArg,
    student_scale: Annotated[Optional[float], typer.Option("--student-scale", help="Scale the teacher's width fields (0-1); default: the model's declared student.")] = None,
    student_model: Annotated[Optional[str], typer.Option("--student-model", help="Another registered model of the same input family as the student, e.g. gru for a transformer teacher.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Softmax temperature T of the soft targets (loss scaled by T^2). Default: the student model's tuned value (4 for cnn, else 2).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Weight of the soft-target loss; 1 - alpha weighs the hard labels. Default: tuned per model (0.7 cnn, else 0.5).")] = None,
    mixup: Annotated[Optional[float], typer.Option("--mixup", help="Beta(a, a) mixup for the student and its scratch twin (0 = off); the teacher labels the mixed inputs. Default: tuned per model (0 cnn, else 0.4).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Student epochs (default: the student model's tuned setting).")] = None,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Accuracy drop (points) against the teacher allowed for student variants to be selected.")] = 1.5,
    scratch: Annotated[bool, typer.Option("--scratch/--no-scratch", help="Also train the same student from scratch (same epochs and seed) to measure the distillation gain.")] = True,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the student's (and scratch twin's) training from their checkpoints.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Distill a smaller student from the run's teacher, then export, optimize, quantize, verify and select as for the teacher."""
    from .orchestrate import Context, stage_distill, stage_select, stage_verify
    from .runfolder import Run

    run = Run.open(run_dir)
    ctx = Context(seed=seed, progress=not quiet, stage_options={"distill": {
        "student_scale": student_scale, "student_model": student_model, "temperature": temperature, "alpha": alpha,
        "mixup": mixup, "epochs": epochs, "max_accuracy_drop": max_drop, "scratch_baseline": scratch, "resume": resume}})
    stage_distill(run, ctx)
    stage_verify(run, ctx)
    stage_select(run, ctx)
    d = run.manifest["distillation"]
    rows = [{"model": f"teacher ({run.model_name})", "params": d["teacher_params"], "accuracy": d["teacher_accuracy"]},
            {"model": f"distilled student ({d['student_model']})", "params": d["student_params"], "accuracy": d["distilled_accuracy"]}]
    if "scratch_accuracy" in d:
        rows.append({"model": "same student from scratch", "params": d["student_params"], "accuracy": d["scratch_accuracy"]})
    print_table(rows, ["model", "params", "accuracy"],
                title=f"distill: {run.root} (T={d['temperature']}, alpha={d['alpha']}, mixup={d['mixup']})")
    sp = d.get("speedup", {}).get("64", {})
    if sp.get("speedup"):
        typer.echo(f"batch 64: {sp['student_best']} {sp['student_ms']:.3f} ms vs the teacher's fastest {sp['teacher_best']} "
                   f"{sp['teacher_ms']:.3f} ms: {sp['speedup']:.2f}x")
    else:
        typer.echo("no student variant is within the budget against the teacher, so none can be selected")
    typer.echo(f"selected: {run.manifest['selected']}")


@app.command("select")
@user_errors
def select_cmd(
    run_dir: RunArg,
    batches: Annotated[str, typer.Option("--batches", help="Comma-separated batch sizes to time.")] = "1,64",
    runs: Annotated[int, typer.Option("--runs", help="Timed rounds per batch size.", min=1)] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warm-up rounds.", min=0)] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", help="ORT intra-op threads (default: usable cores).", min=1)] = None,
    objective: Annotated[str, typer.Option("--objective", help="geomean (over batch sizes) or one batch size, e.g. 64.")] = "geomean",
) -> None:
    """Time every ONNX variant here and mark the fastest one within budget as `selected`."""
    from .errors import ConfigError
    from .runfolder import Run
    from .stages.select import SelectConfig, select

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise ConfigError(f"bad --batches {batches!r}: expected comma-separated integers, e.g. 1,64") from None
    run = Run.open(run_dir)
    sel = select(run, SelectConfig(batches=sizes, runs=runs, warmup=warmup, threads=threads, objective=objective))
    rows = []
    for v in [*sel.ranking, *sel.excluded]:
        lat = run.metrics(v).get("latency_ms", {})
        rows.append({"variant": v, **{f"b{b} ms": lat.get(str(b)) for b in sizes},
                     "bytes": run.artifact(v).bytes, "selected": v == sel.selected, "note": sel.excluded.get(v, "")})
    print_table(rows, ["variant", *[f"b{b} ms" for b in sizes], "bytes", "selected", "note"],
                title=f"select: {run.root} (p50 latency, objective {objective})")
    typer.echo(f"selected: {sel.selected}")


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
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Make a run folder around an ONNX model (variant `onnx` is the root), ready for optimize, quantize, verify, serve."""
    from .stages.importer import import_onnx, stages_for_import
    from .orchestrate import Context, run_stages

    names = stages_for_import(stages) if stages else []  # a bad stage name stops us before the import
    root = run_dir or Path("exports") / model_file.stem
    run = import_onnx(model_file, root, data=data, seed=seed, limit=limit, force=force)
    acc = run.metrics("onnx").get("accuracy")
    typer.echo(f"imported {model_file} -> {run.path('onnx')} (opset {run.artifact('onnx').opset}"
               + (f", test accuracy {acc:.4f}" if acc is not None else ", no data: pass --data for accuracy") + ")")
    if names:
        run_stages(run, Context(data=data or "digits", seed=seed, limit=limit, progress=not quiet), names,
                   on_stage=None if quiet else lambda m, s: typer.echo(f"[{m}] {s}", err=True))
        _summary(run)


@app.command("show")
@user_errors
def show_cmd(run_dir: RunArg) -> None:
    """Summarize a run folder: variants, accuracy, parity, sizes."""
    from .runfolder import Run

    _summary(Run.open(run_dir))


# --- serving (pipeline/serving/, pipeline/predict.py) -------------------------------------------------

VariantOpt = Annotated[Optional[str], typer.Option("--variant", help="Variant to use (default: the run's selected one).")]


@app.command("serve")
@user_errors
def serve_cmd(
    run_dir: RunArg,
    variant: VariantOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port, printed at start).")] = 8000,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if ONNX Runtime has it, else CPU; the log says which), cpu, or cuda (an error if CUDA is not usable).")] = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most rows merged into one ONNX Runtime call; 1 turns dynamic batching off.")] = 32,
    max_delay_ms: Annotated[float, typer.Option("--max-delay-ms", min=0.0, help="Longest a request waits for others to join its batch (only while others are arriving).")] = 2.0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads (default: the cores this process may use).")] = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body accepted; larger ones get 413.")] = 32.0,
    name: Annotated[Optional[str], typer.Option("--name", help="Model name in the URLs (default: the run's model, e.g. cnn).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="One JSON line per request on stderr.")] = True,
) -> None:
    """Serve a run's variant over the Open Inference Protocol (KServe v2 REST) until SIGTERM / Ctrl-C."""
    from .runfolder import Run
    from .serving.app import ServeConfig, serve
    from .serving.model import ServedModel

    cfg = ServeConfig(host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms, max_body_mb=max_body_mb,
                      access_log=access_log)
    model = ServedModel.prepare(Run.open(run_dir), variant, device=device, threads=threads, name=name)
    raise typer.Exit(serve(model, cfg))


@app.command("predict")
@user_errors
def predict_cmd(
    run_dir: RunArg,
    inputs: Annotated[list[Path], typer.Argument(help=".npy/.npz arrays (model inputs: one sample or a batch) or PNG/JPEG images.")],
    variant: VariantOpt = None,
    device: DeviceOpt = "cpu",
    raw: Annotated[bool, typer.Option("--raw", help="Arrays hold raw source data (e.g. digits 0..16): apply the run's normalization first.")] = False,
    invert: Annotated[str, typer.Option("--invert", help="Images: auto (invert dark-on-light images), yes, or no.")] = "auto",
    top: Annotated[int, typer.Option("--top", min=1, help="Show the K most likely classes.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prediction.")] = False,
) -> None:
    """Classify arrays and images with a run's selected variant; prints class and probability."""
    from .stages.predict import predict_files
    from .runfolder import Run

    for p in predict_files(Run.open(run_dir), inputs, variant=variant, device=device, raw=raw, invert=invert, top=top):
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
    name: Annotated[Optional[str], typer.Option("--name", help="Model name in the repository (default: the run's model).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=0, help="Triton max_batch_size (0: no batching).")] = 32,
    max_delay_ms: Annotated[float, typer.Option("--max-delay-ms", min=0.0, help="Triton dynamic batching queue delay.")] = 2.0,
    device: Annotated[str, typer.Option("--device", help="Instance kind: auto (Triton decides), cpu, or cuda.")] = "auto",
    instances: Annotated[int, typer.Option("--instances", min=1, help="Model instances Triton runs.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR/NAME if it exists.")] = False,
) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt + 1/model.onnx) for scaling out."""
    from .runfolder import Run
    from .serving.triton import TritonConfig, export_triton

    cfg = TritonConfig(name=name, max_batch=max_batch, max_delay_ms=max_delay_ms, device=device,
                       instances=instances, force=force)
    entry = export_triton(Run.open(run_dir), out_dir, variant, cfg)
    typer.echo(f"wrote {entry}/config.pbtxt and {entry}/1/model.onnx; serve with "
               f"`tritonserver --model-repository {out_dir}`")


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,64' -> (1, 64); a typed ConfigError naming the option for anything else."""
    from .errors import ConfigError

    hint = f"expected comma-separated positive integers, e.g. {option} {'1,64' if option == '--batch' else '1,2'}"
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"bad {option} {text!r}: {hint}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"bad {option} {text!r}: {hint}")
    return values


def _bench_display(row: dict) -> dict:
    """A bench row with short, fixed-precision strings for the terminal."""
    def num(v, fmt):
        return None if v is None else format(v, fmt)

    return {
        "variant": row["variant"] + (" *" if row["selected"] else ""), "threads": row["threads"], "batch": row["batch"],
        "p50_ms": num(row["p50_ms"], ".3f"), "p90_ms": num(row["p90_ms"], ".3f"), "p99_ms": num(row["p99_ms"], ".3f"),
        "rows/s": num(row["rows_s"], ".0f"), "x torch": num(row["x_torch"], ".2f"), "GFLOP/s": num(row["gflops"], ".1f"),
        "% peak": num(row["pct_peak"], ".0f"), "limit": row["limit"], "kind": row["kind"],
        "MFLOP/row": num(None if row["flops_per_row"] is None else row["flops_per_row"] / 1e6, ".3f"),
        "size KiB": num(row["size_kib"], ".1f"), "peak RSS MB": num(row["rss_mb"], ".0f"),
        "accuracy": num(row["accuracy"], ".4f"),
    }


@app.command("bench")
@user_errors
def bench_cmd(
    run_dir: RunArg,
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = "1,64",
    threads: Annotated[Optional[str], typer.Option("--threads", help="Comma-separated intra-op thread counts (default: 1 and all cores).")] = None,
    device: DeviceOpt = "cpu",
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed rounds before timing.")] = 5,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed rounds per cell (every variant once per round).")] = 30,
    variants: Annotated[Optional[str], typer.Option("--variants", help="Comma-separated subset of variants (torch is always included).")] = None,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure the peak RSS of a fresh process per variant.")] = True,
) -> None:
    """Time every variant side by side with PyTorch eager; FLOPs, fraction of the machine's peak, memory."""
    from .stages.bench import BenchConfig, bench, bench_rows
    from .runfolder import Run

    cfg = BenchConfig(batches=parse_int_list(batch, "--batch"),
                      threads=parse_int_list(threads, "--threads") if threads else None, device=device,
                      warmup=warmup, runs=runs, memory=memory,
                      variants=tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None)
    run = Run.open(run_dir)
    info = bench(run, cfg, log=lambda msg: typer.echo(msg, err=True))
    rows = bench_rows(run)
    print_table([_bench_display(r) for r in rows],
                ["variant", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "rows/s", "x torch", "GFLOP/s", "% peak",
                 "limit"], title=f"bench: {run.root} ({info['machine']['cpu']}, device {cfg.device})")
    per_variant = {r["variant"]: _bench_display(r) for r in rows}
    print_table(list(per_variant.values()), ["variant", "kind", "MFLOP/row", "size KiB", "peak RSS MB", "accuracy"])
    for t, lim in info["limits"].items():
        for b, x in lim["by_batch"].items():
            typer.echo(f"limits at {t} thread(s), measured in the batch-{b} rounds: FP32 matmul {x['fp32_gflops']:.0f} GFLOP/s, "
                       f"INT8 matmul {x['int8_gops']:.0f} GOP/s, per-call overhead ORT {1000 * x['overhead_ms']:.0f} us, "
                       f"torch {1000 * x['torch_overhead_ms']:.0f} us")
    typer.echo(f"results in {run.root / 'manifest.json'} (metrics.<variant>.bench)")


@app.command("report")
@user_errors
def report_cmd(
    run_dir: RunArg,
    divergence: Annotated[bool, typer.Option("--divergence/--no-divergence", help="Measure the per-node divergence "
                                             "of quantized variants where the manifest lacks it (64 training samples).")] = True,
) -> None:
    """Write report.html (self-contained, opens offline) and report.md into the run folder."""
    from .stages.report import write_report
    from .runfolder import Run

    run = Run.open(run_dir)
    if divergence:
        from .core.data import reload_dataset
        from .stages.divergence import record_node_divergence

        record_node_divergence(run, reload_dataset(run.manifest["dataset"]))
    page, md = write_report(run)
    typer.echo(f"report: {page} (and {md.name})")


@app.command("explain")
@user_errors
def explain_cmd(
    run_dir: RunArg,
    samples: Annotated[int, typer.Option("--samples", min=1, max=64, help="Test samples per grid (misclassified ones first).")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Integrated-gradients steps.")] = 32,
    seed: SeedOpt = 0,
) -> None:
    """Attributions of the torch model (integrated gradients; attention maps for attention models) as PNG grids."""
    from .stages.explain import ExplainConfig, explain
    from .runfolder import Run

    run = Run.open(run_dir)
    info = explain(run, ExplainConfig(samples=samples, steps=steps, seed=seed))
    typer.echo(f"{info['method']}; torch misclassifies {info['misclassified_by_torch']} test samples")
    for g in info["groups"]:
        typer.echo(f"  {g['title']}: {run.root / g['png']}")
    typer.echo("`onnxpipe report RUN` shows them beside the variants")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
