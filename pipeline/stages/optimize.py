"""Optimize stage: ONNX Runtime's offline graph optimization, saved as a new variant (`onnx_opt`).

Levels (ORT): basic (constant folding, redundant-node removal), extended (fusions such as FusedConv,
FusedGemm, BiasGelu, SkipLayerNormalization, GELU, attention), layout/all (NCHWc layouts chosen for
*this* CPU's vector width). The saved file stays at a portable level (extended by default: any ORT
CPU build can run it); sessions still apply `all` when they load it, so the layout transforms are
redone for whatever CPU serves the model. Parity against the parent is checked like export: tensor
tolerances over the shape grid."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from ..atomic import atomic_path
from ..core.onnxgraph import ATTENTION_OPS, FUSED_OPS, bare, op_counts
from ..core.parity import shape_grid, tensor_parity
from ..core.runtime import make_session
from ..errors import ArtifactError, ParityError
from ..runfolder import Artifact, Run
from .attention import fold_file
from .configs import OptimizeConfig
from .export import onnx_opset


def fusion_summary(before: dict[str, int], after: dict[str, int]) -> dict:
    """What the optimizer changed: fused ops present afterwards, attention nodes, node totals."""
    fused = {op: n for op, n in after.items() if bare(op) in FUSED_OPS and n > before.get(op, 0)}
    return {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "fused_nodes": fused,
        "fused_total": sum(fused.values()),
        "attention_nodes": sum(n for op, n in after.items() if bare(op) in ATTENTION_OPS),
    }


def optimized_name(source: str) -> str:
    return "onnx_opt" if source == "onnx" else f"{source}_opt"


def optimize(run: Run, cfg: OptimizeConfig, data=None, *, source: str = "onnx",
             variant: str | None = None) -> list[Artifact]:
    """Optimize variant `source` offline at cfg.level into `variant` (default onnx_opt); gate on grid parity."""
    variant = variant or optimized_name(source)
    art = run.artifact(source)
    if art.format != "onnx":
        raise ArtifactError(f"optimize works on ONNX variants; {source!r} is a {art.format} artifact")
    src = run.path(source)
    out = run.root / f"{variant}.onnx"
    spec, model_cfg = run.spec_of(source), run.model_config_of(source)
    with tempfile.TemporaryDirectory(prefix="onnxpipe-opt-") as work, atomic_path(out) as tmp:
        start, folds = src, 0
        if cfg.fold_attention:
            folds = fold_file(src, Path(work) / "folded.onnx")
            start = Path(work) / "folded.onnx" if folds else src
        # ORT writes the graph it built at `level` to optimized_model_filepath when the session is created.
        make_session(start, device="cpu", opt_level=cfg.level, optimized_model_path=tmp)
        if tmp.stat().st_size == 0:
            raise ArtifactError(f"ONNX Runtime did not write an optimized model for {src}")
        reference = make_session(src, device="cpu", opt_level="disable")   # the graph as exported
        candidate = make_session(tmp, device="cpu", opt_level=cfg.load_level)
        report = tensor_parity(source, variant, reference, candidate,
                               shape_grid(spec, model_cfg, cfg.batches, cfg.seq_lens),
                               atol=cfg.atol, rtol=cfg.rtol, output_names=spec.output_names)
        if not report:
            raise ParityError(report)
        before, after = op_counts(src), op_counts(tmp)
        summary = fusion_summary(before, after)
        opset = onnx_opset(tmp)
    if getattr(model_cfg, "heads", 0) and summary["attention_nodes"] == 0:
        report.notes.append("the model has attention but the optimized graph has no Attention node: "
                            "attention runs as separate MatMul/Softmax nodes")
    extra = {"saved_level": cfg.level, "load_level": cfg.load_level, "attention_layout_folds": folds, **summary,
             "ops_before": before, "ops_after": after}
    with run.batch():
        result = run.add_artifact(variant, out.name, stage="optimize", parent=source, config=asdict(cfg),
                                  opset=opset, extra=extra)
        run.record_parity(report.to_json())
    return [result]
