"""What a run is built on, decided once before a recipe builds its Task: ranks and device, GPU, precision, ZeRO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .compile import check_can_compile
from .distributed import DistInfo
from .gpu import GpuFacts, gpu_facts, set_extension_arch
from .preflight import GIB, check_gpu_arch

if TYPE_CHECKING:
    from .config import Config


@dataclass
class Precision:
    name: str  # fp32 | fp16 | bf16
    dtype: torch.dtype


class PrecisionError(ValueError):
    """A precision the device cannot run."""


def resolve_precision(requested: str, device: torch.device, gpu: Optional[GpuFacts] = None) -> Precision:
    """auto: bf16 on GPUs of compute capability >= 8.0, fp16 (dynamic loss scaling) on 6.x / 7.x, fp32 on the CPU.

    `gpu` defaults to the facts of `device` (framework.gpu.gpu_facts); bf16 asked for below 8.0 is refused.
    """
    cuda = device.type == "cuda"
    if cuda and gpu is None:
        gpu = gpu_facts(device)
    if requested == "auto":
        requested = ("bf16" if gpu.has_bf16 else "fp16") if cuda else "fp32"
    if requested == "bf16" and cuda and not gpu.has_bf16:
        raise PrecisionError(f"train.precision=bf16 but {gpu.name} (compute capability {gpu.arch}) has no native "
                             "bf16 (needs >= 8.0); use train.precision=fp16 or auto (fp16 with loss scaling)")
    return Precision(requested, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[requested])


def zero_stage(cfg: "Config") -> int:
    """deepspeed.zero_optimization.stage (0 when unset)."""
    return int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))


@dataclass(frozen=True)
class RunEnv:
    """A recipe's build(cfg, env) reads the run's facts here instead of deciding them again."""

    dist: DistInfo  # this process's rank, world size and device
    precision: Precision  # train.precision as resolved for this device
    zero_stage: int  # deepspeed.zero_optimization.stage
    gpu: Optional[GpuFacts] = None  # None on the CPU

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def check_gpu(cfg: "Config", dist: DistInfo) -> Optional[GpuFacts]:
    """Before any kernel runs: the build has kernels for this GPU; extensions target it; the memory cap applies."""
    if dist.device.type != "cuda":
        return None
    gpu = gpu_facts(dist.device)
    check_gpu_arch(gpu)
    set_extension_arch(gpu)
    cap = cfg.run.memory_cap_gib
    if cap:  # behave like a smaller GPU (e.g. a 16 GB P100 on an 80 GB card): the allocator refuses beyond it
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / gpu.total_memory), dist.device)
    return gpu


def run_env(cfg: "Config", dist: DistInfo) -> RunEnv:
    """Check the GPU (and that it can compile, if asked) and resolve the precision: one line on what cannot run."""
    gpu = check_gpu(cfg, dist)
    if cfg.train.compile:
        check_can_compile(gpu)  # before anything is built
    return RunEnv(dist, resolve_precision(cfg.train.precision, dist.device, gpu), zero_stage(cfg), gpu)

