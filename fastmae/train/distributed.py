"""Data-parallel set-up: torchrun / torch.distributed.launch (env://), the ITP launcher (OpenMPI variables),
NCCL on GPUs and gloo on CPUs. Only rank 0 writes files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # the process group was made by `init_distributed` (and is ended by `cleanup`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, dist_url: str = "env://", dist_on_itp: bool = False,
                     local_rank: int = -1) -> DistInfo:
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE set) or by the ITP launcher
    (`dist_on_itp`, OMPI_COMM_WORLD_* set); otherwise a single process. On CUDA the process uses GPU
    `LOCAL_RANK`."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
        return DistInfo(True, dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    if dist_on_itp:
        needed = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MASTER_ADDR",
                  "MASTER_PORT")
        missing = [k for k in needed if k not in os.environ]
        if missing:
            raise ValueError(f"--dist_on_itp reads the ranks from OpenMPI's environment (launch with mpirun) and the "
                             f"address from MASTER_ADDR/MASTER_PORT; not set here: {', '.join(missing)}")
        rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
        world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
        local = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        os.environ.update(LOCAL_RANK=str(local), RANK=str(rank), WORLD_SIZE=str(world))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
    else:
        return DistInfo()
    if world <= 1:
        return DistInfo(False, rank, world, local)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world, rank=rank)
    dist.barrier()
    return DistInfo(True, rank, world, local, backend, owns_group=True)


class PeerFailedError(RuntimeError):
    """Another rank of the process group failed at a point every rank reaches (its own error says why)."""


def all_succeeded(ok: bool, device) -> bool:
    """Whether every rank of the process group says `ok`: one all-reduce (MIN) of a flag, on `device` under NCCL.
    Every rank must call it, whether or not it failed, so that none is left waiting for one that stopped."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agree(error: BaseException | None, device, peer_failed: Callable[[], BaseException]) -> BaseException | None:
    """At a point every rank of the process group reaches (`all_succeeded`): this rank's `error`, or
    `peer_failed()` where this rank succeeded and another did not; None where every rank succeeded. If the
    agreement itself fails, this rank's own error (it says more), else that failure."""
    try:
        everyone = all_succeeded(error is None, device)
    except Exception as exc:  # noqa: BLE001 - returned to the caller, who raises it
        return error or exc
    if error is None and not everyone:
        return peer_failed()
    return error


def end_of_epoch(info: DistInfo, device, error: BaseException | None, what: str) -> None:
    """Every rank meets here at the end of an epoch (a barrier): `error` (this rank's failure at `what`, e.g. rank 0
    writing the checkpoint) is raised on this rank, and a PeerFailedError on the others, instead of leaving them
    waiting at the next collective for a rank that has stopped."""
    if info.distributed:
        error = agree(error, device, lambda: PeerFailedError(
            f"another process failed {what} (its own message says why); stopping this one too"))
    if error is not None:
        raise error


def broadcast_state(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, in place (what DistributedDataParallel does when it wraps a
    model; for a model trained without the wrapper)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, 0)


def all_reduce_mean(values: list[float], info: DistInfo, device) -> list[float]:
    """The mean over ranks of each number (a no-op on one process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def cleanup(info: DistInfo) -> None:
    """End the process group `init_distributed` made; one the caller had made before is the caller's to end."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
