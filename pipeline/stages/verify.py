"""Verify stage: parity over every pair of variants in the run.

Each variant is compared with its parent and with the root (`torch`, or `onnx` for an import). The rule
follows the path between them (pipeline/core/policy.py): all steps lossless -> tensor tolerances over
the shape grid, with each variant's own spec (a student of another model has other inputs); any lossy
step -> the budget recorded along the lineage (else the configured default) on the held-out test split.
With device=cuda, every ONNX variant is also compared CPU EP -> CUDA EP.

Without data (an import made without --data), the lossless checks run on generated inputs over the
shape grid and the checks that need labelled data are listed as not run."""
from __future__ import annotations

import logging

import numpy as np

from ..core.data import Dataset
from ..core.parity import ParityReport, judge, shape_grid, tensor_parity
from ..core.predictors import load_predictor, predict_batched
from ..core.policy import Budget
from ..runfolder import Run
from .configs import VerifyConfig

log = logging.getLogger("onnxpipe")


def pairs(run: Run) -> list[tuple[str, str]]:
    """(reference, candidate) for every variant: its parent, and the root if different."""
    out = []
    for v in run.variants():
        chain = run.lineage(v)
        for ref in dict.fromkeys(chain[1:2] + chain[-1:]):
            if ref != v and run.has(ref):
                out.append((ref, v))
    return out


def failures(reports: list[ParityReport]) -> list[ParityReport]:
    """Checks that make verify fail: everything that did not pass, except a missed selection gate."""
    return [r for r in reports if not r and not r.gate]


def verify(run: Run, cfg: VerifyConfig, ds: Dataset | None) -> list[ParityReport]:
    """Check every pair, record reports and per-variant test accuracy in the manifest.

    `ds` None: only the lossless pairs are checked (on generated inputs); lossy ones are skipped and said so."""
    fns = {v: load_predictor(run, v, device="cpu") for v in run.variants()}
    logits = {}
    if ds is not None:
        logits = {v: predict_batched(fn, ds.x_test) for v, fn in fns.items()}
    reports, skipped = [], []
    for ref, cand in pairs(run):
        if run.is_lossy(ref, cand):
            if ds is None:
                skipped.append(f"{ref} -> {cand}")
                continue
            recorded = run.budget_for(cand, ref)
            budget = Budget.from_json(recorded) if recorded else cfg.budget
            rep = judge(budget, ref, cand, logits[ref], logits[cand], ds.y_test)
        else:
            # The grid of the candidate's own network: a student of another model has its own inputs.
            grid = shape_grid(run.spec_of(cand), run.model_config_of(cand), cfg.batches, cfg.seq_lens)
            rep = tensor_parity(ref, cand, fns[ref], fns[cand], grid, atol=cfg.atol, rtol=cfg.rtol,
                                output_names=run.spec_of(cand).output_names)
        reports.append(rep)
    if cfg.device == "cuda":
        reports += _cuda_reports(run, cfg, ds, fns, logits)
    if skipped:
        log.warning("verify without data: %d lossy check(s) need labelled test data and were not run (%s); "
                    "import again with --data to run them", len(skipped), ", ".join(skipped))
    with run.batch():
        for v, lg in logits.items():
            run.set_metrics(v, accuracy=float((lg.argmax(1) == ds.y_test).mean()))
        run.record_parity(*(rep.to_json() for rep in reports))
        run.update_section("verify", skipped=skipped)
    return reports


def _cuda_reports(run: Run, cfg: VerifyConfig, ds: Dataset | None, fns: dict, logits: dict) -> list[ParityReport]:
    """Every ONNX variant CPU EP -> CUDA EP: tensor tolerance for lossless ones, the budget for lossy ones
    (fp16 and int8 kernels differ between providers)."""
    out = []
    for v in run.variants():
        art = run.artifact(v)
        if art.format != "onnx":
            continue
        gpu = load_predictor(run, v, device="cuda")
        name = f"{v}@cuda"
        if art.lossy:
            if ds is None:
                continue
            out.append(judge(cfg.budget, v, name, logits[v], predict_batched(gpu, ds.x_test), ds.y_test))
        else:
            grid = shape_grid(run.spec_of(v), run.model_config_of(v), cfg.batches, cfg.seq_lens)
            out.append(tensor_parity(v, name, fns[v], gpu, grid, atol=cfg.atol, rtol=cfg.rtol,
                                     output_names=run.spec_of(v).output_names))
    return out
