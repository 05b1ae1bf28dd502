"""`onnxpipe explain`: why the torch model predicts what it does, on a few test samples.

  image models      integrated gradients over the pixels (baseline: the image's background value)
  sequence models   integrated gradients over the (T, F) input, summed per time step
  attention models  also the attention maps softmax(QK^T / sqrt(d)) of every block, averaged over heads,
                    recomputed from the block's own qkv weights by a read-only forward hook (the model's
                    forward, and so its numbers, are untouched)

Attributions are for the class torch predicts. Samples: torch's misclassified test samples first, then
correct ones; and for every other variant, the test samples where it disagrees with torch, so the
report can show them beside that variant. PNG grids go to explain/ and the list to the manifest's
`explain` section."""
from __future__ import annotations

import datetime as _dt
import io
import math

import numpy as np

from ..atomic import write_bytes
from ..core.data import Dataset, reload_dataset
from ..core.predictors import load_predictor, load_torch_model, predict_batched
from ..models import call_model
from ..errors import ConfigError
from ..runfolder import Run
from .configs import ExplainConfig
from .train import first_output

FOLDER = "explain"


# --- attributions ---------------------------------------------------------------------------------

def integrated_gradients(model, x, target, baseline, steps: int = 32, max_rows: int = 512):
    """(x - baseline) * mean over the path of d logit[target] / d input (Sundararajan et al. 2017).

    x, baseline: float tensors of the same shape (n, ...); target: (n,) class indices. Their sum over
    the input approximates logit(x) - logit(baseline) (completeness). The path points of several steps
    go through the model as one batch (at most `max_rows` rows): one backward instead of `steps`."""
    import torch

    n = x.shape[0]
    per_chunk = max(1, max_rows // max(n, 1))
    total = torch.zeros_like(x)
    for first in range(0, steps, per_chunk):
        alphas = (torch.arange(first, min(steps, first + per_chunk), dtype=x.dtype) + 0.5) / steps  # midpoints
        shape = (len(alphas),) + (1,) * x.ndim
        points = (baseline + alphas.view(shape) * (x - baseline)).reshape(-1, *x.shape[1:])
        points = points.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(points)
            chosen = logits.gather(1, target.repeat(len(alphas))[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, points)
        total += grad.view(len(alphas), *x.shape).sum(0)
    return (x - baseline) * total / steps


def token_embedding(model, forward, tokens):
    """The nn.Embedding that reads the token ids (found by running `forward()` once and looking for the
    embedding whose input is `tokens`: a Hugging Face model also has position and type embeddings);
    None if no embedding reads them."""
    import torch

    seen: list = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
               for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return next((mod for mod, ids in seen if ids.shape == tokens.shape and torch.equal(ids, tokens)), None)


def embedding_integrated_gradients(forward, embed, target, steps: int = 32):
    """Integrated gradients for token inputs, taken over the output of `embed` (baseline: zero embedding),
    summed over the embedding width: one value per token. `forward()` runs the model on the tokens; a
    hook replaces the embedding's output by each point on the path."""
    import torch

    state: dict = {}
    captured = embed.register_forward_hook(lambda m, a, out: state.setdefault("emb", out.detach()))
    try:
        with torch.no_grad():
            forward()
    finally:
        captured.remove()
    emb = state["emb"]
    handle = embed.register_forward_hook(lambda m, a, out: state["point"])
    try:
        total = torch.zeros_like(emb)
        for k in range(steps):
            state["point"] = ((k + 0.5) / steps * emb).requires_grad_(True)
            with torch.enable_grad():
                chosen = forward().gather(1, target[:, None]).sum()
                (grad,) = torch.autograd.grad(chosen, state["point"])
            total += grad
    finally:
        handle.remove()
    return (emb * total / steps).sum(-1)


def occlusion(forward, tokens_name: str, inputs: dict, target):
    """Per-token attribution without an embedding: the drop of the target logit when each token is replaced
    by the pad id 0 (one forward per position)."""
    import torch

    with torch.no_grad():
        base = forward(inputs).gather(1, target[:, None])[:, 0]
        ids = inputs[tokens_name]
        out = torch.zeros(ids.shape, dtype=torch.float32)
        for t in range(ids.shape[1]):
            masked = ids.clone()
            masked[:, t] = 0
            out[:, t] = base - forward({**inputs, tokens_name: masked}).gather(1, target[:, None])[:, 0]
    return out


def attention_blocks(model) -> list:
    """The model's self-attention blocks: modules with a fused `qkv` projection, a pre-norm `ln1` and `heads`."""
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("qkv", "ln1", "heads"))]


def attention_maps(model, *inputs, named: dict | None = None) -> list:
    """Per block, softmax(QK^T / sqrt(d)) of shape (n, heads, T, T), read by forward pre-hooks (the model
    runs on `inputs` positionally, or on `named` inputs by name)."""
    import torch

    maps, handles = [], []

    def capture(block, args):
        x = args[0]
        mask = args[1] if len(args) > 1 else None
        B, T, C = x.shape
        inner = getattr(block, "inner", C)                                   # heads x head width (pruned: < C)
        d = getattr(block, "head_dim", C // block.heads)
        q, k, _ = block.qkv(block.ln1(x)).split(inner, dim=-1)
        q, k = (t.view(B, T, block.heads, d).transpose(1, 2) for t in (q, k))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)                      # (B, h, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        maps.append(torch.softmax(scores, dim=-1).detach())

    for block in attention_blocks(model):
        handles.append(block.register_forward_pre_hook(capture))
    try:
        with torch.inference_mode():
            call_model(model, named) if named is not None else model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return maps


# --- sample choice --------------------------------------------------------------------------------

def choose_samples(labels: np.ndarray, torch_pred: np.ndarray, n: int, seed: int) -> list[int]:
    """Up to n test indices: misclassified ones first (at most half when correct ones exist), then correct ones."""
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(np.flatnonzero(torch_pred != labels)).tolist()
    right = rng.permutation(np.flatnonzero(torch_pred == labels)).tolist()
    n_wrong = min(len(wrong), max(n - len(right), (n + 1) // 2))
    return sorted(wrong[:n_wrong] + right[: n - n_wrong], key=lambda i: (torch_pred[i] == labels[i], i))


# --- drawing --------------------------------------------------------------------------------------

def _grid(x: np.ndarray, attr: np.ndarray, titles: list[str], family: str, maps: list | None,
          channels_last: bool = False) -> bytes:
    """One column per sample: input, attribution (and per-step bars and attention maps for sequences)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(x)
    seq = family == "sequence"
    rows = 2 + (1 if seq else 0) + (len(maps) if maps else 0)
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n + 0.6, 1.9 * rows + 0.4), squeeze=False)
    for j in range(n):
        xi, ai = x[j], attr[j]
        if not seq:                                  # (C, H, W) or (H, W, C) images
            axis = -1 if channels_last else 0
            xi, ai = xi.mean(axis), ai.sum(axis)
        elif xi.ndim == 1:                           # token ids: one row
            xi, ai = xi[:, None].astype(float), ai[:, None]
        lim = float(np.abs(ai).max()) or 1.0
        axes[0][j].imshow(xi, cmap="gray", aspect="auto" if seq else "equal")
        axes[0][j].set_title(titles[j], fontsize=7)
        axes[1][j].imshow(ai, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto" if seq else "equal")
        row = 2
        if seq:
            per_step = ai.sum(-1)
            axes[row][j].barh(np.arange(len(per_step)), per_step,
                              color=["tab:red" if v > 0 else "tab:blue" for v in per_step])
            axes[row][j].invert_yaxis()
            axes[row][j].tick_params(labelsize=6)
            row += 1
        for layer, m in enumerate(maps or []):
            axes[row + layer][j].imshow(m[j].mean(0), cmap="viridis", vmin=0, vmax=1)
        for r in range(rows):
            if not (seq and r == 2):
                axes[r][j].set_xticks([])
                axes[r][j].set_yticks([])
    labels = ["input", "attribution"] + (["per time step"] if seq else []) + \
             [f"attention, block {i + 1}" for i in range(len(maps or []))]
    for r, text in enumerate(labels):
        axes[r][0].set_ylabel(text, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# --- the stage ------------------------------------------------------------------------------------

def explain(run: Run, cfg: ExplainConfig, ds: Dataset | None = None) -> dict:
    """Attributions (and attention maps) for chosen test samples; PNG grids + the `explain` section."""
    import torch

    ds = ds or reload_dataset(run.dataset_info)
    model = load_torch_model(run, "torch")
    torch_fn = load_predictor(run, "torch")
    torch_pred = predict_batched(torch_fn, ds.x_test).argmax(1)
    others = {v: predict_batched(load_predictor(run, v, device="cpu"), ds.x_test).argmax(1)
              for v in run.variants() if v != "torch"}
    maps_available = bool(attention_blocks(model))
    family = run.spec_of("torch").family
    method = ("integrated gradients per pixel" if family == "image" else "integrated gradients per time step")
    if maps_available:
        method += " + attention maps (mean over heads)"

    groups = [("torch's predictions (misclassified first)", None,
               choose_samples(ds.y_test, torch_pred, cfg.samples, cfg.seed))]
    for v, pred in others.items():
        idx = np.flatnonzero(pred != torch_pred)
        if len(idx):
            groups.append((f"{v}: {len(idx)} of {len(pred)} test samples disagree with torch", v,
                           idx[: cfg.samples].tolist()))

    specs = run.spec_of("torch").input_specs(run.model_config_of("torch"))
    primary = next((s for s in specs if s.role in ("data", "tokens")), specs[0])

    out_groups = []
    for title, variant, indices in groups:
        rows = ds.x_test[np.asarray(indices)]
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}
        x = inputs[primary.name]
        target = torch.from_numpy(torch_pred[indices].astype(np.int64))
        n = len(indices)

        def forward_with(points, name=primary.name):
            """The model with `points` (k*n rows along the IG path) as its input `name`, the others tiled."""
            k = len(points) // n
            tiled = {o: v.repeat(k, *[1] * (v.ndim - 1)) for o, v in inputs.items() if o != name}
            return first_output(call_model(model, {**tiled, name: points}))

        embed = None
        if primary.role == "tokens":
            embed = token_embedding(model, lambda: call_model(model, inputs), x)
            method = "per-token " + ("integrated gradients through the embedding" if embed is not None else "occlusion")
            method += " + attention maps (mean over heads)" if maps_available else ""
        if x.dtype.is_floating_point:
            baseline = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True).expand_as(x) if family == "image" \
                else torch.zeros_like(x)
            attr = integrated_gradients(forward_with, x, target, baseline, cfg.steps)
        elif embed is not None:
            attr = embedding_integrated_gradients(lambda: first_output(call_model(model, inputs)), embed, target, cfg.steps)
        else:
            attr = occlusion(lambda d: first_output(call_model(model, d)), primary.name, inputs, target)
        maps = [m.numpy() for m in attention_maps(model, named=inputs)] if maps_available else None
        titles = [f"#{i} y={ds.y_test[i]} torch={torch_pred[i]}" + (f"\n{variant}={others[variant][i]}" if variant else "")
                  for i in indices]
        name = "torch.png" if variant is None else f"disagree_{variant}.png"
        write_bytes(run.root / FOLDER / name, _grid(x.numpy(), attr.detach().numpy(), titles, family, maps,
                                                    channels_last=primary.layout == "nhwc"))
        out_groups.append({"title": title, "variant": variant, "png": f"{FOLDER}/{name}", "indices": list(map(int, indices)),
                           "labels": [int(ds.y_test[i]) for i in indices],
                           "torch_pred": [int(torch_pred[i]) for i in indices],
                           "variant_pred": [int(others[variant][i]) for i in indices] if variant else None})
    section = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method, "samples": cfg.samples, "steps": cfg.steps,
        "misclassified_by_torch": int((torch_pred != ds.y_test).sum()), "groups": out_groups,
    }
    run.set_section("explain", section)
    return section
