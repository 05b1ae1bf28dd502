"""Export stage: torch -> ONNX with the spec's names and dynamic axes, checked three ways:
onnx.checker (full), the declared dynamic dims still symbolic, and parity against PyTorch over a
grid of shapes. Writes variant `onnx` (model.onnx) and reference.npz (serving self-test)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, sha256_file
from ..core.data import Dataset, Rows
from ..core.parity import shape_grid, tensor_parity
from ..core.policy import POLICY
from ..core.predictors import load_predictor, load_torch_variant, predict_batched
from ..core.runtime import make_session
from ..errors import ExportError, ParityError
from ..runfolder import Artifact, Run
from .configs import ExportConfig

ONNX_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's progress lines and non-actionable warnings out of the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_module(module, spec, model_cfg, path: Path, opset: int) -> int:
    """torch.onnx.export (dynamo) of `module` to `path` (atomically). Returns the opset written.

    The inputs go in by name when forward takes them by name (models.takes_names), so a forward such as
    GPT-2's (input_ids, past_key_values, attention_mask, ...) gets each one right; every dynamic axis is
    declared by name (axes with one name vary together)."""
    import onnx
    import torch
    from torch.export import Dim

    from ..models import takes_names

    module = module.eval()
    specs = spec.input_specs(model_cfg)
    example = spec.example_inputs(model_cfg, batch=2)  # batch 2: sizes 0/1 would be specialized
    max_len = getattr(model_cfg, "max_len", 4096)
    dims: dict[str, object] = {}
    shapes: dict[str, dict] = {}
    for s in specs:
        axes = {}
        for ax, name in s.dynamic.items():
            if name not in dims:
                dims[name] = Dim(name, min=1, max=max_len if ax == 1 else 1 << 20)
            axes[ax] = dims[name]
        shapes[s.name] = axes
    by_name = takes_names(module, example)
    args, kwargs = ((), example) if by_name else (tuple(example.values()), None)
    dynamic_shapes = shapes if by_name else tuple(shapes.values())  # positional: a user's forward may name them otherwise
    _reset_exporter_state()
    with atomic_path(path) as tmp:
        try:
            with quiet_exporter():
                program = torch.onnx.export(
                    module, args, None, kwargs=kwargs, dynamo=True, opset_version=opset,
                    input_names=[s.name for s in specs], output_names=list(spec.output_names),
                    dynamic_shapes=dynamic_shapes, verbose=False,
                )
                program.save(str(tmp), external_data=False)
        except Exception as e:  # the exporter raises many internal types; report them as one
            raise ExportError(f"torch.onnx.export failed for {spec.name}: {str(e).splitlines()[0][:400]}") from e
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported graph fails onnx.checker: {str(e).splitlines()[0][:400]}") from None
        check_dynamic_dims(onnx.load(str(tmp), load_external_data=False), specs)
    return onnx_opset(path)


def _reset_exporter_state() -> None:
    """Undo process state that breaks a second dynamo export of an RNN.

    The exporter swaps in while-loop RNN kernels (which keep T dynamic) only for the capture, but the
    ops' dispatch caches keep the unrolled kernel from earlier calls, so a second LSTM/GRU export in
    one process would specialize T to the example length. torch._dynamo.reset() alone does not help."""
    import torch

    torch._dynamo.reset()
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input, torch.ops.aten.lstm.data, torch.ops.aten.gru.data):
        cache = getattr(op, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()


def onnx_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def check_dynamic_dims(model, specs) -> None:
    """Every axis the input specs declare dynamic must still be a symbolic dim in the ONNX inputs."""
    inputs = {i.name: i for i in model.graph.input}
    problems = []
    specs = specs.inputs if hasattr(specs, "inputs") else specs
    for s in specs:
        if s.name not in inputs:
            problems.append(f"input {s.name!r} is missing from the graph")
            continue
        dims = inputs[s.name].type.tensor_type.shape.dim
        for ax, name in s.dynamic.items():
            if ax >= len(dims) or not dims[ax].dim_param:
                fixed = dims[ax].dim_value if ax < len(dims) else "missing"
                problems.append(f"input {s.name!r} axis {ax} ({name}) is fixed to {fixed}")
    if problems:
        raise ExportError("exported graph lost its dynamic axes: " + "; ".join(problems)
                          + " (exporter trap: the graph would only accept the example shape)")


def export(run: Run, cfg: ExportConfig, data: Dataset | None = None, *, source: str = "torch",
           target: str = "onnx") -> list[Artifact]:
    """Export torch variant `source` to ONNX variant `target` and gate it on grid parity.

    With `data`, the root's export also writes reference.npz (test rows, labels, torch outputs)."""
    module, spec, model_cfg = load_torch_variant(run, source)
    opset = cfg.opset or spec.opset
    filename = ONNX_FILE if target == "onnx" else f"{target}.onnx"
    path = run.root / filename
    written = export_module(module, spec, model_cfg, path, opset)

    torch_fn = load_predictor(run, source)
    session = make_session(path, device="cpu")
    report = tensor_parity(source, target, torch_fn, session, shape_grid(spec, model_cfg, cfg.batches, cfg.seq_lens),
                           atol=cfg.atol, rtol=cfg.rtol, output_names=spec.output_names)
    if not report:
        path.unlink()
        raise ParityError(report)
    with run.batch():
        art = run.add_artifact(target, filename, stage="export", parent=source, config=asdict(cfg), opset=written,
                               extra={"requested_opset": opset})
        run.record_parity(report.to_json())
        if data is not None and run.root_variant(source) == source:
            write_reference(run, torch_fn, data.x_test, data.y_test, variant=source)
        run.set_selected(target, only_if_unset=True)  # the only deployable variant until compression chooses
    return [art]


def write_reference(run: Run, fn, inputs: Rows, labels: np.ndarray | None, variant: str = "torch") -> None:
    """Test rows (every input, as `input:<name>`), their labels and the root variant's outputs: the serving
    self-test replays these. POLICY.reference_rows rows (128): one disagreement moves agreement by under a point."""
    n = min(POLICY.reference_rows, len(inputs))
    rows = inputs[:n]
    arrays = {**rows.to_npz(), "outputs": predict_batched(fn, rows)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels[:n], np.int64)
    path = run.root / REFERENCE_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    run.set_section("reference", {"path": REFERENCE_FILE, "sha256": sha256_file(path), "variant": variant, "rows": n,
                                  "inputs": rows.names})
