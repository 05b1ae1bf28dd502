"""Verify stage: parity over every pair of variants in the run.

Each variant is compared with its parent and with `torch` (the root). The rule follows the path
between them: all steps lossless -> tensor tolerances over the shape grid; any lossy step ->
task budget (agreement, accuracy drop) on the held-out test split. With device=cuda, every ONNX
variant is also compared CPU EP -> CUDA EP."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.data import Dataset
from ..errors import ConfigError
from ..core.parity import ParityReport, shape_grid, task_parity, tensor_parity
from ..runfolder import Run
from ..core.predictors import load_predictor, predict_batched


@dataclass(frozen=True)
class VerifyConfig:
    atol: float = 1e-4
    rtol: float = 1e-3
    max_accuracy_drop: float = 1.0     # points
    min_agreement: float = 0.99
    batches: tuple[int, ...] = (1, 7, 64)
    seq_lens: tuple[int, ...] | None = None
    device: str = "cpu"

    def __post_init__(self):
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0, got {self.max_accuracy_drop}")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"verify device must be cpu or cuda, got {self.device!r}")


def pairs(run: Run) -> list[tuple[str, str]]:
    """(reference, candidate) for every variant: its parent, and the root `torch` if different."""
    out = []
    for v in run.variants():
        chain = run.lineage(v)
        for ref in dict.fromkeys(chain[1:2] + chain[-1:]):
            if ref != v and run.has(ref):
                out.append((ref, v))
    return out


def _steps(run: Run, reference: str, candidate: str) -> list[str]:
    """The variants made on the way from `reference` to `candidate` (candidate first)."""
    chain = run.lineage(candidate)
    return chain[: chain.index(reference)] if reference in chain else chain


def path_is_lossy(run: Run, reference: str, candidate: str) -> bool:
    return any(run.artifact(v).lossy for v in _steps(run, reference, candidate))


def path_budget(run: Run, reference: str, candidate: str) -> dict:
    """The budget declared by the step nearest the reference (a student's 1.5-point budget against its
    teacher also covers the student's INT8 child when compared with the teacher); {} if none."""
    for v in reversed(_steps(run, reference, candidate)):
        budget = run.artifact(v).extra.get("budget")
        if budget:
            return budget
    return {}


def failures(reports: list[ParityReport]) -> list[ParityReport]:
    """Checks that make verify fail: everything that did not pass, except a missed selection gate."""
    return [r for r in reports if not r and not r.gate]


def verify(run: Run, cfg: VerifyConfig, ds: Dataset) -> list[ParityReport]:
    """Check every pair, record reports and per-variant test accuracy in the manifest."""
    spec, model_cfg = run.spec, run.model_config()
    fns = {v: load_predictor(run, v, device="cpu") for v in run.variants()}
    logits = {v: predict_batched(fn, ds.x_test) for v, fn in fns.items()}
    for v, lg in logits.items():
        run.set_metrics(v, accuracy=float((lg.argmax(1) == ds.y_test).mean()), save=False)
    grid = shape_grid(spec, model_cfg, cfg.batches, cfg.seq_lens)
    reports = []
    for ref, cand in pairs(run):
        if path_is_lossy(run, ref, cand):
            budget = path_budget(run, ref, cand)
            rep = task_parity(ref, cand, logits[ref], logits[cand], ds.y_test,
                              max_accuracy_drop=budget.get("max_accuracy_drop", cfg.max_accuracy_drop),
                              min_agreement=budget.get("min_agreement", cfg.min_agreement))
            rep.gate = bool(budget.get("gate"))
        else:
            rep = tensor_parity(ref, cand, fns[ref], fns[cand], grid, atol=cfg.atol, rtol=cfg.rtol,
                                output_names=spec.output_names)
        reports.append(rep)
    if cfg.device == "cuda":
        for v in run.variants():
            if run.artifact(v).format != "onnx":
                continue
            gpu = load_predictor(run, v, device="cuda")
            name = f"{v}@cuda"
            if run.artifact(v).lossy:  # fp16 and int8 kernels differ between providers: judged by the budget
                rep = task_parity(v, name, logits[v], predict_batched(gpu, ds.x_test), ds.y_test,
                                  max_accuracy_drop=cfg.max_accuracy_drop, min_agreement=cfg.min_agreement)
            else:
                rep = tensor_parity(v, name, fns[v], gpu, grid, atol=cfg.atol, rtol=cfg.rtol,
                                    output_names=spec.output_names)
            reports.append(rep)
    for rep in reports:
        run.record_parity(rep.to_json(), save=False)
    run.save()
    return reports
