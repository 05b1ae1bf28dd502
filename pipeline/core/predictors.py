"""Run any variant of a run as a function of numpy inputs -> numpy logits (torch or ONNX Runtime)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..runfolder import Run

Predictor = Callable[..., np.ndarray]


def load_predictor(run: Run, variant: str, *, device: str = "cpu", threads: int | None = None,
                   opt_level: str = "all", spinning: bool | None = None) -> Predictor:
    """A callable on numpy inputs returning float32 logits. The artifact's sha256 is checked first."""
    art = run.artifact(variant)
    if art.format == "torch":
        import torch

        from ..stages.train import load_torch_model

        model = load_torch_model(run, variant)

        def predict(*inputs: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)).numpy()

        predict.module = model  # type: ignore[attr-defined]
        return predict
    from .runtime import make_session

    return make_session(run.path(variant), device=device, threads=threads, opt_level=opt_level, spinning=spinning)


def predict_batched(fn: Predictor, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
