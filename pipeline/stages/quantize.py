"""Quantize stage: INT8 (dynamic, static QDQ) and FP16 variants of an FP32 ONNX variant, each held to
an accuracy budget against its parent.

    int8_dynamic  weights INT8 offline, activations quantized at run time (MatMul, Conv, LSTM; Gemm
                  heads become MatMul first). No calibration.
    int8_static   QDQ format, activation ranges calibrated on the training split only (never test data):
                  minmax | entropy | percentile, per-tensor or per-channel weights, U8S8 by default.
    fp16          weights and compute in float16 with float32 inputs/outputs kept (keep_io_types): a GPU
                  deployment format; on the CPU provider ORT casts back, so it is checked here for parity.

`quant_pre_process` (shape inference + basic optimization) runs first: the LSTM needs it to become
DynamicQuantizeLSTM. It fails on some Transformer graphs ("Incomplete symbolic shape inference"); then it
is retried without symbolic shape inference (the documented fallback). If both fail, the failure is
printed and recorded, and the mode is built from the graph as exported. A build over budget is rebuilt
with its most sensitive nodes in FP32 (pipeline/stages/sensitivity.py). Each kept variant is recorded
the moment it is complete."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..core.data import Dataset, Rows
from ..core.isolation import NativeCrash, NativeProbe
from ..core.onnxgraph import COMPUTE_OPS, INTEGER_KERNELS
from ..core.parity import judge
from ..core.predictors import predict_batched
from ..core.runtime import make_session, ort_log_severity
from ..errors import ArtifactError, DataError
from ..runfolder import Artifact, Run
from .attention import fold_file
from .configs import QuantizeConfig
from .export import onnx_opset
from .sensitivity import fit_budget, node_errors

log = logging.getLogger("onnxpipe")

VARIANTS = {"dynamic": "int8_dynamic", "static": "int8_static", "fp16": "fp16"}

# What each mode quantizes, per model family. Dynamic Conv (ConvInteger) is built so that selection can
# show it is slow on CPUs; QDQ keeps Relu/MaxPool/Reshape between convs in INT8 so the chain stays integer.
DYNAMIC_OPS = {"image": ["Conv", "MatMul"], "sequence": ["MatMul", "LSTM"]}
STATIC_OPS = {"image": ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Reshape", "Flatten"],
              "sequence": ["MatMul", "Gemm"]}
# Sequence models feed matmul outputs to float ops (bias Add, LayerNorm, GELU): leaving those outputs
# float lets ORT run MatMulIntegerToFloat instead of requantizing (measured here: as fast or faster,
# and closer to FP32). Image models keep Conv outputs INT8 so the next Conv reads INT8 directly.
STATIC_FLOAT_OUTPUTS = {"image": [], "sequence": ["MatMul", "Gemm"]}
CALIB_BATCH = 32
SENSITIVITY_SAMPLES = 64


def variant_name(source: str, mode: str) -> str:
    """onnx -> int8_dynamic / int8_static / fp16; student_onnx -> student_int8_dynamic, ..."""
    base = VARIANTS[mode]
    return base if source == "onnx" else f"{source.removesuffix('_onnx')}_{base}"


# --- helpers ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantization tools log advice (not actionable here) on the root logger and ORT's own log;
    both levels are restored afterwards."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with ort_log_severity(3), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _working_dir(path: Path):
    """quant_pre_process leaves stray files in the working directory: run it in a temporary one."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def preprocess(src: Path, workdir: Path) -> tuple[Path, str]:
    """quant_pre_process with the Transformer fallback. Returns (model to quantize, what was done).

    Paths are resolved *before* changing into the temporary folder: a relative run folder (the default
    exports/<model>) would otherwise point into that folder and every pre-processing would fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(src).resolve(), (Path(workdir) / "preprocessed.onnx").resolve()
    failures = []
    for how, kwargs in (("full", {}), ("skip_symbolic_shape", {"skip_symbolic_shape": True})):
        try:
            with _working_dir(workdir):
                quant_pre_process(str(src), str(out), **kwargs)
            return out, how if not failures else f"{how} (full: {failures[0]})"
        except Exception as e:  # ORT raises bare Exception("Incomplete symbolic shape inference") and others
            failures.append(str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
    what = "failed: " + "; ".join(failures)
    log.warning("quant_pre_process %s; quantizing the graph as exported (an LSTM then stays float)", what)
    return src, what


def exclusion_candidates(float_model: Path, mode: str, family: str) -> list[str]:
    """Names of the float graph's nodes that this mode turns lossy (those worth keeping in FP32)."""
    import onnx

    ops = set(COMPUTE_OPS)
    if mode == "dynamic":
        ops &= set(DYNAMIC_OPS[family]) | ({"Gemm"} if "MatMul" in DYNAMIC_OPS[family] else set())
    elif mode == "static":
        ops &= set(STATIC_OPS[family])
    model = onnx.load(str(float_model), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in ops and n.name]


def count_int8_nodes(path: Path) -> int:
    """Nodes that compute in INT8: integer kernels, or compute ops fed by DequantizeLinear (QDQ)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in model.graph.node
               if n.op_type in INTEGER_KERNELS or (n.op_type in COMPUTE_OPS and any(i in dq_out for i in n.input)))


def count_fp16_initializers(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)


def input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def calibration_samples(ds: Dataset, n: int, seed: int) -> tuple[Rows, np.ndarray]:
    """A seeded subset of the *training* split (never validation or test). Returns (samples, indices)."""
    if len(ds.x_train) == 0:
        raise DataError("static quantization needs calibration data, and the training split is empty")
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds.x_train))[: min(n, len(ds.x_train))])
    return ds.x_train[idx], idx


def _reader(x: Rows):
    """Calibration batches feeding every input by name (integer inputs too: ORT never quantizes them)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([dict(x[i:i + CALIB_BATCH].items()) for i in range(0, len(x), CALIB_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


# --- one mode -------------------------------------------------------------------------------------------

@dataclass
class ModeResult:
    variant: str
    mode: str
    artifact: Artifact | None = None
    reason: str = ""            # why no artifact was recorded
    crash: dict | None = None   # a native crash that refused it: {"how": "SIGSEGV", "step": ...}


def _builder(mode: str, cfg: QuantizeConfig, family: str, src: Path, pre: Path, workdir: Path, calib: Rows):
    """(float model the build starts from, build(excluded nodes) -> path)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    counter = iter(range(1_000))
    if mode == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        def build_fp16(excluded: list[str]) -> Path:
            out = workdir / f"fp16_{next(counter)}.onnx"
            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                             node_block_list=excluded or None)
            onnx.save(model, str(out))
            return out

        return src, build_fp16
    if mode == "dynamic":
        def build_dynamic(excluded: list[str]) -> Path:
            out = workdir / f"dynamic_{next(counter)}.onnx"
            # A Gemm named X is decomposed into X_MatMul + X_Add before quantization: exclude both names.
            quantize_dynamic(str(pre), str(out), op_types_to_quantize=DYNAMIC_OPS[family],
                             per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                             weight_type=_quant_type(cfg.weight_type),
                             nodes_to_exclude=[*excluded, *(f"{n}_MatMul" for n in excluded)],
                             extra_options={"MatMulConstBOnly": True})
            return out

        return pre, build_dynamic
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    cache = workdir / "calibration.json"       # ranges are computed once; exclusion retries reuse them

    def build_static(excluded: list[str]) -> Path:
        out = workdir / f"static_{next(counter)}.onnx"
        quantize_static(str(pre), str(out), _reader(calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=STATIC_OPS[family], per_channel=cfg.per_channel,
                        reduce_range=cfg.reduce_range, activation_type=_quant_type(cfg.activation_type),
                        weight_type=_quant_type(cfg.weight_type), calibrate_method=method,
                        nodes_to_exclude=excluded, calibration_cache_path=cache,
                        extra_options={"MatMulConstBOnly": True,
                                       "OpTypesToExcludeOutputQuantization": STATIC_FLOAT_OUTPUTS[family]})
        return out

    return pre, build_static


def _static_layout(cfg: QuantizeConfig, family: str, src: Path, pre: Path, workdir: Path, calib: Rows,
                   float_model: Path, build, probe: NativeProbe | None, variant: str = "int8_static"):
    """(float model, build, record): the all-INT8 build or the one with the input conv block in float,
    whichever ran faster here (pipeline/stages/int8_layout.py)."""
    from .int8_layout import ALL_INT8, INPUT_BLOCK_FLOAT, choose_layout, input_block_float_model, time_layouts

    alt_dir = workdir / INPUT_BLOCK_FLOAT
    alt_dir.mkdir()
    block = input_block_float_model(pre, alt_dir / "preprocessed.onnx")
    if not block:
        return float_model, build, {"chosen": ALL_INT8, "why": "the graph does not start with a Conv"}
    alt_float, alt_unchecked = _builder("static", cfg, family, src, alt_dir / "preprocessed.onnx", alt_dir, calib)

    def alt_build(excluded: list[str]) -> Path:
        path = alt_unchecked([*block, *excluded])
        if probe is not None:
            probe.check(path, step="opening the static build with the input block in float")
        return path

    builds = {ALL_INT8: build([]), INPUT_BLOCK_FLOAT: alt_build([])}
    timed = time_layouts(builds, calib)
    chosen, why = choose_layout(timed)
    log.info("%s: %s", variant, why)
    record = {"input_block": block, "timed_p50_ms": timed, "chosen": chosen, "why": why}
    chosen_float, chosen_build = (alt_float, alt_build) if chosen == INPUT_BLOCK_FLOAT else (float_model, build)

    def build_again_only_with_exclusions(excluded: list[str]) -> Path:
        # the build with nothing excluded was made (and probed) for the timing: fit_budget starts from it
        return builds[chosen] if not excluded else chosen_build(excluded)

    return chosen_float, build_again_only_with_exclusions, record


def quantize_mode(run: Run, mode: str, cfg: QuantizeConfig, ds: Dataset, *, source: str,
                  parent_logits: np.ndarray, workdir: Path, probe: NativeProbe | None = None) -> ModeResult:
    variant = variant_name(source, mode)
    src = run.path(source)
    family = run.spec_of(source).family
    names = input_names(src)
    if names != ds.x_test.names:
        raise DataError(f"{source} takes inputs {names} but the run's data gives {ds.x_test.names}")
    calib, calib_idx = calibration_samples(ds, cfg.calib_samples, cfg.seed)
    folds = fold_file(src, workdir / "folded.onnx")   # lossless; every mode starts from the leaner graph
    if folds:
        src = workdir / "folded.onnx"
    pre, how = (src, "not needed (fp16)") if mode == "fp16" else preprocess(src, workdir)
    float_model, unchecked_build = _builder(mode, cfg, family, src, pre, workdir, calib)

    def build(excluded: list[str]) -> Path:
        path = unchecked_build(excluded)
        if probe is not None:  # opened in a child first: a native crash refuses the variant, not the run
            probe.check(path, step=f"opening the {mode} build")
        return path

    layout = None
    if mode == "static" and family == "image" and cfg.layout_search:
        float_model, build, layout = _static_layout(cfg, family, src, pre, workdir, calib, float_model, build, probe,
                                                  variant)

    def judge_build(path: Path):
        logits = predict_batched(make_session(path, device="cpu"), ds.x_test)
        return judge(cfg.budget, source, variant, parent_logits, logits, ds.y_test)

    # Rank on training rows other than the calibration ones where there are any: the ranges fit the
    # calibration rows by construction, so errors there understate the clipping unseen inputs suffer.
    unseen = np.setdiff1d(np.arange(len(ds.x_train)), calib_idx)
    probe_rows = np.random.default_rng(cfg.seed + 1).permutation(unseen if len(unseen) else calib_idx)[:SENSITIVITY_SAMPLES]

    def rank(path: Path) -> list[dict]:
        x = ds.x_train[np.sort(probe_rows)]
        return node_errors(float_model, path, [x[i:i + CALIB_BATCH].arrays for i in range(0, len(x), CALIB_BATCH)],
                           candidates=exclusion_candidates(float_model, mode, family))

    try:
        fit = fit_budget(build, judge_build, rank, max_rounds=cfg.exclusion_rounds)
    except NativeCrash as e:
        log.warning("%s: %s; the variant is refused and the run goes on", variant, e)
        return ModeResult(variant, mode, reason=f"refused: {e}", crash={"how": e.how, "step": e.step})
    if not fit.fits:
        why = ("it only fits with every quantized node back in FP32 (nothing INT8 would be left)"
               if fit.exhausted and fit.report else fit.report.budget_line())
        return ModeResult(variant, mode, reason=f"over budget after {len(fit.attempts)} build(s): {why}")
    int8_nodes = count_int8_nodes(fit.path) if mode != "fp16" else None
    if mode != "fp16" and not int8_nodes:
        ops = DYNAMIC_OPS[family] if mode == "dynamic" else STATIC_OPS[family]
        return ModeResult(variant, mode, reason=f"nothing quantized: the graph has no {'/'.join(ops)} node "
                                                "that ONNX Runtime runs in INT8")
    out = run.root / f"{variant}.onnx"
    with atomic_path(out) as tmp:
        shutil.copyfile(fit.path, tmp)
    parent_bytes = run.artifact(source).bytes
    extra = {
        "budget": cfg.budget.to_json(),
        "preprocess": how,
        "attention_layout_folds": folds,
        "op_types": (DYNAMIC_OPS[family] if mode == "dynamic" else STATIC_OPS[family] if mode == "static" else []),
        "int8_nodes": int8_nodes,
        "fp16_initializers": count_fp16_initializers(out) if mode == "fp16" else None,
        "size_ratio": round(out.stat().st_size / parent_bytes, 4),
        "excluded_nodes": fit.excluded,
        "attempts": fit.attempts,
    }
    if layout is not None:
        extra["layout"] = layout
    if mode == "static":
        extra["calibration"] = {"split": "train", "samples": int(len(calib)), "method": cfg.calibration,
                                "seed": cfg.seed, "indices_sha": _digest(calib_idx)}
    rep = fit.report
    with run.batch():  # recorded the moment it is complete: a later kill leaves no unlisted file
        art = run.add_artifact(variant, out.name, stage="quantize", parent=source, lossy=True,
                               config=cfg.for_mode(mode), opset=onnx_opset(out),
                               extra={k: v for k, v in extra.items() if v is not None})
        run.record_parity(rep.to_json())
        run.set_metrics(variant, accuracy=rep.candidate_accuracy, agreement=rep.agreement,
                        accuracy_drop=rep.accuracy_drop, max_abs=rep.max_abs, cosine=rep.cosine,
                        mean_abs=rep.checks[0].mean_abs if rep.checks else None, size_ratio=extra["size_ratio"])
        run.update_section("quantize", **{variant: {"recorded": True}})
    return ModeResult(variant, mode, artifact=art)


def _digest(idx: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()[:16]


def quantize(run: Run, cfg: QuantizeConfig, ds: Dataset, *, source: str = "onnx") -> list[ModeResult]:
    """Build every mode of cfg.modes_to_build() from variant `source`; record the ones within budget."""
    art = run.artifact(source)
    if art.format != "onnx" or art.lossy:
        raise ArtifactError(f"quantize starts from an FP32 ONNX variant; {source!r} is "
                            f"{'lossy' if art.lossy else art.format}")
    if len(ds.x_test) == 0:
        raise DataError("the accuracy budget is measured on the test split, and it is empty")
    parent_logits = predict_batched(make_session(run.path(source), device="cpu"), ds.x_test)
    results = []
    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(NativeProbe()) if cfg.isolate else None
        for mode in cfg.modes_to_build():
            with tempfile.TemporaryDirectory(prefix="onnxpipe-quant-") as tmp:
                with _quiet_quantizer():
                    res = quantize_mode(run, mode, cfg, ds, source=source, parent_logits=parent_logits,
                                        workdir=Path(tmp), probe=probe)
            if res.artifact is None:
                record = {"recorded": False, "reason": res.reason, **({"crash": res.crash} if res.crash else {})}
                with run.batch():
                    run.remove_variant(res.variant, stage="quantize")  # a stale variant of an earlier run
                    run.update_section("quantize", **{res.variant: record})
            results.append(res)
    return results
