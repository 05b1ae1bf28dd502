"""`onnxpipe import MODEL.onnx`: a run folder around a model exported by any framework
(tf2onnx, Keras 3, JAX, skl2onnx, torch...), with `onnx` as the root variant.

Optimize, quantize, verify (against the imported model), bench, report and serve then work on it
as on an exported one. What the run knows about the model (inputs, dynamic axes, outputs, classes)
is read from the graph and kept in the manifest as "model_source" (kind "onnx").

External data (weights in files beside the graph) is read only from the model's own folder: a
location that is absolute, climbs out with "..", or resolves (through a link) outside that folder is
refused before any of it is read. Below 2 GiB the weights are folded into the run's model.onnx, so the
one sha256 in the manifest covers them; bigger models keep one data file, whose sha256 is recorded too.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ..atomic import atomic_path, sha256_file
from ..core.data import load_dataset
from ..core.parity import shape_grid
from ..core.policy import POLICY
from ..core.predictors import predict_batched
from ..core.runtime import make_session
from ..core.sources import imported_spec
from ..errors import ArtifactError, ConfigError, DataError
from ..runfolder import Run
from .export import write_reference

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INLINE_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB cap, with room for the graph itself
DTYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 9: "bool"}
BATCH_CHECK_ROWS = 7
# --- external data ----------------------------------------------------------------------------------------

def _all_tensors(graph):
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    from onnx import AttributeProto

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def external_data_files(model, folder: Path) -> list[Path]:
    """The files that `model`'s external tensors live in, each checked to lie inside `folder`."""
    from onnx import TensorProto

    base = folder.resolve()
    files: dict[Path, int] = {}
    for t in _all_tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        escapes = (not loc or os.path.isabs(loc) or PureWindowsPath(loc).is_absolute() or PureWindowsPath(loc).drive
                   or ".." in PurePosixPath(loc).parts or ".." in PureWindowsPath(loc).parts)
        target = (base / loc).resolve()
        if escapes or not target.is_relative_to(base):
            raise ArtifactError(
                f"refusing the model: tensor {t.name!r} points its external data at {loc!r}, outside the model's "
                f"folder {base}; external data must be a relative path inside that folder")
        if not target.is_file():
            raise ArtifactError(f"tensor {t.name!r} keeps its data in {loc!r}, which is not a file in {base}")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise ArtifactError(f"tensor {t.name!r} has external data offset {info.get('offset')!r} and length "
                                f"{info.get('length')!r}; both must be whole numbers of bytes (the file is damaged)") from None
        if offset < 0 or length < 0:
            raise ArtifactError(f"tensor {t.name!r} has a negative external data offset or length; the file is damaged")
        files[target] = max(files.get(target, 0), offset + length)
    for f, end in files.items():
        if end > f.stat().st_size:
            raise ArtifactError(f"external data file {f} holds {f.stat().st_size} bytes, the model reads up to {end}")
    return sorted(files)


# --- what the graph says ----------------------------------------------------------------------------------

def describe_graph(model, sample_shapes: dict[str, tuple[int, ...]] | None) -> dict:
    """The model_source record: inputs (per-sample shape, dynamic axes, dtype, role, layout), outputs, family.

    A dynamic non-batch axis takes its size from the data's per-sample shape of that input (8 without data);
    every dynamic axis keeps its name, so the parity grid varies it."""
    from ..models.registry import guess_layout, guess_role

    init = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init]
    if not graph_inputs:
        raise ArtifactError("the model has no inputs")
    inputs = []
    for inp in graph_inputs:
        tt = inp.type.tensor_type
        if tt.elem_type not in DTYPES:
            raise ArtifactError(f"input {inp.name!r} has element type {tt.elem_type}; onnxpipe feeds "
                                f"{', '.join(sorted(set(DTYPES.values())))} tensors")
        dims = list(tt.shape.dim)
        if not dims:
            raise ArtifactError(f"input {inp.name!r} has no shape; onnxpipe needs (batch, ...) inputs")
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            raise ConfigError(
                f"input {inp.name!r} has a fixed batch size of {dims[0].dim_value}; onnxpipe needs a dynamic batch axis "
                "(re-export with it, e.g. torch dynamic_axes={'x': {0: 'batch'}}, tf2onnx/Keras input shape (None, ...))")
        given = (sample_shapes or {}).get(inp.name)
        dynamic, shape = {0: "batch"}, []
        for axis, d in enumerate(dims[1:], start=1):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
                continue
            shape.append(int(given[axis - 1]) if given is not None and axis - 1 < len(given) else 8)
            dynamic[axis] = d.dim_param or ("seq_len" if axis == 1 else f"{inp.name}_dim{axis}")
        dtype = DTYPES[tt.elem_type]
        role = guess_role(inp.name, dtype)
        record = {"name": inp.name, "shape": shape, "dynamic": dynamic, "dtype": dtype, "role": role}
        if role == "data" and len(shape) == 3:
            record["layout"] = guess_layout(tuple(shape))
        inputs.append(record)
    primary = next((i for i in inputs if i["role"] in ("data", "tokens")), inputs[0])
    if primary["role"] == "data" and len(primary["shape"]) == 3:
        family, layout = "image", primary["layout"]
    elif primary["role"] == "tokens" or len(primary["shape"]) == 2:
        family, layout = "sequence", None
    else:
        family, layout = "other", None
    return {"kind": "onnx", "inputs": inputs, "outputs": [o.name for o in model.graph.output],
            "family": family, "layout": layout}


# --- the import -------------------------------------------------------------------------------------------

def _load_graph(src: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not src.is_file():
        raise ConfigError(f"ONNX file {src} does not exist")
    try:
        return onnx.load(str(src), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise ArtifactError(f"{src} is not an ONNX model: {str(e).splitlines()[0][:200]}") from None


def _write_model(model, folder: Path) -> dict:
    """Save into `folder` as one file, or with one data file beside it when over the inline limit."""
    import onnx

    if model.ByteSize() < INLINE_LIMIT:
        with atomic_path(folder / ONNX_FILE) as tmp:
            onnx.save_model(model, str(tmp))
        return {}
    onnx.save_model(model, str(folder / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=0)
    return {"external_data": {"path": DATA_FILE, "sha256": sha256_file(folder / DATA_FILE)}}


def _check_batch_independence(session, spec, cfg) -> float:
    """Rows must not depend on their batch: row i alone == row i in a batch of 7 (catches baked-in batch sizes)."""
    x = [t.numpy() for t in spec.example_inputs(cfg, batch=BATCH_CHECK_ROWS).values()]
    try:
        full = session(*x)
        single = np.concatenate([session(*(a[i:i + 1] for a in x)) for i in range(BATCH_CHECK_ROWS)])
    except ArtifactError:
        raise
    except Exception as e:  # ORT raises its own Fail / InvalidArgument types
        raise ArtifactError(f"the model does not run with batches of 1 and {BATCH_CHECK_ROWS} although its batch axis "
                            f"is dynamic: {str(e).splitlines()[0][:300]}") from None
    if full.shape[0] != BATCH_CHECK_ROWS:
        raise ArtifactError(f"with a batch of {BATCH_CHECK_ROWS} the first output has shape {list(full.shape)}; "
                            "its axis 0 must follow the batch")
    err = float(np.max(np.abs(full - single))) if full.size else 0.0
    tol = POLICY.tensor
    if not err <= tol.atol + tol.rtol * float(np.max(np.abs(single), initial=0.0)):
        raise ArtifactError(f"a row's output changes with the batch it is in (max abs {err:.3g}): the graph mixes "
                            "rows (e.g. batch norm in training mode) or bakes in a batch size")
    return err


def import_onnx(model_file: str | Path, root: str | Path, *, data: str | None = None, seed: int = 0,
                limit: int | None = None, force: bool = False, name: str | None = None) -> Run:
    """Make run folder `root` around `model_file` (variant `onnx`, stage `import`), checked to load and run.

    With `data`, the test accuracy and reference.npz (serving self-test) are recorded. The folder is
    built beside `root` and renamed into place, so a failed import leaves nothing behind."""
    import onnx

    src = Path(model_file).expanduser()
    model = _load_graph(src)
    ext_files = external_data_files(model, src.parent)
    if ext_files:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(src.parent.resolve()))
    try:
        onnx.checker.check_model(model if model.ByteSize() < INLINE_LIMIT else str(src))
    except onnx.checker.ValidationError as e:
        raise ArtifactError(f"{src} fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not force:
            raise ConfigError(f"{root} already holds files; pass --force to replace it, or choose another folder with --run")
        if not (root / "manifest.json").is_file():
            raise ConfigError(f"refusing to replace {root}: it is not an onnxpipe run folder (no manifest.json)")
    staging = root.with_name(f".{root.name}.importing")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted import
    try:
        source = describe_graph(model, None)
        source.update(file=str(src.resolve()), sha256=sha256_file(src), opset=opset,
                      external_data_files=[str(f) for f in ext_files])
        run = Run.create(staging, name or src.stem, {}, None)
        run_name = run.model_name
        written = _write_model(model, staging)
        session = make_session(staging / ONNX_FILE, device="cpu")
        spec = imported_spec(run_name, source)
        first = session(*(t.numpy() for t in spec.example_inputs(spec.config_cls(), batch=2).values()))
        source["num_classes"] = int(first.shape[1]) if first.ndim == 2 else None

        ds = None
        if data:
            if source["family"] not in ("image", "sequence"):
                raise DataError(f"--data gives one image or sequence input per sample (images, feature sequences or "
                                f"token ids); {src.name} takes {[(i['name'], i['shape']) for i in source['inputs']]}")
            if source["num_classes"] is None:
                raise DataError(f"--data is for classifiers: {src.name}'s first output has shape {list(first.shape)}, "
                                "not (batch, classes)")
            ds = load_dataset(data, spec.input_specs(spec.config_cls()), num_classes=source["num_classes"], seed=seed,
                              limit=limit)
            for rec in source["inputs"]:
                got = ds.sample_shapes.get(rec["name"])
                fixed = [a for a in range(len(rec["shape"])) if a + 1 not in rec["dynamic"]]
                if got is not None and (len(got) != len(rec["shape"]) or any(got[a] != rec["shape"][a] for a in fixed)):
                    raise DataError(f"{src.name}: input {rec['name']!r} takes samples shaped {tuple(rec['shape'])}, the "
                                    f"data gives {got}")
            source.update(describe_graph(model, ds.sample_shapes))  # dynamic sizes from the data
            spec = imported_spec(run_name, source)

        batch_err = _check_batch_independence(session, spec, spec.config_cls())
        for inputs in shape_grid(spec, spec.config_cls()):  # every shape the parity checks will use runs
            session(*inputs)
        with run.batch():
            run.set_section("model_source", source)
            if ds is not None:
                run.set_section("dataset", ds.info)
            run.add_artifact("onnx", ONNX_FILE, stage="import", parent=None, format="onnx", opset=opset,
                             config={"source": str(src.resolve()), "data": data},
                             extra={"source_sha256": sha256_file(src), "producer": f"{model.producer_name} "
                                    f"{model.producer_version}".strip(), "batch_independence_max_abs": batch_err,
                                    **written})
            if ds is not None:
                logits = predict_batched(session, ds.x_test)
                run.set_metrics("onnx", accuracy=float((logits.argmax(1) == ds.y_test).mean()))
                write_reference(run, session, ds.x_test, ds.y_test, variant="onnx")
            run.set_selected("onnx")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)
    return Run.open(root)
