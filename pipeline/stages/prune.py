"""Prune stage: structured pruning of a torch variant into a smaller dense network, then fine-tuning.

Not masks: whole units go, and the network is rebuilt from a config with the smaller widths, so every
later stage (export, optimize, quantize, verify, select, bench, serve) sees an ordinary, smaller model.

    cnn          conv output channels with their dependents (the conv's bias, the next conv's input
                 channels; after the last conv, the matching columns of the first Linear after Flatten),
                 and the units of the dense hidden layer
    lstm, gru    hidden units of every layer, across all gates (4 for LSTM, 3 for GRU): the rows of
                 weight_ih / weight_hh / biases of each gate, the unit's column in weight_hh (the
                 recurrence), the next layer's input column, and the head's two columns (last step, mean)
    transformer  attention heads (their q, k, v rows and the output projection's columns; a head's width
                 stays d_model / heads) and FFN units, per block; the residual width d_model stays

Each prunable set is a `Group` of units with the weight slices that belong to each unit. From these one
generic code path scores units (L1 magnitude, or Taylor |w * dL/dw| on training rows), plans what to keep
(per layer: the same fraction everywhere; global: the units of one kind ranked across layers, importance
normalized by each layer's mean), builds the pruned network from its config (per-layer widths:
`layer_hidden`, `layer_heads`, `layer_ff`, so `load_torch_variant` rebuilds it from the recorded config)
and copies the kept slices. Before any fine-tuning the pruned network is checked against the original
with the pruned units' weights zeroed: with zero weights a unit's activation is exactly 0 (ReLU/GELU of 0;
an LSTM/GRU unit with zero gate weights stays at h = 0; a head with zero q/k/v outputs 0), so the two
must agree to float rounding over the shape grid. A mismatch is a ParityError, never a warning.

A model of the user's own (`--model file.py:build`) goes through Torch-Pruning's dependency graph
instead (pipeline/core/pruning.py); its pruning history is recorded so the network can be rebuilt.

The pruned model is variant `pruned` (torch, parent `torch`, lossy, a selection gate against the
teacher like a student's), fine-tuned optionally on the teacher's soft targets (distill.kd_loss + the
one training loop, train.fit), and `manifest["pruning"]` records the plan, params and FLOPs before and
after, the zeroed-weights check and the accuracies."""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.data import Dataset, Rows
from ..core.flops import torch_flops
from ..core.parity import paired_delta, shape_grid, tensor_parity
from ..core.policy import POLICY
from ..core.predictors import load_torch_variant, save_weights, torch_predictor
from ..errors import ConfigError, ParityError
from ..models import call_model
from ..runfolder import Artifact, Run
from .configs import PruneConfig
from .distill import FALLBACK, kd_loss
from .train import evaluate, first_output, fit, set_determinism, train_config_for

log = logging.getLogger("onnxpipe")

PRUNED_FILE = "pruned.pt"
SEARCH_STEPS = 10            # bisection steps of a --target-* search over the ratio (resolution 1/1024)


# --- what can be pruned: groups of units and their weight slices ---------------------------------------

@dataclass
class Slice:
    """The part of one source tensor that belongs to each unit: indices along `dim` of state_dict[key]."""

    key: str
    dim: int
    of_unit: Callable[[int], list[int]]


@dataclass
class Group:
    name: str                 # e.g. features.3, rnn.layer0, blocks.1.heads
    kind: str                 # channels, units, hidden, heads, ffn (global pruning ranks within a kind)
    size: int
    slices: list[Slice] = field(default_factory=list)
    min_keep: int = 1


@dataclass
class Structure:
    """A built-in family: its groups, the config of a pruned network, and where each new weight comes from."""

    groups: list[Group]
    config: Callable[[dict[str, int]], object]       # {group name: units kept} -> the pruned config
    source_key: Callable[[object, str], str]         # (pruned config, its state_dict key) -> the source's key


def _rows(j: int) -> list[int]:
    return [j]


def cnn_structure(cfg) -> Structure:
    s = ((cfg.image_size - 2) // 2 - 2) // 2 - 2          # spatial size after conv/pool/conv/pool/conv
    area = s * s
    convs = [("features.0", "channels1", "features.3.weight"), ("features.3", "channels2", "features.6.weight"),
             ("features.6", "channels3", "head.1.weight")]
    groups = []
    for name, fld, consumer in convs:
        last = consumer.startswith("head")
        groups.append(Group(name, "channels", getattr(cfg, fld), [
            Slice(f"{name}.weight", 0, _rows), Slice(f"{name}.bias", 0, _rows),
            # after Flatten, channel j of (C, s, s) is columns j*s*s .. (j+1)*s*s - 1 of the first Linear
            Slice(consumer, 1, (lambda j, a=area: list(range(j * a, (j + 1) * a))) if last else _rows)]))
    groups.append(Group("head.1", "units", cfg.hidden, [
        Slice("head.1.weight", 0, _rows), Slice("head.1.bias", 0, _rows), Slice("head.4.weight", 1, _rows)]))
    fields = {g.name: f for g, f in zip(groups, ("channels1", "channels2", "channels3", "hidden"))}

    def config(kept: dict[str, int]):
        return replace(cfg, **{fields[n]: k for n, k in kept.items()})

    return Structure(groups, config, lambda new_cfg, key: key)


def rnn_structure(cfg) -> Structure:
    from ..models.rnn import rnn_key

    gates = 4 if cfg.cell == "lstm" else 3
    widths = cfg.widths()
    groups = []
    for layer, h in enumerate(widths):
        def gate_rows(j, h=h):                 # unit j's row in every gate block (i, f, g, o / r, z, n)
            return [g * h + j for g in range(gates)]

        slices = [Slice(rnn_key(cfg, layer, "weight_ih"), 0, gate_rows),
                  Slice(rnn_key(cfg, layer, "weight_hh"), 0, gate_rows),
                  Slice(rnn_key(cfg, layer, "weight_hh"), 1, _rows),      # the recurrence reads unit j
                  Slice(rnn_key(cfg, layer, "bias_ih"), 0, gate_rows),
                  Slice(rnn_key(cfg, layer, "bias_hh"), 0, gate_rows)]
        if layer + 1 < len(widths):
            slices.append(Slice(rnn_key(cfg, layer + 1, "weight_ih"), 1, _rows))
        else:                                  # the head reads [last step, mean over steps]
            slices.append(Slice("head.weight", 1, lambda j, h=h: [j, h + j]))
        groups.append(Group(f"rnn.layer{layer}", "hidden", h, slices))

    def config(kept: dict[str, int]):
        new = tuple(kept[g.name] for g in groups)
        if len(set(new)) == 1:                 # one width everywhere: the plain multi-layer nn.LSTM / nn.GRU
            return replace(cfg, hidden=new[0], layer_hidden=())
        return replace(cfg, layer_hidden=new)

    def source_key(new_cfg, key: str) -> str:
        if not key.startswith("rnn."):
            return key
        parts = key.split(".")
        layer, name = (int(parts[2]), parts[3]) if new_cfg.layer_hidden else (int(parts[1].rsplit("_l", 1)[1]), parts[1])
        return rnn_key(cfg, layer, name.rsplit("_l", 1)[0])

    return Structure(groups, config, source_key)


def transformer_structure(cfg) -> Structure:
    hd = cfg.head_dim
    groups = []
    for i in range(cfg.layers):
        heads, inner = cfg.heads_of(i), cfg.heads_of(i) * hd
        b = f"blocks.{i}"

        def qkv_rows(h, inner=inner):          # head h's rows in each of the q, k and v blocks
            return [p * inner + h * hd + t for p in range(3) for t in range(hd)]

        groups.append(Group(f"{b}.heads", "heads", heads, [
            Slice(f"{b}.qkv.weight", 0, qkv_rows), Slice(f"{b}.qkv.bias", 0, qkv_rows),
            Slice(f"{b}.proj.weight", 1, lambda h: [h * hd + t for t in range(hd)])]))
        groups.append(Group(f"{b}.ff", "ffn", cfg.ff_of(i), [
            Slice(f"{b}.ff.0.weight", 0, _rows), Slice(f"{b}.ff.0.bias", 0, _rows),
            Slice(f"{b}.ff.2.weight", 1, _rows)]))

    def config(kept: dict[str, int]):
        return replace(cfg, layer_heads=tuple(kept[f"blocks.{i}.heads"] for i in range(cfg.layers)),
                       layer_ff=tuple(kept[f"blocks.{i}.ff"] for i in range(cfg.layers)))

    return Structure(groups, config, lambda new_cfg, key: key)


STRUCTURES = {"cnn": cnn_structure, "lstm": rnn_structure, "gru": rnn_structure,
              "transformer": transformer_structure}


def structure_of(spec, cfg) -> Structure | None:
    """The built-in pruning structure of a registered model; None for a user's model (Torch-Pruning)."""
    if spec.source is not None:
        return None
    make = STRUCTURES.get(spec.name)
    return make(cfg) if make else None


# --- importance, plan, apply -----------------------------------------------------------------------------

def importance(model: nn.Module, groups: list[Group], grads: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Per group, one score per unit: the L1 norm of the unit's weights over all its slices, or with
    `grads` the Taylor score sum |w * dL/dw| over the same slices."""
    state = model.state_dict()
    out = {}
    for g in groups:
        score = np.zeros(g.size)
        for sl in g.slices:
            w = state[sl.key].detach().float()
            t = (w * grads[sl.key]).abs() if grads is not None else w.abs()
            other = [d for d in range(t.ndim) if d != sl.dim]
            per_index = (t.sum(dim=other) if other else t).numpy()
            for j in range(g.size):
                score[j] += per_index[sl.of_unit(j)].sum()
        out[g.name] = score
    return out


def _logits(model: nn.Module, rows: Rows) -> torch.Tensor:
    """The model's logits on some rows of its inputs, called as training calls it (with gradients)."""
    return first_output(call_model(model, {k: torch.from_numpy(v) for k, v in rows.items()}))


def taylor_gradients(model: nn.Module, ds: Dataset, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """dL/dw of the cross-entropy, accumulated over `samples` seeded training rows (eval mode: no dropout)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(ds.x_train))[:samples])
    model = copy.deepcopy(model).eval()
    model.zero_grad(set_to_none=True)
    for i in range(0, len(idx), 64):
        rows = idx[i:i + 64]
        loss = F.cross_entropy(_logits(model, ds.x_train[rows]), torch.from_numpy(ds.y_train[rows]),
                               reduction="sum") / len(idx)
        loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for n, p in model.named_parameters()}
    return {**{k: torch.zeros_like(v) for k, v in model.state_dict().items()}, **grads}


def plan_keep(groups: list[Group], scores: dict[str, np.ndarray], ratio: float, scope: str) -> dict[str, list[int]]:
    """{group: the unit indices kept (sorted)}. layer: each group loses round(ratio * size) of its weakest
    units; global: within each kind, round(ratio * total) units go, weakest first by importance over the
    group's mean (so layers of different fan-in compare), each group keeping at least min_keep."""
    prune: dict[str, set[int]] = {g.name: set() for g in groups}
    if scope == "layer":
        for g in groups:
            n = min(int(round(ratio * g.size)), g.size - g.min_keep)
            order = np.argsort(scores[g.name], kind="stable")
            prune[g.name] = set(int(j) for j in order[:max(n, 0)])
    else:
        for kind in dict.fromkeys(g.kind for g in groups):
            members = [g for g in groups if g.kind == kind]
            ranked = []
            for g in members:
                s = scores[g.name]
                norm = s / (s.mean() if s.mean() > 0 else 1.0)
                ranked += [(float(norm[j]), g.name, j) for j in range(g.size)]
            budget = int(round(ratio * sum(g.size for g in members)))
            left = {g.name: g.size for g in members}
            floor = {g.name: g.min_keep for g in members}
            for _, name, j in sorted(ranked):
                if budget <= 0:
                    break
                if left[name] > floor[name]:
                    prune[name].add(j)
                    left[name] -= 1
                    budget -= 1
    return {g.name: [j for j in range(g.size) if j not in prune[g.name]] for g in groups}


def _dropped(groups: list[Group], keep: dict[str, list[int]]) -> dict[tuple[str, int], set[int]]:
    """{(key, dim): indices removed} over every slice of every pruned unit."""
    out: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        kept = set(keep[g.name])
        for j in range(g.size):
            if j not in kept:
                for sl in g.slices:
                    out.setdefault((sl.key, sl.dim), set()).update(sl.of_unit(j))
    return out


def apply_plan(model: nn.Module, spec, structure: Structure, keep: dict[str, list[int]]):
    """(the pruned network, its config): built from the smaller config, with the kept slices copied in."""
    new_cfg = structure.config({n: len(k) for n, k in keep.items()})
    dropped = _dropped(structure.groups, keep)
    state = model.state_dict()
    pruned = spec.build(new_cfg)
    new_state = {}
    for key in pruned.state_dict():
        src = structure.source_key(new_cfg, key)
        t = state[src]
        for dim in range(t.ndim):
            gone = dropped.get((src, dim))
            if gone:
                t = t.index_select(dim, torch.tensor([i for i in range(t.shape[dim]) if i not in gone]))
        new_state[key] = t.clone()
    pruned.load_state_dict(new_state)   # strict: a shape the config does not build is a bug, raised here
    return pruned.eval(), new_cfg


def zeroed(model: nn.Module, structure: Structure, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of the source network with every weight of the pruned units set to 0 (nothing removed)."""
    out = copy.deepcopy(model).eval()
    state = out.state_dict()
    with torch.no_grad():
        for (key, dim), gone in _dropped(structure.groups, keep).items():
            state[key].index_fill_(dim, torch.tensor(sorted(gone)), 0.0)
    return out


def equivalence_report(model, pruned, structure, keep, spec, src_cfg, new_cfg):
    """Tensor parity of the pruned network against the source with the pruned units zeroed, over the grid."""
    names = tuple(s.name for s in spec.input_specs(src_cfg))
    reference = torch_predictor(zeroed(model, structure, keep), names=names)
    candidate = torch_predictor(pruned, names=names)
    grid = shape_grid(spec, src_cfg, POLICY.batches)
    tol = POLICY.tensor
    return tensor_parity("zeroed", "pruned", reference, candidate, grid, atol=tol.atol, rtol=tol.rtol,
                         output_names=spec.output_names)


# --- Torch-Pruning, for a user's own model ---------------------------------------------------------------

def classifier(model: nn.Module, num_classes: int | None) -> nn.Module | None:
    """The last Linear whose outputs are the classes (never pruned: the classes are the model's contract)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hits = [m for m in linears if num_classes is None or m.out_features == num_classes]
    return (hits or linears or [None])[-1]


def tp_prune(model: nn.Module, spec, cfg, ratio: float, pcfg: PruneConfig, ds: Dataset | None):
    """(pruned copy, Torch-Pruning history, plan rows) of a user's model at `ratio`."""
    from ..core.pruning import forward, torch_pruning

    tp = torch_pruning()
    work = copy.deepcopy(model).eval()
    example = spec.example_inputs(cfg, batch=2)
    imp = (tp.importance.GroupTaylorImportance() if pcfg.importance == "taylor"
           else tp.importance.GroupMagnitudeImportance(p=1))
    head = classifier(work, getattr(cfg, "num_classes", None))
    before = {n: tuple(p.shape) for n, p in work.named_parameters()}
    if pcfg.importance == "taylor" and ds is None:
        raise ConfigError("Taylor importance needs the run's training data")
    try:
        pruner = tp.pruner.MetaPruner(work, example, importance=imp, pruning_ratio=ratio, forward_fn=forward,
                                      global_pruning=pcfg.scope == "global", ignored_layers=[head] if head else [])
        if pcfg.importance == "taylor":
            rows = np.sort(np.random.default_rng(pcfg.seed).permutation(len(ds.x_train))[:pcfg.taylor_samples])
            work.zero_grad()
            F.cross_entropy(_logits(work, ds.x_train[rows]), torch.from_numpy(ds.y_train[rows])).backward()
        pruner.step()
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError) as e:
        raise ConfigError(f"Torch-Pruning cannot prune {spec.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                          "(its dependency graph fails on some layers, e.g. an nn.GRU whose output is concatenated "
                          "with another branch; see README, `onnxpipe prune`: reshape the model, or "
                          "compress it with distill or quantize instead)") from None
    work.zero_grad(set_to_none=True)
    history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in pruner.DG.pruning_history()]
    after = {n: tuple(p.shape) for n, p in work.named_parameters()}
    rows = [{"group": name, "kind": "out channels" if out else "in channels", "pruned": len(idx),
             "pruned_units": idx} for name, out, idx in history]
    changed = {n: [list(before[n]), list(after[n])] for n in before if before[n] != after.get(n)}
    return work.eval(), history, rows, changed


# --- the goal: a ratio, or a params / FLOPs target -------------------------------------------------------

def counts(model: nn.Module, spec, cfg) -> dict[str, float]:
    return {"params": float(sum(p.numel() for p in model.parameters())),
            "flops": torch_flops(model, spec.example_inputs(cfg, batch=1))}


def search_ratio(cost: Callable[[float], float], target: float, what: str, unpruned: float) -> float:
    """The smallest ratio (to 1/1024) whose pruned model costs at most `target` (cost falls as ratio grows)."""
    top = 1.0 - 1.0 / 1024
    if cost(0.0) <= target:
        raise ConfigError(f"the unpruned model already has {unpruned:,.0f} {what} <= the target {target:,.0f}; "
                          "nothing to prune (give a smaller target or --ratio)")
    least = cost(top)
    if least > target:
        raise ConfigError(f"the target of {target:,.0f} {what} is out of reach: pruning every layer down to its "
                          f"last unit leaves {least:,.0f} ({100 * least / unpruned:.1f}% of the unpruned "
                          f"{unpruned:,.0f}); give a target of at least {least:,.0f}")
    lo, hi = 0.0, top
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def resolve_target(value: float, unpruned: float) -> float:
    """A target below 1 is a fraction of the unpruned count, at 1 or more a count."""
    return value * unpruned if value < 1 else value


# --- the stage -------------------------------------------------------------------------------------------

def prune(run: Run, cfg: PruneConfig, ds: Dataset, *, source: str = "torch", progress: bool = True) -> list[Artifact]:
    """Prune torch variant `source`, check it, fine-tune it and record variant `pruned` with its gate."""
    model, spec, src_cfg = load_torch_variant(run, source)
    before = counts(model, spec, src_cfg)
    structure = structure_of(spec, src_cfg)
    grads = None
    if structure is not None and cfg.importance == "taylor":
        grads = taylor_gradients(model, ds, cfg.taylor_samples, cfg.seed)
    kind, value = cfg.goal()

    if structure is not None:
        scores = importance(model, structure.groups, grads)

        def build(ratio: float):
            return plan_keep(structure.groups, scores, ratio, cfg.scope)

        def cost(ratio: float) -> float:
            new_cfg = structure.config({n: len(k) for n, k in build(ratio).items()})
            with torch.device("meta"):
                net = spec.build(new_cfg)
            return counts(net, spec, new_cfg)[kind]
    else:
        def cost(ratio: float) -> float:
            return counts(tp_prune(model, spec, src_cfg, ratio, cfg, ds)[0], spec, src_cfg)[kind]

    ratio = value if kind == "ratio" else search_ratio(cost, resolve_target(value, before[kind]), kind, before[kind])

    record: dict = {"source": source, "goal": {"kind": kind, "value": value}, "ratio": ratio, "scope": cfg.scope,
                    "importance": cfg.importance}
    history = None
    if structure is not None:
        keep = build(ratio)
        pruned, new_cfg = apply_plan(model, spec, structure, keep)
        check = equivalence_report(model, pruned, structure, keep, spec, src_cfg, new_cfg)
        if not check:
            raise ParityError(check)
        record.update(library="onnxpipe (built-in)", zeroed_check=check.to_json(), plan=[
            {"group": g.name, "kind": g.kind, "size": g.size, "kept": len(keep[g.name]),
             "pruned_units": [j for j in range(g.size) if j not in set(keep[g.name])]} for g in structure.groups])
    else:
        from ..core.pruning import version

        pruned, history, rows, changed = tp_prune(model, spec, src_cfg, ratio, cfg, ds)
        new_cfg = src_cfg
        record.update(library=f"torch-pruning {version()}", plan=rows, changed_parameters=changed)
    after = counts(pruned, spec, new_cfg)
    if after["params"] >= before["params"]:
        raise ConfigError(f"pruning at ratio {ratio:g} removed nothing from {spec.name} (nothing prunable was "
                          "found, or every layer is at its minimum width); give a larger --ratio")
    pruned_acc, pruned_logits = evaluate(pruned, ds.x_test, ds.y_test)
    teacher_acc, teacher_logits = evaluate(model, ds.x_test, ds.y_test)

    epochs = cfg.epochs if cfg.epochs is not None else train_config_for(spec).epochs
    if epochs > 0:
        temperature = cfg.temperature if cfg.temperature is not None else spec.distill_defaults.get(
            "temperature", FALLBACK["temperature"])
        alpha = cfg.alpha if cfg.alpha is not None else spec.distill_defaults.get("alpha", FALLBACK["alpha"])
        train_cfg = train_config_for(spec, epochs=epochs, lr=cfg.lr, seed=cfg.seed)
        set_determinism(cfg.seed)
        loss = kd_loss(model, temperature, alpha) if cfg.soft_targets else None
        hist = fit(pruned, ds, train_cfg, checkpoint=run.root / "checkpoints" / "pruned.pt", resume=cfg.resume,
                   loss_fn=loss, desc=f"fine-tune pruned {spec.name}", progress=progress)
        record["fine_tune"] = {"train": asdict(train_cfg), "epochs_run": hist["epoch"], "soft_targets": cfg.soft_targets,
                               **({"temperature": temperature, "alpha": alpha} if cfg.soft_targets else {}),
                               "history": hist["history"]}
    else:
        record["fine_tune"] = None
    acc, logits = evaluate(pruned, ds.x_test, ds.y_test)
    labels = ds.y_test
    record.update(
        params_before=int(before["params"]), params_after=int(after["params"]),
        flops_before=before["flops"], flops_after=after["flops"],
        params_ratio=after["params"] / before["params"], flops_ratio=after["flops"] / before["flops"],
        teacher_accuracy=teacher_acc, pruned_accuracy_before_fine_tune=pruned_acc, pruned_accuracy=acc,
        drop_vs_teacher=paired_delta(teacher_logits.argmax(1) == labels, logits.argmax(1) == labels).to_json(),
        model_config=asdict(new_cfg),
    )
    save_weights(run.root / PRUNED_FILE, spec.name, new_cfg, pruned.state_dict(), pruning_history=history)
    model_record = {"name": spec.name, "config": asdict(new_cfg)}
    if history is not None:
        model_record["pruning_history"] = history
    stale = [v for v in run.variants() if v != "pruned" and "pruned" in run.lineage(v)] if run.has("pruned") else []
    if stale:
        log.warning("re-pruning replaces variant pruned: removed %s, made from the previous pruned model "
                    "(`onnxpipe prune` makes them again)", ", ".join(stale))
    with run.batch():
        for v in stale:
            run.remove_variant(v, stage=run.artifact(v).stage)
        art = run.add_artifact(
            "pruned", PRUNED_FILE, stage="prune", parent=source, format="torch", lossy=True, config=asdict(cfg),
            extra={"params": record["params_after"], "flops": record["flops_after"], "budget": cfg.budget.to_json()},
            model=model_record)
        run.set_section("pruning", record)
        run.set_metrics("pruned", accuracy=acc, params=record["params_after"], flops=record["flops_after"])
    return [art]
