"""Data-parallel training with torch.distributed: `onnxpipe train MODEL --nproc N`, or the same
command started by torchrun on one or many machines.

The same optimization as one process: every rank walks the same seeded per-epoch permutation as
single-process training and takes its share of each global batch (rank r: samples r, r+W, ...),
so W processes with global batch B follow one process with batch B. DDP averages the gradients
over ranks; each rank's loss is scaled by W * n_local / n_global so that the average is the
global-batch mean even for a short last batch. Validation is sharded and summed over ranks, so
every rank takes the same early-stop decision.

Only rank 0 writes (checkpoints, model.pt, manifest.json). On --resume rank 0 reads the checkpoint
and broadcasts it, and it broadcasts the manifest at start: other machines need no shared file
system, only the same data source.

Backends: gloo on CPU, nccl on CUDA (one GPU per process).
"""
from __future__ import annotations

import os
import socket

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DeviceError, OnnxpipeError, RunFolderError


@dataclass
class World:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train with: DDP (gradient all-reduce) when there are several processes."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of n rows."""
        return slice(self.rank, n, self.size)

    def loss_scale(self, n_local: int, n_global: int) -> float:
        """Factor that turns the local mean loss into this rank's part of the global mean (DDP divides by size)."""
        return self.size * n_local / n_global

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum of `values` over all ranks."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


SINGLE_PROCESS = World()


def single_world(device: str = "cpu") -> World:
    """One process on `device` (cpu, or the first GPU for cuda)."""
    return World(device=torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))


def load_checkpoint(world: World, path: Path | None) -> dict:
    """Rank 0 reads the training checkpoint and hands it to every rank; an error on every rank if it is missing."""
    ck = None
    if world.is_writer and path is not None and path.is_file():
        ck = torch.load(path, weights_only=True, map_location="cpu")
    ck = world.broadcast(ck)
    if ck is None:
        raise RunFolderError(f"nothing to resume: no checkpoint at {path}")
    return ck


# --- starting the processes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What every rank needs to train one run folder (picklable: it crosses process boundaries)."""

    root: str
    train_config: Any               # a TrainConfig
    resume: bool
    device: str                     # "cpu" or "cuda"
    progress: bool
    dataset: Any = None             # the loaded Dataset, handed to local ranks (saves each a reload); None: reload


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def check_device(device: str, nproc: int) -> None:
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"training device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < nproc:
            raise DeviceError(
                f"--device cuda with {nproc} process(es) needs {nproc} GPU(s) (nccl: one GPU per process); "
                f"this machine has {have}. Use --device cpu (gloo) or fewer processes"
            )


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets WORLD_SIZE/RANK/MASTER_ADDR for every process it starts."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def threads_per_process(nproc: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(rank: int, size: int, local_rank: int, device: str, init_method: str) -> World:
    import datetime

    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(minutes=10))
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def train_rank(world: World, job: Job, manifest: dict | None = None):
    """One rank's share of `train`: every rank trains, rank 0 records the artifact."""
    from ..core.data import reload_dataset
    from ..runfolder import Run
    from .train import train

    if manifest is None:  # rank 0 reads the run folder, the others get its manifest
        manifest = world.broadcast(Run.open(job.root).manifest if world.is_writer else None)
    run = Run(Path(job.root), manifest)
    cfg = job.train_config
    if cfg.threads is None:
        torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", world.size))))
    ds = job.dataset if job.dataset is not None else reload_dataset(run.manifest["dataset"])
    return train(run, cfg, ds, resume=job.resume, progress=job.progress and world.is_writer, world=world)


def leave(world: World) -> None:
    """Wait until every rank is done (rank 0 has written the run), then take the process group down.

    Only on success: after an error the process just exits and the launcher stops the others (tearing
    the group down while other ranks sit in a collective can hang)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, size: int, init_method: str, job: Job, errors) -> None:
    """Entry point of a process started by `spawn` (must be importable at module level)."""
    try:
        world = init_world(rank, size, rank, job.device, init_method)
        train_rank(world, job)
        leave(world)
    except OnnxpipeError as e:  # a user error: report it once, cleanly, through the parent
        errors.put((type(e).__name__, str(e)))
        raise SystemExit(1) from None


def spawn_training(job: Job, nproc: int) -> None:
    """Train on this machine with `nproc` processes, rendezvous on a free localhost port."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from .. import errors as error_types
    from .train import CHECKPOINT

    check_device(job.device, nproc)
    if job.resume and not (Path(job.root) / CHECKPOINT).is_file():  # say so before starting any process
        raise RunFolderError(f"nothing to resume: no checkpoint at {Path(job.root) / CHECKPOINT}")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    try:
        mp.start_processes(_spawned, args=(nproc, init_method, job, errors), nprocs=nproc, join=True,
                           start_method="spawn")
    except ProcessException:
        if errors.empty():
            raise
        # The user's error, not the others' reaction to that rank's exit (e.g. a broken gloo connection).
        name, message = errors.get()
        raise getattr(error_types, name, OnnxpipeError)(message) from None


def torchrun_training(prepare, config_for, *, device: str, resume: bool, progress: bool):
    """Train under torchrun (rendezvous from its environment: RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Rank 0 calls `prepare()` -> Run (create or reopen the run folder) and `config_for(run)` -> TrainConfig,
    and broadcasts both; a user error there is raised on every rank, so no rank waits forever.
    Returns the Run on rank 0 and None on the others."""
    import torch.distributed as dist

    from .. import errors as error_types
    from ..runfolder import Run

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device, 1)
    world = init_world(rank, size, local_rank, device, "env://")
    payload: tuple = ()
    if world.is_writer:
        try:
            run = prepare()
            payload = ("ok", str(run.root), run.manifest, config_for(run))
        except OnnxpipeError as e:
            payload = ("error", type(e).__name__, str(e))
    payload = world.broadcast(payload)
    if payload[0] == "error":
        dist.destroy_process_group()  # every rank got here: a clean exit for all
        raise getattr(error_types, payload[1], OnnxpipeError)(payload[2])
    _, root, manifest, cfg = payload
    train_rank(world, Job(root, cfg, resume, device, progress), manifest)
    leave(world)
    return Run.open(root) if world.is_writer else None
