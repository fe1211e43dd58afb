"""Process-group set-up that works under the deepspeed launcher and under plain `python` alike."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the run: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank() -> int:
    """This process's rank (0 without a process group, or before one exists: from the launcher's RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def say(message: str, err: bool = False) -> None:
    """Print on rank 0 only (stdout, or stderr with err=True), flushed: progress and notes, once per run."""
    if rank() == 0:
        print(message, file=sys.stderr if err else sys.stdout, flush=True)


def all_gather_cat(t: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """[b, ...] on each rank -> [world*b, ...] in rank order.

    Default: a copy without gradient (detached in a world of one too), as LAVIS's concat_all_gather (BLIP-2's ITC
    features, token ids). with_grad: every row keeps its gradient, sent back to the rank that owns it (summed over
    ranks), as LAVIS's all_gather_with_grad (BLIP-2's ITM image embeddings); in a world of one, t itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t if with_grad else t.detach()
    if with_grad:
        return torch.cat(_GatherWithGrad.apply(t.contiguous()), dim=0)
    with torch.no_grad():
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for every row and hands each rank its own rows'."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        summed = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(summed)  # rank r's rows were used by every rank's loss: their gradients add up
        return summed[dist.get_rank()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); single process if no launcher."""
    import deepspeed

    alone = "RANK" not in os.environ  # plain `python launch/train.py`: a world of one, no MPI discovery
    if alone:  # (DeepSpeed reads these variables; the port is never listened on, see below)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if not cuda:
            from .deepspeed_patches import skip_shared_memory_allreduce

            skip_shared_memory_allreduce()
        if alone:  # an in-memory store: no TCP rendezvous, so no port another process can take in between
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts an existing group
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def any_true(flag: bool) -> bool:
    """True if `flag` is True on any rank (one tiny all-reduce; free in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0.0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed(drain: bool = True) -> bool:
    """End of a multi-rank process: meet every rank (`drain`), destroy the group. False: a peer had failed.

    Without it gloo can abort a process at exit ("terminate called without an active exception"): a rank that
    finished its last collective early closes its sockets while a peer is still receiving, or the group is
    destroyed during interpreter finalisation. After a failure, pass drain=False: a dead peer never reaches it.
    A world of one has no peers and keeps its group, so a notebook or test can train again in the same process
    (DeepSpeed caches its groups and cannot be initialised a second time).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    peers_ok = True
    if drain:
        try:
            dist.barrier()
        except RuntimeError:  # a peer closed its sockets: it failed (its own output says why)
            peers_ok = False
    dist.destroy_process_group()
    return peers_ok
