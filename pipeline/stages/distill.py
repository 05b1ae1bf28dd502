"""Distill stage: a smaller student trained on the teacher's soft targets, and its scratch twin.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)

The student becomes variant `student` (torch, parent `torch`, lossy, with a budget against the
teacher) and then goes through the same export / optimize / quantize / verify / select functions as
the teacher. The same architecture is also trained from scratch on hard labels with the same epochs
and seed, so the distillation gain is a measured number in the manifest, not an assumption."""
from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch.nn import functional as F

from ..core.data import Dataset
from ..core.parity import paired_delta
from ..core.predictors import load_torch_model, save_weights
from ..errors import ConfigError
from ..runfolder import Artifact, Run
from .configs import DistillConfig
from ..models import call_model
from .train import evaluate, first_output, fit, set_determinism, train_config_for

STUDENT_FILE = "student.pt"


FALLBACK = {"temperature": 2.0, "alpha": 0.5, "mixup": 0.4}


def resolve(cfg: DistillConfig, spec, ds: Dataset | None = None) -> DistillConfig:
    """Fill the unset temperature / alpha / mixup from the student model's defaults, then the fallbacks.
    Mixup needs float inputs: for a model that reads token ids it defaults to 0."""
    chosen = {k: getattr(cfg, k) for k in FALLBACK}
    values = {k: v if v is not None else spec.distill_defaults.get(k, FALLBACK[k]) for k, v in chosen.items()}
    if cfg.mixup is None and ds is not None and any(a.dtype.kind not in "f" for a in ds.x_train.arrays):
        values["mixup"] = 0.0
    return replace(cfg, **values)


# Keyword names of a factory that are widths (scaled by --student-scale), and names that never are.
WIDTH_WORDS = ("hidden", "width", "channel", "dim", "d_model", "units", "features", "filters", "embed", "ff",
               "intermediate", "n_embd", "size")
NOT_WIDTH_WORDS = ("class", "label", "vocab", "layer", "head", "image", "seq", "len", "position", "patch", "kernel",
                   "stride", "max", "num_", "token", "type")
DEFAULT_FACTORY_SCALE = 0.5


def width_fields(cfg) -> list[str]:
    """The int config fields that look like widths (hidden, channels, width, d_model, intermediate_size, ...)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f.name.lower()
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            continue
        if any(w in name for w in WIDTH_WORDS) and not any(w in name for w in NOT_WIDTH_WORDS):
            out.append(f.name)
    return out


def student_spec_and_config(run: Run, cfg: DistillConfig):
    """The student's ModelSpec and config, adapted to the run's data.

    Built-in models: the spec's declared student (or its width fields scaled by --student-scale). Another
    registered model (--student-model): its own default config. A user's factory: its declared STUDENT,
    else its width keywords (width_fields) scaled by --student-scale (default 0.5). --student-set KEY=VALUE
    then sets any keyword. A student as large as its teacher is refused."""
    from ..models import get_model, replace_config

    teacher_spec, teacher_cfg = run.spec_of("torch"), run.model_config_of("torch")
    shapes = {r["name"]: tuple(r.get("sample_shape", r["shape"])) for r in run.dataset_info.get("inputs", [])} or \
        {teacher_spec.input_specs(teacher_cfg)[0].name: tuple(run.dataset_info["sample_shape"])}
    if cfg.student_model and cfg.student_model != teacher_spec.name:
        spec = get_model(cfg.student_model)
        if spec.family != teacher_spec.family:
            raise ConfigError(
                f"student model {spec.name!r} takes {spec.family} inputs but the teacher {teacher_spec.name!r} takes "
                f"{teacher_spec.family} inputs; pick a student of the {teacher_spec.family} family"
            )
        base = spec.make_config({"num_classes": teacher_cfg.num_classes})
        first = spec.input_specs(base)[0].name
        base = spec.adapt_to_data(base, {first: next(iter(shapes.values()))})
        student_cfg = base if cfg.student_scale is None else replace_config(base, _scaled(base, spec.student, cfg.student_scale))
    else:
        spec, base = teacher_spec, teacher_cfg
        fields = spec.student or {}
        if cfg.student_scale is not None or (not fields and spec.source is not None):
            scale = cfg.student_scale if cfg.student_scale is not None else DEFAULT_FACTORY_SCALE
            names = list(fields) if fields else width_fields(base)
            student_cfg = replace_config(base, _scaled(base, names, scale))
        else:
            student_cfg = replace_config(base, fields)
    if cfg.student_set:
        try:
            student_cfg = replace_config(student_cfg, dict(cfg.student_set))
        except ValueError as e:
            raise ConfigError(f"--student-set: {e}") from None
    _check_smaller(spec, student_cfg, teacher_spec, teacher_cfg)
    return spec, student_cfg


def _check_smaller(spec, student_cfg, teacher_spec, teacher_cfg) -> None:
    def params(s, c) -> int:
        try:
            return sum(p.numel() for p in s.build(c).parameters())
        except ConfigError:
            raise
        except Exception as e:  # a user's factory can reject a scaled config in its own words
            raise ConfigError(f"the student config {c} does not build: {type(e).__name__}: {str(e)[:200]}; set its "
                              "widths with --student-set KEY=VALUE") from None

    student, teacher = params(spec, student_cfg), params(teacher_spec, teacher_cfg)
    if student >= teacher:
        hint = ", ".join(width_fields(teacher_cfg)) or "none found"
        raise ConfigError(f"the student has {student:,} parameters, as many as its teacher ({teacher:,}): nothing to "
                          f"distill into. Ask for a smaller one with --student-scale 0.5 (scales the width keywords: "
                          f"{hint}), --student-set KEY=VALUE, or declare STUDENT = {{...}} beside the factory")


def _scaled(base, fields, scale: float) -> dict:
    """Scale each named width field; keep attention width divisible by the heads."""
    out = {}
    for name in fields:
        value = max(1, int(round(getattr(base, name) * scale)))
        heads = getattr(base, "heads", None) or getattr(base, "num_attention_heads", None) or getattr(base, "n_head", None)
        if name in ("d_model", "hidden_size", "n_embd", "dim") and isinstance(heads, int) and heads > 0:
            value = max(heads, value - value % heads)
        out[name] = value
    return out


def kd_loss(teacher: torch.nn.Module, temperature: float, alpha: float):
    """The distillation loss as fit()'s loss_fn(logits, labels, inputs)."""
    teacher.eval()
    last: dict = {}

    def loss(student_logits, y, xb):
        if last.get("x") is not xb:  # mixed batches call twice with the same inputs: run the teacher once
            with torch.no_grad():
                last.update(x=xb, t=first_output(call_model(teacher, xb)))
        t = last["t"]
        soft = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(t / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature ** 2
        return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, y)

    return loss


def distill(run: Run, cfg: DistillConfig, ds: Dataset, *, progress: bool = True) -> list[Artifact]:
    """Train the student (and its scratch twin) and record variant `student` with its selection gate."""
    spec, student_cfg = student_spec_and_config(run, cfg)
    cfg = resolve(cfg, spec, ds)
    teacher = load_torch_model(run, "torch")
    train_cfg = train_config_for(spec, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, mixup=cfg.mixup or None)
    teacher_acc, _ = evaluate(teacher, ds.x_test, ds.y_test)

    set_determinism(cfg.seed)
    student = spec.build(student_cfg)
    hist = fit(student, ds, train_cfg, checkpoint=run.root / "checkpoints" / "student.pt", resume=cfg.resume,
               loss_fn=kd_loss(teacher, cfg.temperature, cfg.alpha), desc=f"distill {spec.name}", progress=progress)
    distilled_acc, _ = evaluate(student, ds.x_test, ds.y_test)
    record = {
        "student_model": spec.name, "student_config": asdict(student_cfg), "train": asdict(train_cfg),
        "temperature": cfg.temperature, "alpha": cfg.alpha, "mixup": cfg.mixup, "epochs_run": hist["epoch"],
        "teacher_accuracy": teacher_acc, "distilled_accuracy": distilled_acc,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
    }
    if cfg.scratch_baseline:
        set_determinism(cfg.seed)
        twin = spec.build(student_cfg)
        twin_hist = fit(twin, ds, train_cfg, checkpoint=run.root / "checkpoints" / "student_scratch.pt",
                        resume=cfg.resume, desc=f"scratch {spec.name}", progress=progress)
        scratch_acc, scratch_logits = evaluate(twin, ds.x_test, ds.y_test)
        _, student_logits = evaluate(student, ds.x_test, ds.y_test)
        record.update(scratch_accuracy=scratch_acc, scratch_epochs_run=twin_hist["epoch"],
                      distillation_gain_pt=100.0 * (distilled_acc - scratch_acc),
                      distillation_gain=paired_delta(student_logits.argmax(1) == ds.y_test,
                                                     scratch_logits.argmax(1) == ds.y_test).to_json())
    save_weights(run.root / STUDENT_FILE, spec.name, student_cfg, student.state_dict())
    with run.batch():
        art = run.add_artifact(
            "student", STUDENT_FILE, stage="distill", parent="torch", format="torch", lossy=True, config=asdict(cfg),
            extra={"params": record["student_params"], "budget": cfg.budget.to_json()},
            model={"name": spec.name, "config": asdict(student_cfg)},
        )
        run.set_section("distillation", record)
        run.set_metrics("student", accuracy=distilled_acc, params=record["student_params"])
    return [art]


def student_speedup(run: Run) -> dict:
    """Per timed batch size: the teacher's fastest ONNX variant, the fastest student variant eligible for
    `selected`, and the speedup (select.branch_speedup for the `student` branch)."""
    from .select import branch_speedup

    return branch_speedup(run, "student")
