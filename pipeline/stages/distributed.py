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
from typing import Any, Callable

import torch
from torch import nn

from ..core.timing import usable_cores
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
    from ..core.predictors import load_checkpoint_file

    ck, error = None, None
    if world.is_writer and path is not None and path.is_file():
        try:
            ck = load_checkpoint_file(path, "training checkpoint")
        except OnnxpipeError as e:
            error = str(e)
    ck, error = world.broadcast((ck, error))
    if error:
        raise RunFolderError(error)
    if ck is None:
        raise RunFolderError(f"nothing to resume: no checkpoint at {path}")
    return ck


# --- starting the processes ----------------------------------------------------------------------------
# `target(world, payload)` is what every rank runs (a module-level function: it crosses process boundaries).

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
    return max(1, usable_cores() // nproc)


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


def leave(world: World) -> None:
    """Wait until every rank is done (rank 0 has written the run), then take the process group down.

    Only on success: after an error the process just exits and the launcher stops the others (tearing
    the group down while other ranks sit in a collective can hang)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, size: int, init_method: str, device: str, target: Callable, payload: Any, errors) -> None:
    """Entry point of a process started by `spawn` (must be importable at module level)."""
    try:
        world = init_world(rank, size, rank, device, init_method)
        target(world, payload)
        leave(world)
    except OnnxpipeError as e:  # a user error: report it once, cleanly, through the parent
        errors.put((type(e).__name__, str(e)))
        raise SystemExit(1) from None


def spawn(target: Callable[[World, Any], None], payload: Any, nproc: int, device: str) -> None:
    """Run `target(world, payload)` in `nproc` processes on this machine, rendezvous on a free localhost port."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from .. import errors as error_types

    check_device(device, nproc)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    try:
        mp.start_processes(_spawned, args=(nproc, init_method, device, target, payload, errors), nprocs=nproc,
                           join=True, start_method="spawn")
    except ProcessException:
        if errors.empty():
            raise
        # The user's error, not the others' reaction to that rank's exit (e.g. a broken gloo connection).
        name, message = errors.get()
        raise getattr(error_types, name, OnnxpipeError)(message) from None


def under_torchrun(prepare: Callable[[], Any], target: Callable[[World, Any], Any], device: str) -> Any:
    """Run under torchrun (rendezvous from its environment: RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Rank 0 calls `prepare()` and broadcasts its result (the payload) to every rank; a user error there is
    raised on every rank, so no rank waits forever. Every rank then runs `target(world, payload)`.
    Returns the payload on rank 0 and None on the others."""
    import torch.distributed as dist

    from .. import errors as error_types

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device, 1)
    world = init_world(rank, size, local_rank, device, "env://")
    message: tuple = ()
    if world.is_writer:
        try:
            message = ("ok", prepare())
        except OnnxpipeError as e:
            message = ("error", type(e).__name__, str(e))
    message = world.broadcast(message)
    if message[0] == "error":
        dist.destroy_process_group()  # every rank got here: a clean exit for all
        raise getattr(error_types, message[1], OnnxpipeError)(message[2])
    target(world, message[1])
    leave(world)
    return message[1] if world.is_writer else None
