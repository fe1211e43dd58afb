"""train.compile: torch.compile of a model's towers, in place (parameter names and state dicts unchanged)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .config import ConfigError
from .gpu import COMPILE_MIN_CAPABILITY, GpuFacts


def check_can_compile(gpu: Optional[GpuFacts]) -> None:
    """Refuse, in one line, a GPU that Triton (torch.compile's GPU code generator) has no kernels for."""
    if gpu is not None and tuple(gpu.capability) < COMPILE_MIN_CAPABILITY:
        raise ConfigError(f"train.compile: torch.compile generates Triton kernels, which {gpu.name} (sm_{gpu.sm}) "
                          f"cannot run (sm_{COMPILE_MIN_CAPABILITY[0]}{COMPILE_MIN_CAPABILITY[1]}+ needed): set "
                          "train.compile=false")


def compile_towers(model: nn.Module, gpu: Optional[GpuFacts] = None) -> list[str]:
    """torch.compile every tower the model names (`model.towers`: submodule names), in place; returns them.

    nn.Module.compile keeps the module object, its parameters and its state-dict keys, so DeepSpeed, checkpoints
    and the EMA/momentum copies see the same model. Towers are compiled separately: the glue between them (queues,
    negative sampling, loss bookkeeping) stays eager.
    """
    check_can_compile(gpu)
    names = list(getattr(model, "towers", ()))
    if not names:
        raise ConfigError(f"train.compile: {type(model).__name__} names no towers to compile (a `towers` attribute "
                          "listing its submodules): set train.compile=false")
    for name in names:
        model.get_submodule(name).compile()
    return names
