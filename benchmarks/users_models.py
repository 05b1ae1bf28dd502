"""Third-party architectures through onnxpipe, and the LSTM's INT8 against ONNX Runtime's own.

For each architecture of tests/users_models.py (Hugging Face BERT, DistilBERT, GPT-2 and ViT built from
tiny configs; a torchvision-style ResNet; a two-input model): the pipeline's stages on digits (train,
export, optimize, quantize, verify, select), which of them passed, the fused attention count, and, timed
side by side in one process (pipeline/core/timing.py, interleaved rounds, one thread): the graph as
optimized (`onnx_opt`, opset 23 with native Attention folded) against the same model exported at
opset 18 (attention as MatMul/Softmax: the unfused graph) and against torch eager, and the best INT8
variant against FP32, at batch 1 and 64; plus size, accuracy and agreement.

Then the LSTM: onnxpipe's dynamic INT8 (after quant_pre_process) against ONNX Runtime's own
`quantize_dynamic` after `quant_pre_process`, on the same FP32 file: size, kernels, latency side by side.

    python benchmarks/users_models.py --write          # ~10 minutes on 2 cores
    python benchmarks/users_models.py --models bert,vit --limit 300 --epochs 1 --runs 5   # a smoke run

Writes benchmarks/users_models.json and, with --write, the "users-models" section of RESULTS.md."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import RESULTS, write_section  # noqa: E402

FACTORIES = HERE.parent / "tests" / "users_models.py"
ARCHITECTURES = ("bert", "distilbert", "gpt2", "vit", "resnet", "two_inputs")
STAGES = ["train", "export", "optimize", "quantize", "verify", "select"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="digits subset (default: all 1,797)")
    p.add_argument("--runs", type=int, default=20, help="timed rounds per batch size")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--out", type=Path, default=HERE / "users_models.json")
    p.add_argument("--write", action="store_true", help="rewrite the users-models section of RESULTS.md")
    p.add_argument("--markdown", type=Path, default=RESULTS)
    return p.parse_args(argv)


def two_input_data(work: Path) -> str:
    from sklearn.datasets import load_digits
    import numpy as np

    d = load_digits()
    np.savez(work / "two.npz", rows=d.images, aux=d.images.mean(1), y=d.target)
    return f"npz:{work / 'two.npz'}"


def build(name: str, work: Path, args) -> tuple[object, dict]:
    """The run folder through STAGES, stage by stage: which passed, and the first error."""
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.orchestrate import Context, prepare_run, run_stages

    data = two_input_data(work) if name == "two_inputs" else "digits"
    ctx = Context(data=data, limit=args.limit, progress=False,
                  sections={"train": {"epochs": args.epochs, "lr": 3e-3, "patience": 20},
                            "select": {"runs": 5, "warmup": 1}})
    run, ctx.dataset = prepare_run(f"{FACTORIES}:{name}", work / name, data=data, limit=args.limit, force=True)
    passed, error = [], None
    for stage in STAGES:
        try:
            run_stages(run, ctx, [stage])
            passed.append(stage)
        except OnnxpipeError as e:
            error = f"{stage}: {str(e).splitlines()[0][:200]}"
            break
    return run, {"passed": passed, "error": error}


def unfused(run, work: Path) -> Path:
    """The same torch model exported at opset 18: attention as MatMul / Softmax, nothing to fuse."""
    from onnxpipe.core.predictors import load_torch_variant
    from onnxpipe.stages.export import export_module

    module, spec, cfg = load_torch_variant(run, "torch")
    path = work / f"{run.model_name}_opset18.onnx"
    export_module(module, spec, cfg, path, 18)
    return path


def measure(run, work: Path, args) -> dict:
    from onnxpipe.core.predictors import load_predictor
    from onnxpipe.core.runtime import make_session
    from onnxpipe.core.timing import time_predictors
    from onnxpipe.stages.select import example_batches

    batches = [int(b) for b in args.batches.split(",")]
    int8 = [v for v in ("int8_static", "int8_dynamic") if run.has(v)]
    fns = {"torch": load_predictor(run, "torch", threads=1, spinning=False)}
    for v in ("onnx", "onnx_opt", *int8):
        if run.has(v):
            fns[v] = load_predictor(run, v, threads=1, spinning=False)
    attention = run.artifact("onnx_opt").extra.get("attention_nodes", 0) if run.has("onnx_opt") else 0
    if attention:
        fns["opset18"] = make_session(unfused(run, work), device="cpu", threads=1, spinning=False)
    inputs = example_batches(run, "onnx", batches)
    timed = time_predictors(fns, inputs, warmup=3, runs=args.runs, block=3)
    p50 = {str(b): {k: lat.p50 for k, lat in timed[b].items()} for b in batches}
    best_int8 = {b: min(int8, key=lambda v: p50[b][v]) if int8 else None for b in p50}
    out = {"p50_ms": p50, "attention_nodes": attention,
           "attention_layout_folds": run.artifact("onnx_opt").extra.get("attention_layout_folds") if run.has("onnx_opt") else None,
           "bytes": {v: run.artifact(v).bytes for v in run.variants()},
           "accuracy": {v: run.metrics(v).get("accuracy") for v in run.variants()},
           "agreement": {v: run.metrics(v).get("agreement") for v in int8},
           "best_int8": best_int8, "selected": run.selected,
           "quantize": run.section("quantize"), "opset": run.artifact("onnx").opset if run.has("onnx") else None}
    return out


def lstm_vs_ort(work: Path, args) -> dict:
    """onnxpipe's dynamic INT8 of the LSTM vs ORT's quantize_dynamic after quant_pre_process, same FP32 file."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxpipe.core.predictors import load_predictor
    from onnxpipe.core.runtime import make_session
    from onnxpipe.core.timing import time_predictors
    from onnxpipe.orchestrate import Context, run_model
    from onnxpipe.stages.select import example_batches

    ctx = Context(limit=args.limit, progress=False, sections={"train": {"epochs": min(args.epochs, 10)}})
    run = run_model("lstm", work / "lstm", ctx, stages=["train", "export", "quantize"])
    pre, ort_int8 = work / "lstm_pre.onnx", work / "lstm_ort_dynamic.onnx"
    quant_pre_process(str(run.path("onnx")), str(pre))
    quantize_dynamic(str(pre), str(ort_int8), weight_type=QuantType.QInt8)
    ops = {name: sorted({n.op_type for n in onnx.load(str(p)).graph.node if "Quant" in n.op_type or n.op_type == "LSTM"})
           for name, p in (("onnxpipe", run.path("int8_dynamic")), ("ort", ort_int8))}
    fns = {"fp32": load_predictor(run, "onnx", threads=1, spinning=False),
           "onnxpipe_int8_dynamic": load_predictor(run, "int8_dynamic", threads=1, spinning=False),
           "ort_quantize_dynamic": make_session(ort_int8, device="cpu", threads=1, spinning=False)}
    batches = [int(b) for b in args.batches.split(",")]
    timed = time_predictors(fns, example_batches(run, "onnx", batches), warmup=3, runs=args.runs, block=3)
    return {"bytes": {"fp32": run.artifact("onnx").bytes, "onnxpipe_int8_dynamic": run.artifact("int8_dynamic").bytes,
                      "ort_quantize_dynamic": ort_int8.stat().st_size},
            "ops": ops, "preprocess": run.artifact("int8_dynamic").extra.get("preprocess"),
            "p50_ms": {str(b): {k: lat.p50 for k, lat in timed[b].items()} for b in batches}}


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict, command: str) -> str:
    lines = ["## Third-party architectures", "",
             f"Command: `{command}` ({results['date']}, {results['machine']}; epochs {results['epochs']}, "
             f"digits {'all' if results['limit'] is None else results['limit']} samples). One thread, interleaved "
             "rounds in one process, p50; a ratio is a side-by-side measurement, absolute times move with the "
             "machine's load.", "",
             "| model | stages passed | opset | Attention nodes (folded) | onnx_opt vs unfused b1 / b64 | onnx_opt vs torch b1 / b64 "
             "| best INT8 vs FP32 b1 / b64 | FP32 KiB | INT8 KiB | accuracy torch / best INT8 | INT8 agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        m = r.get("measured") or {}
        p = m.get("p50_ms", {})

        def ratio(a, b, batch):
            cell = p.get(batch, {})
            return cell[a] / cell[b] if a in cell and b in cell and cell[b] else None

        bi = m.get("best_int8", {})
        int8_b64 = bi.get("64")
        lines.append(
            f"| {name} | {len(r['build']['passed'])}/{len(STAGES)}" + (f" ({r['build']['error']})" if r['build']['error'] else "")
            + f" | {m.get('opset', '-')} | {m.get('attention_nodes', '-')} ({m.get('attention_layout_folds', '-')})"
            f" | {fmt(ratio('opset18', 'onnx_opt', '1'), '.2f')}x / {fmt(ratio('opset18', 'onnx_opt', '64'), '.2f')}x"
            f" | {fmt(ratio('torch', 'onnx_opt', '1'), '.2f')}x / {fmt(ratio('torch', 'onnx_opt', '64'), '.2f')}x"
            f" | {fmt(ratio('onnx_opt', bi.get('1'), '1') if bi.get('1') else None, '.2f')}x / "
            f"{fmt(ratio('onnx_opt', int8_b64, '64') if int8_b64 else None, '.2f')}x ({int8_b64 or '-'})"
            f" | {fmt(m.get('bytes', {}).get('onnx_opt', 0) / 1024, '.0f')} | "
            f"{fmt(m.get('bytes', {}).get(int8_b64, 0) / 1024 if int8_b64 else None, '.0f')}"
            f" | {fmt(m.get('accuracy', {}).get('torch'))} / {fmt(m.get('accuracy', {}).get(int8_b64) if int8_b64 else None)}"
            f" | {fmt(m.get('agreement', {}).get(int8_b64) if int8_b64 else None)} |")
    lines += ["", "Ratios are speed-ups (> 1: the second is faster): `onnx_opt vs unfused` times the same model exported "
              "at opset 18 (attention as MatMul/Softmax) over onnxpipe's optimized opset-23 graph with the native "
              "`Attention` op folded; `best INT8 vs FP32` is FP32 `onnx_opt` over the faster INT8 variant at that batch.", ""]
    lstm = results.get("lstm")
    if lstm:
        p = lstm["p50_ms"]
        lines += ["### LSTM dynamic INT8: onnxpipe vs ONNX Runtime's `quantize_dynamic`", "",
                  f"Same FP32 `model.onnx`; ORT's after `quant_pre_process`, onnxpipe's with pre-processing "
                  f"`{lstm['preprocess']}`. Kernels: onnxpipe {', '.join(lstm['ops']['onnxpipe'])}; "
                  f"ORT {', '.join(lstm['ops']['ort'])}.", "",
                  "| | KiB | p50 ms b1 | p50 ms b64 | vs FP32 b1 | vs FP32 b64 |", "|---|---|---|---|---|---|"]
        for k in ("fp32", "onnxpipe_int8_dynamic", "ort_quantize_dynamic"):
            lines.append(f"| {k} | {lstm['bytes'][k] / 1024:.0f} | {fmt(p['1'][k])} | {fmt(p['64'][k])} | "
                         f"{fmt(p['1']['fp32'] / p['1'][k], '.2f')}x | {fmt(p['64']['fp32'] / p['64'][k], '.2f')}x |")
        level = {b: p[b]["ort_quantize_dynamic"] / p[b]["onnxpipe_int8_dynamic"] for b in p}
        lines += ["", "onnxpipe's INT8 over ORT's (> 1: onnxpipe faster): "
                  + ", ".join(f"batch {b} {v:.2f}x" for b, v in level.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import platform

    import onnxpipe.models  # noqa: F401
    from onnxpipe.atomic import write_json

    command = "python benchmarks/users_models.py" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
               "epochs": args.epochs, "limit": args.limit, "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxpipe-users-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            print(f"[{name}] building", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            run, built = build(name, work, args)
            entry = {"build": built, "build_s": round(time.monotonic() - t0, 1)}
            if "export" in built["passed"]:
                print(f"[{name}] timing", file=sys.stderr, flush=True)
                entry["measured"] = measure(run, work, args)
            results["models"][name] = entry
        print("[lstm] onnxpipe vs ORT dynamic INT8", file=sys.stderr, flush=True)
        results["lstm"] = lstm_vs_ort(work, args)
    write_json(args.out, results)
    text = markdown(results, command)
    print(text)
    if args.write:
        write_section("users-models", text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
