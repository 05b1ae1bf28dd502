"""Train stage: Adam + one-cycle schedule, seeded and deterministic on CPU, early stop on
validation plateau, resumable checkpoints. Writes variant `torch` (model.pt).

`launch` starts training the way the user asked: in this process, in N local processes (DDP, see
distributed.py), or as one rank of a torchrun job. `adopt_weights` makes variant `torch` without
training (a user's state_dict, or the factory's own initialization)."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..atomic import atomic_path, sha256_file
from ..core.data import Dataset, Rows, reload_dataset
from ..core.predictors import load_checkpoint_file, save_weights
from ..errors import ArtifactError, ConfigError, DataError, RunFolderError
from ..models import call_model
from ..runfolder import Artifact, Run
from .configs import TrainConfig
from .distributed import SINGLE_PROCESS, World, load_checkpoint

CHECKPOINT = "checkpoints/last.pt"
WEIGHTS = "model.pt"


def train_config_for(spec, **overrides) -> TrainConfig:
    """The model's tuned defaults, then explicit overrides (None means 'keep the default')."""
    values = {**spec.train_defaults, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"bad [train] setting: {e}") from None


def set_determinism(seed: int, threads: int | None = None) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


def evaluate(model: nn.Module, x: Rows, y: np.ndarray, batch: int = 256) -> tuple[float, np.ndarray]:
    """Accuracy and logits of a torch model on its inputs (Rows)."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            part = {k: torch.from_numpy(v[i:i + batch]).to(device) for k, v in x.items()}
            outs.append(first_output(call_model(model, part)).float().cpu().numpy())
    logits = np.concatenate(outs) if outs else np.zeros((0,))
    return float((logits.argmax(1) == y).mean()), logits


def first_output(out):
    """The logits of a forward that returns a tensor or a tuple whose first element is the logits."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _shift(batch: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random translation of (N, C, H, W) images by up to max_shift pixels (zero fill = background)."""
    n = batch.shape[0]
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * dx / batch.shape[3]
    theta[:, 1, 2] = -2 * dy / batch.shape[2]
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    bg = batch.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(batch - bg, grid, align_corners=False, padding_mode="zeros") + bg


def _mixup_draw(a: float, n: int, g: torch.Generator) -> tuple[float, torch.Tensor]:
    """A mixing weight from Beta(a, a), folded to >= 0.5 so the first label dominates, and a partner order.

    Drawn from the epoch's generator so that a resumed run mixes exactly as the uninterrupted one."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(a, a))
    return max(lam, 1.0 - lam), torch.randperm(n, generator=g)


def evaluate_sharded(model: nn.Module, x: np.ndarray, y: np.ndarray, world: World) -> float:
    """Accuracy over all of (x, y), each rank scoring its share; the same number on every rank."""
    if not world.distributed:
        return evaluate(model, x, y)[0]
    mine = world.share(len(x))
    acc, _ = evaluate(model, x[mine], y[mine])
    correct, count = world.sum(round(acc * len(y[mine])), len(y[mine]))
    return correct / max(count, 1)


def fit(model: nn.Module, ds: Dataset, cfg: TrainConfig, *, checkpoint: Path | None = None,
        resume: bool = False, loss_fn=None, desc: str = "train", progress: bool = True,
        world: World = SINGLE_PROCESS) -> dict:
    """Train `model` in place and leave it holding the best-validation weights. Returns the history.

    `loss_fn(logits, y, x_batch)` replaces cross-entropy (distillation uses it). With a distributed
    `world`, each rank trains on its share of every global batch of `cfg.batch_size` rows and only
    rank 0 writes the checkpoint (see pipeline/distributed.py)."""
    from tqdm.auto import tqdm

    set_determinism(cfg.seed, cfg.threads)
    net = world.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(ds.x_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    # One-cycle needs at least one step to warm up over (pct_start * total > 1) and one to anneal: a very
    # short training (a few batches) gets a longer warm-up share instead of a division by zero.
    pct_start = 0.2 if 0.2 * total_steps >= 2 else min(0.75, 1.5 / max(total_steps, 1))
    if total_steps >= 3:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start)
    else:  # one or two steps in all: a constant learning rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = {"epoch": 0, "best_val": -1.0, "best_epoch": 0, "history": []}
    best_weights = {k: v.clone() for k, v in model.state_dict().items()}
    resumed_from = None
    if resume:
        ck = load_checkpoint(world, checkpoint)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if hasattr(sched, "total_steps"):
            sched.total_steps = total_steps  # resuming with more epochs extends the schedule
        best_weights = {k: v.to(world.device) for k, v in ck["best_weights"].items()}
        state = {k: ck[k] for k in ("epoch", "best_val", "best_epoch", "history")}
        resumed_from = state["epoch"]
    x_train = {k: torch.from_numpy(v) for k, v in ds.x_train.items()}
    y_train = torch.from_numpy(ds.y_train)
    floats = [k for k, v in x_train.items() if v.is_floating_point()]
    if cfg.mixup > 0 and len(floats) != len(x_train):
        raise ConfigError(f"mixup mixes float inputs, and {', '.join(k for k in x_train if k not in floats)} "
                          "are integers (token ids, masks): use mixup 0 for this model")
    loss_fn = loss_fn or (lambda logits, y, xb: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc=desc, unit="epoch", file=sys.stderr,
               disable=not progress, leave=False, dynamic_ncols=True)
    t0 = time.monotonic()
    for epoch in range(state["epoch"], cfg.epochs):
        if epoch - state["best_epoch"] >= cfg.patience and state["best_val"] >= 0:
            break  # validation accuracy has not improved for `patience` epochs
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # per-epoch stream: resume is exact
        torch.manual_seed(cfg.seed * 100_003 + epoch)                  # dropout
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = {k: v[idx] for k, v in x_train.items()}, y_train[idx]
            if cfg.augment_shift:
                for k in floats:
                    if xb[k].ndim == 4:  # images; the whole global batch: g stays in step on every rank
                        xb[k] = _shift(xb[k], cfg.augment_shift, g)
            lam, yb_mix = 1.0, yb
            if cfg.mixup > 0:
                lam, partner = _mixup_draw(cfg.mixup, len(idx), g)
                xb = {k: lam * v + (1 - lam) * v[partner] for k, v in xb.items()}
                yb_mix = yb[partner]
            mine = world.share(len(idx))
            n_local = len(yb[mine])
            # A rank left without rows (last batch shorter than the world) still joins DDP's
            # all-reduce: it runs one row with weight 0.
            rows = mine if n_local else slice(0, 1)
            xb = {k: v[rows].to(world.device) for k, v in xb.items()}
            yb, yb_mix = yb[rows].to(world.device), yb_mix[rows].to(world.device)
            logits = first_output(call_model(net, xb))
            loss = loss_fn(logits, yb, xb)
            if lam < 1.0:  # mixed inputs: the loss mixes over both label sets with the same weight
                loss = lam * loss + (1 - lam) * loss_fn(logits, yb_mix, xb)
            opt.zero_grad(set_to_none=True)
            (loss * world.loss_scale(n_local, len(idx)) if world.distributed else loss).backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * n_local
        (total,) = world.sum(total)
        val_acc = evaluate_sharded(model, ds.x_val, ds.y_val, world)
        train_loss = total / len(perm)
        state["history"].append({"epoch": epoch + 1, "loss": round(train_loss, 5), "val_accuracy": round(val_acc, 5)})
        if val_acc > state["best_val"]:
            state.update(best_val=val_acc, best_epoch=epoch)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["epoch"] = epoch + 1
        bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.3f}")
        bar.update(1)
        if checkpoint is not None and world.is_writer:
            with atomic_path(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "best_weights": best_weights, **state}, tmp)
    bar.close()
    model.load_state_dict(best_weights)
    state["seconds"] = round(time.monotonic() - t0, 2)
    state["stopped_early"] = state["epoch"] < cfg.epochs
    state["resumed_from_epoch"] = resumed_from
    return state


def train(run: Run, cfg: TrainConfig, ds: Dataset, *, resume: bool = False, progress: bool = True,
          world: World = SINGLE_PROCESS) -> Artifact | None:
    """Train the run's model on `ds` and record variant `torch` with its test accuracy.

    With a distributed `world` every rank trains; rank 0 records and returns the artifact, the others None."""
    spec = run.spec
    model_cfg = run.model_config()
    if len(ds.y_val) == 0:
        from ..core.data import split_minimum

        info = ds.info
        raise DataError(f"{info.get('source')}: the validation split is empty (train {len(ds.y_train)}, test "
                        f"{len(ds.y_test)}); training stops early on validation accuracy: give at least "
                        f"{split_minimum(info.get('val_fraction', 0.1), info.get('test_fraction', 0.2))} samples of "
                        "each class")
    set_determinism(cfg.seed, cfg.threads)  # seeds the initialization too
    model = spec.build(model_cfg).to(world.device)
    history = fit(model, ds, cfg, checkpoint=run.root / CHECKPOINT, resume=resume,
                  desc=f"train {run.model_name}", progress=progress, world=world)
    if not world.is_writer:
        return None
    test_acc, _ = evaluate(model, ds.x_test, ds.y_test)
    save_weights(run.root / WEIGHTS, spec.name, model_cfg, model.state_dict())
    params = sum(p.numel() for p in model.parameters())
    with run.batch():
        art = run.add_artifact("torch", WEIGHTS, stage="train", format="torch", config=asdict(cfg),
                               extra={"params": params}, model={"name": spec.name, "config": asdict(model_cfg)})
        run.set_section("training", {
            "epochs_run": history["epoch"], "best_epoch": history["best_epoch"] + 1,
            "best_val_accuracy": history["best_val"], "stopped_early": history["stopped_early"],
            "seconds": history["seconds"], "history": history["history"],
            "processes": world.size, "device": str(world.device), "resumed_from_epoch": history["resumed_from_epoch"],
        })
        run.set_metrics("torch", accuracy=test_acc, params=params)
    return art


# --- variant torch without training ----------------------------------------------------------------------

def adopt_weights(run: Run, weights: Path | None, ds: Dataset, *, seed: int = 0) -> Artifact:
    """Variant `torch` without training: the factory's own initialization (seeded), or a state_dict file."""
    spec, cfg = run.spec, run.model_config()
    set_determinism(seed)
    model = spec.build(cfg)
    config: dict = {"weights": None}
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise ConfigError(f"weights file {weights} does not exist")
        state = load_checkpoint_file(weights, "weights file")
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # onnxpipe's model.pt and many trainers wrap the state_dict
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ArtifactError(f"{weights} does not hold a state_dict (a dict of parameter name -> tensor)")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ArtifactError(f"{weights} does not fit the model: {str(e).splitlines()[1:2] or e}") from None
        if missing or unexpected:
            raise ArtifactError(f"{weights} does not fit the model: missing keys {missing[:5]}, "
                                f"unexpected keys {unexpected[:5]}")
        config = {"weights": str(weights.resolve()), "sha256": sha256_file(weights)}
    model.eval()
    acc, _ = evaluate(model, ds.x_test, ds.y_test)
    save_weights(run.root / WEIGHTS, spec.name, cfg, model.state_dict())
    params = sum(p.numel() for p in model.parameters())
    with run.batch():
        art = run.add_artifact("torch", WEIGHTS, stage="weights", format="torch", config=config,
                               extra={"params": params}, model={"name": spec.name, "config": asdict(cfg)})
        run.set_metrics("torch", accuracy=acc, params=params)
    return art


# --- launching: one process, N local processes, or a torchrun rank ----------------------------------------

@dataclass(frozen=True)
class Job:
    """What every rank needs to train one run folder (picklable: it crosses process boundaries)."""

    root: str
    train_config: Any               # a TrainConfig
    resume: bool
    device: str                     # "cpu" or "cuda"
    progress: bool
    dataset: Any = None             # the loaded Dataset, handed to local ranks (saves each a reload); None: reload
    manifest: dict | None = None    # the run's manifest as rank 0 read it (other machines have no run folder)


def train_rank(world: World, job: Job) -> None:
    """One rank's share of `train`: every rank trains, rank 0 records the artifact."""
    import os

    from .distributed import threads_per_process

    run = Run.open(job.root) if world.is_writer else Run(Path(job.root), job.manifest or {})
    cfg = job.train_config
    if cfg.threads is None:
        torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", world.size))))
    ds = job.dataset if job.dataset is not None else reload_dataset(run.dataset_info)
    train(run, cfg, ds, resume=job.resume, progress=job.progress and world.is_writer, world=world)


def launch(prepare: Callable[[], tuple[Run, Dataset]], config_for: Callable[[Run], TrainConfig], *,
           nproc: int = 1, device: str = "cpu", resume: bool = False, progress: bool = True) -> Run | None:
    """Train the run that `prepare()` creates or reopens: in this process, in `nproc` local processes, or,
    when torchrun started this process, as one of its ranks. Returns the Run (None on ranks other than 0)."""
    from .distributed import check_device, launched_by_torchrun, single_world, spawn, under_torchrun

    if launched_by_torchrun():
        if nproc > 1:
            raise ConfigError("--nproc starts its own processes; under torchrun use --nproc-per-node instead")

        def prepare_job() -> Job:
            run, _ = prepare()
            return Job(str(run.root), config_for(run), resume, device, progress, manifest=run.manifest)

        job = under_torchrun(prepare_job, train_rank, device)
        return Run.open(job.root) if job is not None else None
    check_device(device, nproc)
    run, ds = prepare()
    cfg = config_for(run)
    if nproc == 1:
        train(run, cfg, ds, resume=resume, progress=progress, world=single_world(device))
        return run.reload()
    if resume and not (run.root / CHECKPOINT).is_file():  # say so before starting any process
        raise RunFolderError(f"nothing to resume: no checkpoint at {run.root / CHECKPOINT}")
    spawn(train_rank, Job(str(run.root), cfg, resume, device, progress, ds, run.manifest), nproc, device)
    return run.reload()
