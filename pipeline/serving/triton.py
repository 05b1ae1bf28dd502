"""`onnxpipe export-triton`: a Triton Inference Server model repository, for users who outgrow one server.

    OUT_DIR/
      <name>/
        config.pbtxt        platform onnxruntime_onnx; inputs/outputs with dims (-1 = dynamic); dynamic batching
        1/model.onnx        the run's sha256-checked variant, byte for byte

With max_batch_size > 0 Triton's dims leave out the batch axis (Triton adds it), so the model's
first axis must be dynamic; a model with a fixed first axis is written with max_batch_size 0.

Settings (`recorded_triton`): TritonConfig's defaults, then the session setting `onnxpipe select`
measured fastest for the variant (its threads the ONNX Runtime backend's intra_op_thread_count, its
execution mode the backend's execution_mode), then what `onnxpipe tune` measured for this run
(`tuned_triton`: its workers become the instance count, its max batch the max_batch_size and the
preferred batch size, its max delay the queue delay, its threads the intra_op_thread_count), then
the flags given. tests/test_triton_export.py parses every written file with Triton's own
ModelConfig protobuf schema (the model_config_pb2 that tritonclient ships).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import atomic_path, write_bytes
from ..errors import ArtifactError, ConfigError
from ..runfolder import Run
from .config import KINDS, TritonConfig
from .protocol import V2_TO_TRITON

# onnx.TensorProto element types -> KServe v2 datatypes (Triton's TYPE_* follow from them).
ONNX_ELEM_TO_V2 = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "BYTES",
                   9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16"}


def _tensors(value_infos) -> list[tuple[str, str, list[int]]]:
    out = []
    for v in value_infos:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out.append((v.name, ONNX_ELEM_TO_V2.get(t.elem_type, f"elem{t.elem_type}"), dims))
    return out


def _block(kind: str, name: str, datatype: str, dims: list[int]) -> str:
    if datatype not in V2_TO_TRITON:
        raise ArtifactError(f"{kind} {name!r} has an element type Triton cannot take ({datatype})")
    return (f"  {{\n    name: \"{name}\"\n    data_type: {V2_TO_TRITON[datatype]}\n"
            f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}")


def config_pbtxt(name: str, inputs, outputs, cfg: TritonConfig, provenance: list[str]) -> str:
    batching = cfg.max_batch > 0 and all(d and d[0] == -1 for _, _, d in [*inputs, *outputs])
    strip = (lambda d: d[1:]) if batching else (lambda d: d)
    lines = [f"# {p}" for p in provenance]
    lines += [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {cfg.max_batch if batching else 0}"]
    lines.append("input [\n" + ",\n".join(_block("input", n, t, strip(d)) for n, t, d in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_block("output", n, t, strip(d)) for n, t, d in outputs) + "\n]")
    if batching:
        preferred = [b for b in cfg.preferred_batch if b <= cfg.max_batch]
        lines.append("dynamic_batching {\n" + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                                               if preferred else "")
                     + f"  max_queue_delay_microseconds: {int(round(cfg.max_delay_ms * 1000))}\n}}")
    kind = KINDS[cfg.device]
    group = f"count: {cfg.instances}" + (f"\n    kind: {kind}" if kind else "")
    lines.append(f"instance_group [\n  {{\n    {group}\n  }}\n]")
    params = {}
    if cfg.threads is not None:  # the onnxruntime backend's own parameters
        params["intra_op_thread_count"] = cfg.threads
    if cfg.execution_mode == "parallel":
        params["execution_mode"] = 1
        params["inter_op_thread_count"] = cfg.threads or 0
    for key, value in params.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"


def tuned_triton(run: Run) -> dict | None:
    """TritonConfig settings from what `onnxpipe tune` chose for this run (None: it was not tuned)."""
    s = (run.section("serving") or {}).get("settings")
    if not s:
        return None
    out = {"instances": int(s["workers"]), "threads": int(s["threads"]), "max_batch": int(s["max_batch"]),
           "max_delay_ms": float(s["max_delay_ms"])}
    if out["max_batch"] > 1:
        out["preferred_batch"] = (out["max_batch"],)
    return out


def recorded_triton(run: Run, variant: str | None = None) -> tuple[dict, str]:
    """(TritonConfig settings, where they came from): what `onnxpipe tune` measured for the served setup,
    over what `onnxpipe select` chose for the variant's session (threads, execution mode)."""
    out, source = {}, []
    recorded = run.metrics(variant or run.selected).get("session_setting") if (variant or run.selected) else None
    if recorded:
        from ..core.runtime import SessionSetting

        chosen = SessionSetting.from_json(recorded)
        out.update(threads=chosen.threads, execution_mode=chosen.execution_mode)
        source.append(f"threads {chosen.threads}, {chosen.execution_mode} from `onnxpipe select`")
    tuned = tuned_triton(run)
    if tuned:
        out.update(tuned)
        source.append("instances, threads, batching from `onnxpipe tune`")
    return out, "; ".join(source)


def _external_files(model, folder: Path, recorded: dict | None) -> dict[str, Path]:
    """Relative location -> file, for weights stored outside the .onnx; the recorded one is sha256-checked."""
    from ..atomic import sha256_file

    out = {}
    for init in model.graph.initializer:
        if init.data_location != 1:  # onnx.TensorProto.EXTERNAL
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        path = (folder / location).resolve() if location else None
        if path is None or folder.resolve() not in path.parents or not path.is_file():
            raise ArtifactError(f"external weights {location!r} of {folder} are missing or outside the run folder")
        out[location] = path
    if recorded and recorded.get("path") in out and sha256_file(out[recorded["path"]]) != recorded.get("sha256"):
        raise ArtifactError(f"external weights {out[recorded['path']]} changed since they were recorded (sha256 mismatch)")
    return out


def export_triton(run: Run, out_dir: str | Path, variant: str | None = None,
                  cfg: TritonConfig = TritonConfig()) -> Path:
    """Write the repository entry for `variant` (default: the selected one); returns <out_dir>/<name>."""
    import onnx

    variant = variant or run.selected
    if not variant:
        raise ConfigError(f"run {run.root} has no selected variant; pass --variant ({', '.join(run.variants())})")
    art = run.artifact(variant)
    if art.format != "onnx":
        raise ConfigError(f"variant {variant!r} is a {art.format} model; Triton's onnxruntime backend needs an ONNX variant")
    src = run.path(variant)  # sha256-checked
    model = onnx.load(str(src), load_external_data=False)
    external = _external_files(model, src.parent, art.extra.get("external_data"))
    initializers = {i.name for i in model.graph.initializer}
    inputs = _tensors([i for i in model.graph.input if i.name not in initializers])
    outputs = _tensors(model.graph.output)

    name = cfg.name or run.model_name
    entry = Path(out_dir) / name
    if entry.exists():
        if not cfg.force:
            raise ConfigError(f"{entry} already exists; pass --force to replace it or choose another OUT_DIR / --name")
        if not (entry / "config.pbtxt").is_file():
            raise ConfigError(f"refusing to replace {entry}: it is not a Triton model folder (no config.pbtxt)")
        shutil.rmtree(entry)
    provenance = [f"written by onnxpipe export-triton from run {run.root}, variant {variant!r}",
                  f"model.onnx sha256 {art.sha256}"]
    tuned = run.section("serving") or {}
    if tuned.get("settings"):
        provenance.append(f"`onnxpipe tune` ({tuned.get('when')}, p99 <= {tuned.get('p99_ms')} ms) chose "
                          + ", ".join(f"{k} {v}" for k, v in tuned["settings"].items()) + "; flags override it")
    text = config_pbtxt(name, inputs, outputs, cfg, provenance)
    with atomic_path(entry / "1" / "model.onnx") as tmp:
        shutil.copyfile(src, tmp)
    for rel, path in external.items():  # weights kept beside the graph travel with it
        with atomic_path(entry / "1" / rel) as tmp:
            shutil.copyfile(path, tmp)
    write_bytes(entry / "config.pbtxt", text.encode())
    return entry
