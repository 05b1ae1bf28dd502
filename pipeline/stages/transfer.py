"""Transfer stage: carry what a trained run's model learned to new data, as a new run folder.

    source run (variant torch) --copy weights--> same network, head replaced for the new classes (or kept)
                               --freeze--------> backbone (train only the head), none, or the first N layers
                               --train---------> on the new data (the one training loop, train.fit)

The new run folder's root variant `torch` is the transferred model (stage `transfer`), so every stage
applies to it as to a trained run (export, optimize, quantize, distill, prune, verify, select, ...). Its
manifest names where it came from: `transfer.source` holds the source run folder, its variant, that
variant's sha256, model and data. The new data keeps the source's normalization (the backbone was
trained on inputs scaled that way).

Measured, not assumed: the same architecture is also trained from scratch on the same data, epochs, seed
and training settings, learning rate included (the twin), and `transfer` records both accuracies and the gain with its interval and McNemar
p-value. Frozen weights are checked bit for bit after training (a frozen layer that moved is an error),
and frozen normalization layers keep their running statistics (they run in eval mode while training)."""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..core.data import Dataset
from ..core.parity import paired_delta
from ..core.predictors import load_torch_variant, save_weights
from ..errors import ArtifactError, ConfigError
from ..runfolder import Run
from .configs import TransferConfig
from .prune import classifier
from .train import WEIGHTS, evaluate, fit, set_determinism, train_config_for


def layers_with_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that own parameters themselves, in the order the model defines them (what --freeze N counts)."""
    return [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


def frozen_modules(model: nn.Module, freeze: str | int, head: str) -> list[tuple[str, nn.Module]]:
    layers = layers_with_weights(model)
    if freeze == "none":
        return []
    if freeze == "backbone":
        return [(n, m) for n, m in layers if n != head and not n.startswith(head + ".")]
    if freeze > len(layers):
        raise ConfigError(f"--freeze {freeze}: the model has {len(layers)} layers with weights "
                          f"({', '.join(n for n, _ in layers)}); give at most {len(layers)}")
    return layers[:freeze]


@contextlib.contextmanager
def running_stats_frozen(modules: list[nn.Module]):
    """Frozen normalization layers with running statistics (BatchNorm) run in eval mode while the rest
    trains, so their statistics stay as the source learned them."""
    def stay_in_eval(module, args):
        module.eval()

    hooks = [m.register_forward_pre_hook(stay_in_eval) for m in modules if getattr(m, "track_running_stats", False)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def transfer(source: Run, root: Path, cfg: TransferConfig, ds: Dataset, *, force: bool = False,
             progress: bool = True) -> Run:
    """Train the source run's torch model on `ds` into a new run folder at `root` (and its scratch twin)."""
    model, spec, src_cfg = load_torch_variant(source, "torch")
    art = source.artifact("torch")
    n_new = int(ds.info["num_classes"])
    head_module = classifier(model, getattr(src_cfg, "num_classes", None))
    if head_module is None:
        raise ConfigError(f"{spec.name} has no Linear classifier to replace; transfer needs one (its last "
                          "Linear layer whose outputs are the classes)")
    head = next(n for n, m in model.named_modules() if m is head_module)
    if cfg.head == "keep":
        if n_new != head_module.out_features:
            raise ConfigError(f"--head keep: the source's classifier has {head_module.out_features} classes but the "
                              f"new data has {n_new}; use --head new (or --classes to pick {head_module.out_features})")
        new_cfg = src_cfg
    else:
        if "num_classes" not in spec.config_fields():
            raise ConfigError(f"--head new needs the model's num_classes setting; {spec.name}'s factory has no "
                              "num_classes parameter (add one, or use --head keep with as many classes)")
        from ..models import replace_config

        new_cfg = replace_config(src_cfg, {"num_classes": n_new})

    set_determinism(cfg.seed)          # seeds the new head
    net = spec.build(new_cfg)
    head_keys = {f"{head}.{k}" for k in head_module.state_dict()}
    carried = {k: v for k, v in model.state_dict().items() if cfg.head == "keep" or k not in head_keys}
    try:
        missing, unexpected = net.load_state_dict(carried, strict=False)
    except RuntimeError as e:
        raise ArtifactError(f"the source weights do not fit the transferred network: {str(e).splitlines()[0][:300]}") from None
    if unexpected or set(missing) - head_keys:
        raise ArtifactError(f"the source weights do not fit the transferred network: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")

    frozen = frozen_modules(net, cfg.frozen_layers(), head)
    frozen_names = [f"{n}.{p}" for n, m in frozen for p, _ in m.named_parameters(recurse=False)]
    params = dict(net.named_parameters())
    for name in frozen_names:
        params[name].requires_grad_(False)
    before = {name: params[name].detach().clone() for name in frozen_names}
    train_cfg = train_config_for(spec, epochs=cfg.epochs, lr=cfg.lr, patience=cfg.patience, seed=cfg.seed)

    lineage = {"run": str(source.root.resolve()), "variant": "torch", "sha256": art.sha256, "model": spec.name,
               "model_config": asdict(src_cfg), "accuracy": source.metrics("torch").get("accuracy"),
               "dataset": {k: (source.dataset_info or {}).get(k) for k in ("source", "fingerprint", "classes")}}
    extra = {"size": source.section("size", "default"), "transfer": {"source": lineage, "status": "training"}}
    if source.section("model_source"):
        extra["model_source"] = source.section("model_source")
    run = Run.create(root, spec.name, asdict(new_cfg), ds.info, force=force, extra=extra)

    with running_stats_frozen([m for _, m in frozen]):
        hist = fit(net, ds, train_cfg, checkpoint=run.root / "checkpoints" / "last.pt",
                   desc=f"transfer {spec.name}", progress=progress)
    moved = [n for n in frozen_names if not torch.equal(before[n], params[n].detach())]
    if moved:
        raise ArtifactError(f"frozen parameters changed during training: {', '.join(moved[:5])}")
    acc, logits = evaluate(net, ds.x_test, ds.y_test)
    record = {
        "source": lineage, "freeze": cfg.freeze, "head": cfg.head, "head_layer": head,
        "frozen_layers": [n for n, _ in frozen], "frozen_parameters": len(frozen_names),
        "frozen_params": int(sum(before[n].numel() for n in frozen_names)),
        "trainable_params": int(sum(p.numel() for p in net.parameters() if p.requires_grad)),
        "frozen_unchanged": True, "train": asdict(train_cfg), "epochs_run": hist["epoch"],
        "transferred_accuracy": acc, "labelled_per_class": ds.info.get("per_class"),
        "train_rows": len(ds.y_train), "history": hist["history"],
    }
    if cfg.scratch_baseline:
        set_determinism(cfg.seed)
        twin = spec.build(new_cfg)
        twin_hist = fit(twin, ds, train_cfg, desc=f"scratch {spec.name}", progress=progress)
        scratch_acc, scratch_logits = evaluate(twin, ds.x_test, ds.y_test)
        record.update(scratch_accuracy=scratch_acc, scratch_epochs_run=twin_hist["epoch"],
                      scratch_history=twin_hist["history"],
                      gain_vs_scratch=paired_delta(logits.argmax(1) == ds.y_test,
                                                   scratch_logits.argmax(1) == ds.y_test).to_json())
    for p in net.parameters():
        p.requires_grad_(True)
    save_weights(run.root / WEIGHTS, spec.name, new_cfg, net.state_dict())
    n_params = sum(p.numel() for p in net.parameters())
    with run.batch():
        run.add_artifact("torch", WEIGHTS, stage="transfer", format="torch", config=asdict(cfg),
                         extra={"params": n_params, "transferred_from": {k: lineage[k] for k in ("run", "variant", "sha256")}},
                         model={"name": spec.name, "config": asdict(new_cfg)})
        run.set_section("transfer", record)
        run.set_section("training", {"epochs_run": hist["epoch"], "best_epoch": hist["best_epoch"] + 1,
                                     "best_val_accuracy": hist["best_val"], "stopped_early": hist["stopped_early"],
                                     "seconds": hist["seconds"], "history": hist["history"], "processes": 1,
                                     "device": "cpu", "resumed_from_epoch": None})
        run.set_metrics("torch", accuracy=acc, params=n_params)
    return run
