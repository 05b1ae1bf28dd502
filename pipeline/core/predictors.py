"""Run any variant of a run as a function of numpy inputs -> numpy logits, torch or ONNX Runtime alike.

`load_predictor(run, variant, device=, threads=, spinning=)` honours the same settings for both kinds:
a torch variant runs on `device` with `threads` intra-op threads (torch's pool is process-wide, so the
predictor sets it before each call when it differs), an ONNX one through pipeline/core/runtime.py.
Torch checkpoints load only with `weights_only=True`, and their sha256 is checked first."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from ..errors import ArtifactError, DeviceError
from ..runfolder import Run
from .timing import default_threads

Predictor = Callable[..., np.ndarray]


def load_checkpoint_file(path: Path, what: str = "checkpoint") -> dict:
    """torch.load(weights_only=True) with every failure as one ArtifactError (no unsafe-loading advice)."""
    import pickle

    import torch

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            first = "it holds Python objects other than tensors and plain data (refused: loading them could run code)"
        raise ArtifactError(f"cannot load {what} {path}: {first[:300]}; the file is corrupt, truncated or not an "
                            "onnxpipe checkpoint: re-run the stage that wrote it") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} {path} does not hold a dict of tensors and settings; re-run the stage that wrote it")
    return obj


def save_weights(path: Path, model_name: str, cfg, state_dict: dict, *, pruning_history: list | None = None) -> None:
    """model.pt: the network's name, its config as plain data and its state_dict (loads with weights_only).

    `pruning_history`: a Torch-Pruning history (plain data) that turns the network the config builds into
    this one (a pruned model of a user's factory); load_torch_variant replays it before loading."""
    import torch

    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}  # loads on machines without the training device
    record = {"model": model_name, "config": asdict(cfg), "state_dict": state_dict}
    if pruning_history is not None:
        record["pruning_history"] = pruning_history
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_torch_variant(run: Run, variant: str = "torch"):
    """(module, spec, config) of a torch variant, rebuilt from its checkpoint (sha256-checked; weights_only).

    The spec and config are the variant's own (run.spec_of), so a student of another size or model
    rebuilds as itself; the checkpoint's own record must agree with the manifest's."""
    art = run.artifact(variant)
    if art.format != "torch":
        raise ArtifactError(f"variant {variant!r} is a {art.format} artifact, not a torch model")
    ck = load_checkpoint_file(run.path(variant), f"torch variant {variant!r}")
    if not isinstance(ck.get("state_dict"), dict) or not isinstance(ck.get("config"), dict):
        raise ArtifactError(f"torch variant {variant!r} ({run.path(variant)}) has no state_dict and config; "
                            "re-run the stage that wrote it")
    spec = run.spec_of(variant)
    if ck.get("model") not in (None, spec.name):
        raise ArtifactError(f"torch variant {variant!r} holds a {ck.get('model')!r} network but the manifest says "
                            f"{spec.name!r}; the run folder is inconsistent: re-run the stage that wrote it")
    cfg = spec.config_from(ck["config"])
    model = spec.build(cfg)
    if ck.get("pruning_history") is not None:  # a pruned model of a user's factory: redo the pruning, then load
        from .pruning import replay

        replay(model, spec.example_inputs(cfg, batch=2), ck["pruning_history"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise ArtifactError(f"the weights of variant {variant!r} do not fit its network: "
                            f"{str(e).splitlines()[0][:300]}") from None
    return model.eval(), spec, cfg


def load_torch_model(run: Run, variant: str = "torch"):
    """Rebuild a torch variant from its checkpoint (sha256-checked; weights_only load)."""
    return load_torch_variant(run, variant)[0]


def torch_predictor(module, *, device: str = "cpu", threads: int | None = None,
                    names: tuple[str, ...] | None = None) -> Predictor:
    """numpy in (the inputs in `names` order), float32 numpy logits out, on `device` with `threads`
    intra-op threads. The module is called with the inputs by name (models.call_model)."""
    import torch

    from ..models import call_model

    if device not in ("cpu", "cuda", "auto"):
        raise DeviceError(f"unknown device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was requested for a torch variant but torch has no CUDA device here; "
                          "use --device cpu")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    module = module.to(dev).eval()
    n = default_threads(threads)

    def predict(*inputs: np.ndarray) -> np.ndarray:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        keys = names or tuple(f"input_{i}" for i in range(len(inputs)))
        with torch.inference_mode():
            out = call_model(module, {k: torch.from_numpy(np.ascontiguousarray(x)).to(dev) for k, x in zip(keys, inputs)})
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().cpu().numpy()

    predict.module = module                           # type: ignore[attr-defined]
    predict.providers = [f"torch eager ({dev.type})"]  # type: ignore[attr-defined]
    predict.threads = n                               # type: ignore[attr-defined]
    return predict


def load_predictor(run: Run, variant: str, *, device: str = "cpu", threads: int | None = None,
                   opt_level: str = "all", spinning: bool | None = None,
                   execution_mode: str = "sequential") -> Predictor:
    """A callable on numpy inputs returning float32 logits. The artifact's sha256 is checked first.
    (`execution_mode` and `spinning` are ONNX Runtime settings; torch eager has neither.)"""
    art = run.artifact(variant)
    if art.format == "torch":
        module, spec, cfg = load_torch_variant(run, variant)
        return torch_predictor(module, device=device, threads=threads, names=tuple(s.name for s in spec.input_specs(cfg)))
    from .runtime import make_session

    return make_session(run.path(variant), device=device, threads=threads, opt_level=opt_level, spinning=spinning,
                        execution_mode=execution_mode)


def predict_batched(fn: Predictor, x, batch: int = 256) -> np.ndarray:
    """fn over `x` (Rows of every input, or one array) in batches of `batch` rows."""
    from .data import Rows

    if isinstance(x, Rows):
        return np.concatenate([fn(*x[i:i + batch].arrays) for i in range(0, len(x), batch)])
    return np.concatenate([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
