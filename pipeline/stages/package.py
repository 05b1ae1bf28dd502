"""Package stage: one variant of a run as a self-contained deployment folder for the edge.

    --target ort                             --target web
      model.ort                                index.html, app.js, preprocess.js   the page (pipeline/package/web)
      required_operators.config                config.json     input, normalization, labels, reference inputs
      manifest.json                            model.onnx      the variant, byte for byte
                                               ort/            onnxruntime-web's WASM build, vendored from npm
                                               manifest.json

Both manifests name the source run and variant, the sha256 of every file, the input/output names, dtypes
and dynamic axes, the normalization, the labels and the parity evidence; the run's manifest records the
package (`packages`) and its parity entry (candidate `ort` or `web`: a column of the report's matrix).

ORT format. ONNX Runtime's own converter (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, Fixed
style) bakes the graph optimizations into the file, because a minimal (reduced-operator) build cannot run
them at load. The level is **extended** by default (basic also works): the fusions it writes
(com.microsoft FusedConv, FusedGemm, SkipLayerNormalization, ...) are kernels of every ORT CPU build, x86 or
ARM, and the config names them, whereas layout/all would bake in NCHWc blocking chosen for this CPU's vector
width, the same trap as saving an `.onnx` at `all` (refused, as in `onnxpipe optimize`). Before anything is
written: the `.ort`, loaded as a minimal build runs it (no further optimization), matches the `.onnx` it came
from over the export shape grid within the tensor tolerance, and every node of the `.ort` graph (subgraphs
included), by domain, opset and op type, is listed in required_operators.config, as a build with
`--include_ops_by_config` needs (a node that is not is the "Failed to find kernel" of a reduced build).

Web. The page runs the model with onnxruntime-web's WASM execution provider on one thread (no cross-origin
isolation needed), normalizes with the run's recorded numbers by the formula of core/data.py `normalize`,
and reads images as `onnxpipe predict` does (pipeline/package/web/preprocess.js). `check=True` serves the
folder on 127.0.0.1, runs every input of the run's reference.npz in headless Chromium, one call each, and
compares with the CPU execution provider on the same file: the tensor tolerance for a lossless variant,
top-1 agreement by the budget recorded along a lossy variant's lineage. It also puts an image through the
page's preprocessing and Python's, times the page at batch 1 beside the native CPU provider, and
screenshots the page into the run folder for the report."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import sha256_file, write_bytes, write_json
from ..core.data import denormalize
from ..core.parity import ParityReport, compare_tensor, judge, shape_grid, tensor_parity
from ..core.policy import POLICY
from ..core.runtime import make_session
from ..errors import ArtifactError, ConfigError, ParityError
from ..runfolder import Run, library_versions
from .configs import PackageConfig

log = logging.getLogger("onnxpipe")

PACKAGE_MANIFEST = "manifest.json"
ORT_MODEL = "model.ort"
OPERATORS_CONFIG = "required_operators.config"
WEB_MODEL = "model.onnx"
SCREENSHOTS = "package_files"       # in the run folder: the web page's screenshot, for the report
PAGE_FILES = ("index.html", "app.js", "preprocess.js")
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}


@dataclass
class Package:
    """What `package` wrote: the folder and its manifest.json (`info`)."""

    out: Path
    info: dict

    @property
    def parity(self) -> dict | None:
        return self.info["parity"][0] if self.info["parity"] else None


# --- what the model takes and gives ---------------------------------------------------------------------

def io_record(model_file: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX file: name, dtype, dims (a name for a dynamic axis) and the dynamic axes."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ConfigError(f"{model_file} keeps weights in external files; a package ships one model file: fold them "
                          "in (onnx.save with save_as_external_data=False) and import it again")
    initializers = {t.name for t in model.graph.initializer}

    def rec(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        return {"name": v.name, "dtype": ONNX_DTYPES.get(t.elem_type, f"onnx:{t.elem_type}"), "dims": dims,
                "dynamic_axes": {str(i): d for i, d in enumerate(dims) if isinstance(d, str)}}

    return [rec(v) for v in model.graph.input if v.name not in initializers], [rec(v) for v in model.graph.output]


def load_reference(run: Run) -> dict | None:
    """reference.npz (sha256-checked) as {inputs, outputs, labels, variant}; None when the run has none."""
    ref = run.section("reference")
    if not ref:
        return None
    path = run.checked_file(ref["path"], ref["sha256"], what="reference file",
                            remake=f"run `onnxpipe export {run.root}` again to record it")
    try:
        with np.load(path, allow_pickle=False) as z:
            # one model input: "inputs" (schema 1), or the one "input:<name>" array of newer run folders
            named = [k for k in z.files if k.startswith("input:")]
            if "inputs" not in z.files and len(named) != 1:
                raise ConfigError(f"{path} holds {len(named)} model inputs; packages take models with one input")
            return {"inputs": z["inputs"] if "inputs" in z.files else z[named[0]], "outputs": z["outputs"],
                    "labels": z["labels"] if "labels" in z.files else None, "variant": ref.get("variant", "torch")}
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"reference file {path} cannot be read ({e}); run `onnxpipe export {run.root}` again") from None


def _labels(run: Run, variant: str, outputs: list[dict]) -> list[str]:
    classes = getattr(run.model_config_of(variant), "num_classes", None) or (run.dataset_info or {}).get("num_classes")
    if not classes:
        last = outputs[0]["dims"][-1] if outputs and outputs[0]["dims"] else None
        classes = last if isinstance(last, int) else 0
    return [str(i) for i in range(int(classes))]


def _one_row(run: Run, variant: str, ref: dict | None) -> list[np.ndarray]:
    """Batch 1 for the memory probe: the first reference input, else a random one of the trained shape."""
    if ref is not None:
        return [np.ascontiguousarray(ref["inputs"][:1])]
    spec, cfg = run.spec_of(variant), run.model_config_of(variant)
    example = spec.example_inputs(cfg, batch=1)
    return [np.ascontiguousarray(t.numpy()) for t in (example.values() if isinstance(example, dict) else example)]


# --- the ORT format -----------------------------------------------------------------------------------

def convert_to_ort(src: Path, workdir: Path, *, level: str, type_reduction: bool) -> tuple[Path, Path]:
    """ONNX Runtime's converter on `src` in a child process (a native crash stays there); (model.ort, config)."""
    work = workdir / "convert"
    work.mkdir()
    model = work / "model.onnx"
    shutil.copyfile(src, model)
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(model), "--output_dir",
           str(work / "out"), "--optimization_style", "Fixed", *(["--enable_type_reduction"] if type_reduction else [])]
    env = {**os.environ, "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": level}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"ONNX Runtime's ORT-format converter did not finish on {src} in 600 s") from None
    orts, configs = sorted((work / "out").glob("*.ort")), sorted((work / "out").glob("*.config"))
    if done.returncode != 0 or len(orts) != 1 or len(configs) != 1:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise ArtifactError(f"ONNX Runtime's ORT-format converter failed on {src}: {lines[-1][:400]}")
    return orts[0], configs[0]


def graph_operators(ort_file: Path) -> set[tuple[str, int, str]]:
    """(domain, opset, op type) of every node of an ORT-format model, subgraphs included, read from the file."""
    from onnxruntime.tools.ort_format_model import OrtFormatModelProcessor

    found: dict = {}
    try:
        OrtFormatModelProcessor(str(ort_file), found, None).process()
    except RuntimeError as e:
        raise ArtifactError(f"{ort_file} is not an ORT-format model: {e}") from None
    return {(d, int(opset), op) for d, per in found.items() for opset, ops in per.items() for op in ops}


def config_operators(config_file: Path) -> set[tuple[str, int, str]]:
    """(domain, opset, op type) that a reduced build made from `config_file` includes (ORT's own parser)."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    try:
        required, _ = parse_config(str(config_file), enable_type_reduction=False)
    except Exception as e:  # the parser raises plain RuntimeError/ValueError with the bad line
        raise ArtifactError(f"{config_file} is not a valid reduced-build operator config: {e}") from None
    if required is None:  # "!no_ops_specified_means_all_ops_are_required" with no ops: a full build
        return set()
    return {(d, int(opset), op) for d, per in required.items() for opset, ops in per.items() for op in ops}


def missing_operators(ort_file: Path, config_file: Path) -> list[str]:
    """Nodes of the .ort graph that a build from the config would have no kernel for ("domain;opset;Op")."""
    listed = config_operators(config_file)
    return sorted(f"{d};{opset};{op}" for d, opset, op in graph_operators(ort_file) - listed)


def check_operators(ort_file: Path, config_file: Path) -> dict:
    """Every node's op type, domain and opset listed in the config, or an ArtifactError naming the missing ones."""
    missing = missing_operators(ort_file, config_file)
    if missing:
        raise ArtifactError(f"{config_file.name} does not list {len(missing)} operator(s) that {ort_file.name} uses: "
                            f"{', '.join(missing)}; a reduced ONNX Runtime built from it would fail to load the model "
                            "(\"Failed to find kernel\"): regenerate the config from this .ort (onnxpipe package does)")
    ops = graph_operators(ort_file)
    return {"nodes_checked": True, "operators": sorted(f"{d};{opset};{op}" for d, opset, op in ops),
            "count": len(ops), "domains": sorted({d for d, _, _ in ops})}


def _tidy_config(config: Path, dest: Path, run: Run, variant: str) -> None:
    """The converter's config with its comment naming the package's file instead of a temporary path."""
    lines = [line for line in config.read_text().splitlines() if not line.startswith("# - ")]
    body = [line for line in lines if not line.startswith("#")]
    head = [f"# Generated by ONNX Runtime's convert_onnx_models_to_ort from {ORT_MODEL}",
            f"# (onnxpipe package of run {run.root.resolve()}, variant {variant}). Build a reduced ONNX Runtime with",
            f"#   ./build.sh --minimal_build --include_ops_by_config {OPERATORS_CONFIG} "
            "--enable_reduced_operator_type_support ..."]
    write_bytes(dest, ("\n".join(head + body) + "\n").encode())


def _build_ort(run: Run, variant: str, src: Path, cfg: PackageConfig, stage: Path, work: Path, ref) -> dict:
    from ..core.memprobe import measure_file_in_fresh_process

    converted, config = convert_to_ort(src, work, level=cfg.ort_level, type_reduction=cfg.type_reduction)
    shutil.copyfile(converted, stage / ORT_MODEL)
    _tidy_config(config, stage / OPERATORS_CONFIG, run, variant)

    # The proof, before the package is written: the .ort as a minimal build runs it (no further optimization)
    # against the .onnx as the run's sessions load it, over the export grid.
    spec, model_cfg = run.spec_of(variant), run.model_config_of(variant)
    onnx_fn = make_session(src, device="cpu", threads=cfg.threads)
    ort_fn = make_session(stage / ORT_MODEL, device="cpu", threads=cfg.threads, opt_level="disable")
    report = tensor_parity(variant, "ort", onnx_fn, ort_fn, shape_grid(spec, model_cfg, cfg.batches, cfg.seq_lens),
                           atol=cfg.atol, rtol=cfg.rtol, output_names=spec.output_names)
    report.notes.append(f"{ORT_MODEL} (level {cfg.ort_level}, loaded without further optimization, as a minimal build "
                        f"runs it) vs {run.artifact(variant).path} (CPU EP, level all)")
    entry = {**report.to_json(), "target": "ort", "variant": variant}
    if not report:
        run.record_parity(entry)
        raise ParityError(report)
    operators = check_operators(stage / ORT_MODEL, stage / OPERATORS_CONFIG)
    row = _one_row(run, variant, ref)
    memory = {"ort": measure_file_in_fresh_process(stage / ORT_MODEL, row, threads=cfg.threads, tmp=work,
                                                   opt_level="disable"),
              "onnx": measure_file_in_fresh_process(src, row, threads=cfg.threads, tmp=work)}
    return {"model": {"file": ORT_MODEL, "format": "ort", "optimization_level": cfg.ort_level,
                      "optimization_style": "Fixed", "type_reduction": cfg.type_reduction,
                      "why_this_level": "extended fusions are kernels of every ORT CPU build (x86 and ARM) and are "
                                        "listed in the config; layout/all would bake in NCHWc layouts for this CPU"},
            "operators": {**operators, "config": OPERATORS_CONFIG}, "memory": memory, "parity": [entry]}


# --- the web page ---------------------------------------------------------------------------------------

def _page_config(run: Run, variant: str, cfg: PackageConfig, inputs, outputs, labels, ref, model_bytes: int) -> dict:
    from .predict import NATIVE_SIZE, model_grid

    ds = run.dataset_info or {}
    shape = [d for d in inputs[0]["dims"][1:]]
    if ref is not None:
        shape = list(ref["inputs"].shape[1:])
    image = None
    if ds and inputs[0]["dtype"] == "float32":
        try:
            image = {"grid": list(model_grid(run)), "native": NATIVE_SIZE.get(ds.get("source", "")),
                     "layout": ds.get("layout", "nchw")}
        except Exception as e:  # a DataError: this model does not read images (token ids, other shapes)
            log.info("web package: no drawing pad (%s)", e)
    examples = []
    if ref is not None:
        for i in range(min(cfg.examples, len(ref["inputs"]))):
            label = int(ref["labels"][i]) if ref["labels"] is not None else int(np.argmax(ref["outputs"][i]))
            examples.append({"label": label, "input": [float(v) for v in ref["inputs"][i].ravel()]})
    return {"model": WEB_MODEL, "model_bytes": model_bytes, "model_name": run.model_name, "variant": variant,
            "source_run": str(run.root), "family": ds.get("family", run.spec_of(variant).family),
            "inputs": [{**inputs[0], "shape": shape}], "outputs": outputs,
            "normalization": ds.get("normalization") or {"scale": 1.0, "mean": 0.0, "std": 1.0},
            "normalization_rule": "(x * scale - mean) / std in float32, as onnxpipe.core.data.normalize",
            "image": image, "labels": labels, "examples": examples,
            "ort_web": {"version": cfg.ort_web_version, "threads": cfg.threads, "execution_provider": "wasm"}}


def _test_image(ref: dict, run: Run, path: Path) -> bool:
    """A PNG made from the first reference input (dark on light and tinted, to exercise the inversion and the
    luma formula; larger than the model grid, to exercise both resizes); False when the model reads no images."""
    from PIL import Image

    from .predict import model_grid

    try:
        gh, gw = model_grid(run)
    except Exception:  # a DataError: no image path for this model
        return False
    unit = np.clip(denormalize(ref["inputs"][0].reshape(gh, gw), run.dataset_info["normalization"]), 0.0, 1.0)
    big = np.kron(unit, np.ones((4, 4)))                     # 4x the grid, blocky like a scan
    ink = (255 * (1.0 - big)).astype(np.uint8)              # dark strokes on paper
    rgb = np.stack([ink, np.minimum(ink.astype(int) + 20, 255).astype(np.uint8), ink], axis=-1)
    Image.fromarray(rgb, mode="RGB").save(path)
    return True


def check_web(run: Run, variant: str, folder: Path, cfg: PackageConfig, ref: dict | None, modules: Path,
              work: Path) -> dict:
    """Run every reference input in headless Chromium and judge the page against the CPU execution provider."""
    from ..core.timing import time_predictors
    from .predict import load_inputs
    from .web import CHECK_PREFIX, chromium_version, drive_page, serve

    if ref is None:
        raise ConfigError(f"--check runs the run's reference inputs in the browser, and run {run.root} has none "
                          f"(reference.npz); `onnxpipe export {run.root}` (or an import with --data) records them")
    rows = np.ascontiguousarray(ref["inputs"])
    row_dims = list(rows.shape[1:])
    native = make_session(folder / WEB_MODEL, device="cpu", threads=cfg.threads)
    cpu_out = np.concatenate([native(rows[i:i + 1]) for i in range(len(rows))])
    private = work / "check"
    private.mkdir()
    has_image = run.dataset_info is not None and _test_image(ref, run, private / "digit.png")
    with serve(folder, private) as base:
        job = {"url": base + "index.html", "executable": cfg.chromium, "row_dims": row_dims,
               "rows": [[float(v) for v in r.ravel()] for r in rows],
               "bench": {"n": cfg.bench_calls, "warmup": 5}, "screenshot": str(private / "page.png"),
               "preprocess": [{"name": "digit.png", "url": base + CHECK_PREFIX.lstrip("/") + "digit.png"}]
               if has_image else []}
        result = drive_page(modules, job, private, timeout=cfg.timeout_s)
    outside = [u for u in result["requests"] if not u.startswith(base) and not u.startswith("data:")]
    if outside:
        raise ArtifactError(f"the page fetched {len(outside)} resource(s) from outside its folder ({outside[0]}, ...): "
                            "a web package must load nothing from the network at run time")
    web_out = np.asarray(result["outputs"], np.float32).reshape(cpu_out.shape)
    # The rule follows the ONNX steps that made this graph: the browser runs the same file, so only a lossy ONNX
    # step (INT8, FP16: kernels that differ between runtimes) is judged by a budget; an FP32 export of a
    # student is held to the tensor tolerance like any FP32 graph.
    chain = run.lineage(variant)
    onnx_steps = [v for v in chain if run.artifact(v).format == "onnx"]
    onnx_root = onnx_steps[-1]
    out_name = run.spec_of(variant).output_names[0]
    if any(run.artifact(v).lossy for v in onnx_steps):
        # the budget recorded along the lineage from the FP32 graph (an INT8 child's own, e.g. 0.99 agreement)
        budget = POLICY.budget_between(run, onnx_root, variant)
        labels = ref["labels"] if ref["labels"] is not None else cpu_out.argmax(1)
        report = judge(budget, variant, "web", cpu_out, web_out, labels)
        report.gate = False  # the browser must reproduce the variant: a miss is a failure, not a selection gate
    else:
        report = ParityReport(variant, "web", "tensor", atol=cfg.atol, rtol=cfg.rtol)
        report.checks.append(compare_tensor(cpu_out, web_out, output=out_name, shape=[1, *row_dims],
                                            atol=cfg.atol, rtol=cfg.rtol))
    report.notes.append(f"{len(rows)} reference inputs, one call each, onnxruntime-web {cfg.ort_web_version} WASM "
                        f"({cfg.threads} thread) in {chromium_version(cfg.chromium)} vs the CPU execution provider")
    timed = time_predictors({"native": native}, {1: [rows[:1]]}, warmup=5, runs=cfg.bench_calls, block=1)[1]["native"]
    evidence = {"browser": chromium_version(cfg.chromium), "user_agent": result["info"]["userAgent"],
                "execution_provider": "wasm", "wasm_threads": result["info"]["wasmThreads"],
                "cross_origin_isolated": result["info"]["crossOriginIsolated"],
                "rows": len(rows), "requests": len(result["requests"]), "offline": True,
                "page_errors": result["errors"], "drawn_on_pad": result.get("drawn"),
                "latency_b1": {"browser_wasm_ms": result["bench"]["median_ms"], "browser_p90_ms": result["bench"]["p90_ms"],
                               "native_cpu_ms": timed.p50, "native_p90_ms": timed.p90, "calls": cfg.bench_calls,
                               "threads": cfg.threads,
                               "ratio": result["bench"]["median_ms"] / timed.p50 if timed.p50 > 0 else None}}
    if has_image:
        specs = run.spec_of(variant).input_specs(run.model_config_of(variant))
        want = load_inputs(run, private / "digit.png", specs).first.reshape(-1)
        got = np.asarray(result["preprocess"]["digit.png"], np.float32)
        diff = float(np.max(np.abs(want - got))) if got.shape == want.shape else float("inf")
        evidence["preprocessing"] = {"image": "a 4x-upscaled, dark-on-light, tinted reference digit",
                                     "max_abs_vs_python": diff, "passed": diff <= cfg.atol}
        if diff > cfg.atol:
            report.notes.append(f"the page's image preprocessing differs from onnxpipe predict's by {diff:.3g} "
                                f"(> {cfg.atol:g})")
    entry = {**report.to_json(), "target": "web", "variant": variant, "browser": evidence["browser"],
             "execution_provider": "wasm"}
    if has_image:
        entry["passed"] = bool(entry["passed"] and evidence["preprocessing"]["passed"])
    evidence["screenshot_file"] = private / "page.png"
    return {"entry": entry, "report": report, "evidence": evidence}


def _build_web(run: Run, variant: str, src: Path, cfg: PackageConfig, stage: Path, work: Path, ref,
               inputs, outputs, labels) -> dict:
    from .web import WEB_ASSETS, npm_cache, npm_modules, require_chromium, vendor_ort_web

    if cfg.check:
        require_chromium(cfg.chromium)
    wanted = {"onnxruntime-web": cfg.ort_web_version}
    if cfg.check:
        wanted["playwright-core"] = cfg.playwright_version
    modules = npm_modules(npm_cache(cfg.npm_cache), wanted)
    shutil.copyfile(src, stage / WEB_MODEL)
    vendored = vendor_ort_web(modules, stage / "ort")
    for name in PAGE_FILES:
        shutil.copyfile(WEB_ASSETS / name, stage / name)
    page = _page_config(run, variant, cfg, inputs, outputs, labels, ref, (stage / WEB_MODEL).stat().st_size)
    write_json(stage / "config.json", page)
    record = {"model": {"file": WEB_MODEL, "format": "onnx"},
              "onnxruntime_web": {"version": vendored["version"], "license": vendored["license"],
                                  "files": {f"ort/{k}": f"onnxruntime-web/{v}" for k, v in vendored["files"].items()},
                                  "from": "the npm registry, installed with npm at package time",
                                  "execution_provider": "wasm", "threads": cfg.threads},
              "parity": [], "checked_in_browser": False}
    if not cfg.check:
        return record
    checked = check_web(run, variant, stage, cfg, ref, modules, work)
    shot = checked["evidence"].pop("screenshot_file")
    rel = f"{SCREENSHOTS}/web-{variant}.png"
    write_bytes(run.file(rel, what="screenshot"), shot.read_bytes())
    checked["evidence"]["screenshot"] = rel
    if not checked["entry"]["passed"]:
        run.record_parity({**checked["entry"]})
        raise ParityError(checked["report"]) if not checked["report"] else ArtifactError(
            "the page's image preprocessing does not match onnxpipe predict's: " + "; ".join(checked["report"].notes))
    record.update(parity=[checked["entry"]], checked_in_browser=True, browser=checked["evidence"])
    return record


# --- the stage ------------------------------------------------------------------------------------------

def _is_package(folder: Path) -> bool:
    try:
        m = json.loads((folder / PACKAGE_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("tool") == "onnxpipe" and m.get("kind") == "package"


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for the package")
    if out.is_dir() and any(out.iterdir()):
        if not _is_package(out):
            raise ConfigError(f"refusing to write into {out}: it holds files and is not an onnxpipe package "
                              "(no package manifest.json); choose an empty or new folder")
        if not force:
            raise ConfigError(f"{out} already holds an onnxpipe package; pass --force to replace it")


def _files(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != PACKAGE_MANIFEST}


def package(run: Run, cfg: PackageConfig, out: str | Path) -> Package:
    """Write the package of `cfg.variant` (default: the selected one) for `cfg.target` into `out`."""
    out = Path(out)
    variant = cfg.variant or run.selected
    if not variant:
        raise ConfigError(f"run {run.root} has no selected variant; pass --variant ({', '.join(run.variants())})")
    art = run.artifact(variant)
    if art.format != "onnx":
        onnx = [v for v in run.variants() if run.artifact(v).format == "onnx"]
        raise ConfigError(f"variant {variant!r} is a {art.format} model; package an ONNX variant "
                          f"({', '.join(onnx) or 'none yet: run `onnxpipe export`'})")
    _prepare_out(out, cfg.force)
    src = run.path(variant)  # sha256-checked
    inputs, outputs = io_record(src)
    if len(inputs) != 1:
        raise ConfigError(f"variant {variant!r} takes {len(inputs)} inputs; packages take models with one input")
    ref = load_reference(run)
    labels = _labels(run, variant, outputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="onnxpipe-package-") as tmp:
            work = Path(tmp)
            if cfg.target == "ort":
                built = _build_ort(run, variant, src, cfg, stage, work, ref)
            else:
                built = _build_web(run, variant, src, cfg, stage, work, ref, inputs, outputs, labels)
        files = _files(stage)
        versions = library_versions()
        if cfg.target == "web":
            versions["onnxruntime-web"] = cfg.ort_web_version
        manifest = {
            "tool": "onnxpipe", "kind": "package", "schema": 1, "target": cfg.target,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"run": str(run.root.resolve()), "model": run.model_name, "variant": variant,
                       "sha256": art.sha256, "parent": art.parent, "lossy": art.lossy, "stage": art.stage},
            "versions": versions, "inputs": inputs, "outputs": outputs,
            "normalization": (run.dataset_info or {}).get("normalization"), "labels": labels,
            **built, "bytes": sum(f["bytes"] for f in files.values()), "files": files,
            "settings": asdict(cfg),
        }
        write_json(stage / PACKAGE_MANIFEST, manifest)
        for p in [stage, *stage.rglob("*")]:  # temporary files and folders are private; a package is for serving
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        _replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    _record(run, cfg, out, manifest)
    return Package(out, manifest)


def _replace(stage: Path, out: Path) -> None:
    """Put the finished folder in place of `out` (an empty folder or an earlier package: checked before)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _record(run: Run, cfg: PackageConfig, out: Path, m: dict) -> None:
    variant = m["source"]["variant"]
    summary = {"target": cfg.target, "variant": variant, "out": str(out.resolve()), "created": m["created"],
               "bytes": m["bytes"], "files": len(m["files"]), "parity": [p.get("passed") for p in m["parity"]]}
    if cfg.target == "ort":
        summary.update(model_bytes=m["files"][ORT_MODEL]["bytes"], level=m["model"]["optimization_level"],
                       operators=m["operators"]["count"],
                       peak_rss_mb={k: v["peak_rss_mb"] for k, v in m["memory"].items()})
    else:
        summary.update(model_bytes=m["files"][WEB_MODEL]["bytes"], checked_in_browser=m["checked_in_browser"],
                       onnxruntime_web=m["onnxruntime_web"]["version"])
        if m["checked_in_browser"]:
            b = m["browser"]
            summary.update(browser=b["browser"], latency_b1=b["latency_b1"], screenshot=b["screenshot"],
                           preprocessing=b.get("preprocessing"))
    with run.batch():
        run.update_section("packages", **{f"{cfg.target}:{variant}": summary})
        if m["parity"]:
            run.record_parity(*m["parity"])
