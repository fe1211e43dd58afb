"""Process-group set-up that works under the deepspeed launcher and under plain `python` alike."""
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Optional

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


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


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


class LauncherError(ValueError):
    """The launcher's variables cannot describe this process's place in the run (one line)."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07' (as `scontrol show hostnames`)."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head or not head.group(1):
        raise LauncherError(f"SLURM_NODELIST={nodelist!r} names no host: set MASTER_ADDR to the first node's address")
    prefix, ranges = head.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _scontrol_first_host(nodelist: str) -> Optional[str]:
    """SLURM's own expansion of the node list (exact for any syntax), where scontrol is installed."""
    import shutil
    import subprocess

    if not nodelist or not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else None


def _int_env(names: tuple[str, ...], launcher: str) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            try:
                return int(os.environ[name])
            except ValueError:
                raise LauncherError(f"{launcher}: {name}={os.environ[name]!r} is not a number") from None
    raise LauncherError(f"{launcher}: none of {', '.join(names)} is set: start the job with srun/mpirun, or with "
                        "deepspeed/torchrun, which set RANK, WORLD_SIZE and LOCAL_RANK")


# SLURM_STEP_ID of the batch script and of the extern step (numbers or names by version): not tasks of an srun step
_SLURM_NOT_SRUN = {"4294967294", "4294967295", "4294967292", "batch", "extern"}


def adopt_launcher_env() -> Optional[str]:
    """Under srun or mpirun (no RANK set), derive RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from their
    variables; returns the launcher's name (None if deepspeed/torchrun or no launcher). LauncherError: one line."""
    if "RANK" in os.environ:  # deepspeed, torchrun (or the user) already said it
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" not in os.environ:
            raise LauncherError("RANK and WORLD_SIZE are set but LOCAL_RANK is not: every process of a node would "
                                "use GPU 0; set LOCAL_RANK (deepspeed and torchrun set it)")
        return None
    step = os.environ.get("SLURM_STEP_ID", "")
    if "SLURM_PROCID" in os.environ and step and step not in _SLURM_NOT_SRUN:  # a task of an srun step
        launcher = "srun"
        rank = _int_env(("SLURM_PROCID",), launcher)
        world = _int_env(("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), launcher)
        local = _int_env(("SLURM_LOCALID",), launcher)
    elif "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:  # Open MPI, or MPICH / Intel MPI
        openmpi = "OMPI_COMM_WORLD_RANK" in os.environ
        launcher = "mpirun"
        rank = _int_env(("OMPI_COMM_WORLD_RANK",) if openmpi else ("PMI_RANK",), launcher)
        world = _int_env(("OMPI_COMM_WORLD_SIZE",) if openmpi else ("PMI_SIZE",), launcher)
        local = _int_env(("OMPI_COMM_WORLD_LOCAL_RANK",) if openmpi else ("MPI_LOCALRANKID",), launcher)
        if world > 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
            raise LauncherError("mpirun: set MASTER_ADDR (rank 0's host) and MASTER_PORT (a free port) for every "
                                "process, e.g. mpirun -x MASTER_ADDR=node1 -x MASTER_PORT=29500 ...")
    else:
        return None
    if not 0 <= rank < world or not 0 <= local <= rank:
        raise LauncherError(f"{launcher}: rank {rank}, local rank {local} of {world} processes is not a place in a run")
    if world == 1:  # one task: a world of one, as under plain python
        return None
    if launcher == "srun" and "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST") or os.environ.get(
            "SLURM_JOB_NODELIST", "")
        os.environ["MASTER_ADDR"] = _scontrol_first_host(nodes) or first_host(nodes)
    if launcher == "srun" and "MASTER_PORT" not in os.environ:  # the same on every task of the job (not a free port)
        os.environ["MASTER_PORT"] = str(20000 + _int_env(("SLURM_JOB_ID",), launcher) % 20000)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return launcher


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); single process if no launcher.

    Under srun or mpirun their variables become RANK/WORLD_SIZE/LOCAL_RANK (adopt_launcher_env)."""
    import deepspeed

    adopt_launcher_env()
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


def any_nonfinite(loss: torch.Tensor) -> bool:
    """True if `loss` is not finite on any rank: one host sync, and one tiny all-reduce when there are peers, so
    that every rank skips the same micro-batch (a rank skipping alone would pair its batches with others' next)."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank ([obj] in a world of one): small picklable values only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
