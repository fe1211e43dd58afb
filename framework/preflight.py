"""Start-up checks: a PyTorch build that can run this GPU, and a memory estimate printed before training."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import distill_settings
from .gpu import GpuFacts, gpu_facts

GIB = 1024 ** 3
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + cuBLAS workspaces, measured ~0.4-0.6 GiB on recent drivers


class PreflightError(RuntimeError):
    """The run cannot work on this machine as configured; the message says what to change."""


def check_gpu_arch(gpu: GpuFacts, arch_list: Optional[list[str]] = None) -> None:
    """Refuse a GPU whose compute capability has no kernels in this PyTorch build (e.g. P100 + CUDA 12.8 build).

    arch_list: the build's torch.cuda.get_arch_list() (default: this build's).
    """
    have = torch.cuda.get_arch_list() if arch_list is None else arch_list
    major, sm = gpu.capability[0], gpu.sm
    sass = {int(a[3:]) for a in have if a.startswith("sm_") and a[3:].isdigit()}
    ptx = {int(a[8:]) for a in have if a.startswith("compute_") and a[8:].isdigit()}
    # A binary kernel runs on the same major version at >= minor; PTX is JIT-compiled for any newer GPU.
    ok = any(s // 10 == major and s <= sm for s in sass) or any(p <= sm for p in ptx)
    if not ok:
        # PyTorch's CUDA 12.8+ wheels dropped Pascal (P100, sm_60) and Volta (V100, sm_70): both need a cu126 build
        hint = (f" A {'P100' if sm < 70 else 'V100'}/sm_{sm} needs a CUDA 12.6 (or older) build, e.g. "
                "pip install 'torch<2.8' --index-url https://download.pytorch.org/whl/cu126" if sm < 75 else "")
        raise PreflightError(f"{gpu.name} is sm_{sm}, but this PyTorch {torch.__version__} "
                             f"(CUDA {torch.version.cuda}) ships kernels for {', '.join(have) or 'no GPU'}.{hint}")


def check_cuda_device(device: Union[torch.device, str, int]) -> None:
    """check_gpu_arch for `device` if it is a CUDA device (every entry point that runs kernels calls it first)."""
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type == "cuda":
        check_gpu_arch(gpu_facts(device))


@dataclass
class MemoryEstimate:
    """Per-GPU bytes by category (model states, extra fp32 copies, activations, CUDA context)."""
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [f"  {k:<34} {v / GIB:7.2f} GiB" for k, v in self.parts.items()]
        rows.append(f"  {'total (estimate)':<34} {self.total / GIB:7.2f} GiB")
        return "\n".join(["memory per GPU:"] + rows + [f"  note: {n}" for n in self.notes])


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared tensors are counted once (as Module.parameters() yields them)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


def estimate_memory(model: nn.Module, precision: str, zero_stage: int, world_size: int = 1,
                    fp32_params: int = 0, teacher_params: int = 0, activation_bytes: Optional[int] = None,
                    offload_optimizer: bool = False, cuda_context: bool = True,
                    fp32_trainable: int = 0) -> MemoryEstimate:
    """Estimate peak GPU memory for DeepSpeed training of `model` (mixed precision: half weights + fp32 master).

    fp32_params: parameters kept in fp32 inside the module (momentum encoders, a Q-Former kept fp32 under fp16), of
    which fp32_trainable train (their gradients are fp32 too); teacher_params: an fp32 EMA copy.
    """
    trainable, frozen = count_params(model)
    half = precision in ("fp16", "bf16")
    w = 2 if half else 4
    shard = lambda n, stage: n / world_size if zero_stage >= stage else n  # noqa: E731
    est = MemoryEstimate()
    est.parts["weights"] = int(shard((trainable + frozen - fp32_params) * w + fp32_params * 4, 3))
    est.parts["gradients"] = int(shard((trainable - fp32_trainable) * w + fp32_trainable * 4, 2))
    optim = trainable * (8 + (4 if half else 0))  # Adam moments (+ fp32 master weights in mixed precision)
    est.parts["optimizer (Adam + fp32 master)" if half else "optimizer (Adam)"] = \
        0 if offload_optimizer else int(shard(optim, 1))
    if half and (precision == "fp16" or zero_stage >= 1) and not offload_optimizer:
        # the optimizer step casts the half gradients to fp32 beside the master weights (DeepSpeed's ZeRO-0 fp16
        # optimizer one tensor per parameter, ZeRO 1/2 one flat partition): ~0.94 GiB at BLIP-base
        est.parts["fp32 gradient copies (step)"] = int(shard((trainable - fp32_trainable) * 4, 1))
    if teacher_params:
        est.parts["EMA teacher (fp32)"] = teacher_params * 4
    if activation_bytes is not None:
        est.parts["activations"] = int(activation_bytes)
    else:
        est.notes.append("activations not estimated (the recipe gives no estimate)")
    if cuda_context:
        est.parts["CUDA context + workspace"] = CUDA_CONTEXT_BYTES
    if world_size == 1 and zero_stage > 0 and not offload_optimizer:
        est.notes.append("ZeRO stages 1-3 save nothing on one GPU; only offload does")
    return est


def estimate_for_task(cfg: Any, task: Any, precision: str, world_size: int, cuda: bool = True) -> MemoryEstimate:
    """The estimate for a recipe's Task as configured: ZeRO stage, offload, fp32 copies (task.fp32_modules), the EMA
    teacher of self-distillation (its own tensors: task.frozen_modules are shared), activations
    (task.activation_bytes)."""
    model = task.model
    fp32 = sum(p.numel() for m in task.fp32_modules for p in m.parameters())
    fp32_trainable = sum(p.numel() for m in task.fp32_modules for p in m.parameters() if p.requires_grad)
    shared = sum(p.numel() for m in task.frozen_modules for p in m.parameters())
    zero = cfg.deepspeed.get("zero_optimization", {})
    teacher = sum(count_params(model)) - shared if distill_settings(cfg) else 0
    act = task.activation_bytes(cfg.data.batch_size, precision) if task.activation_bytes else None
    est = estimate_memory(model, precision, int(zero.get("stage", 0)), world_size, fp32_params=fp32,
                          teacher_params=teacher, activation_bytes=act, offload_optimizer="offload_optimizer" in zero,
                          cuda_context=cuda, fp32_trainable=fp32_trainable)
    est.notes.insert(0, f"{precision}, ZeRO stage {zero.get('stage', 0)}, micro-batch {cfg.data.batch_size}, "
                        f"{world_size} rank(s)")
    return est


def checkpoint_bytes(model: nn.Module, precision: str, teacher_params: int = 0) -> int:
    """A checkpoint's estimated size on disk: the module (half or fp32), the optimizer (fp32 master weights under
    fp16/bf16, Adam's two moments) and an EMA teacher (fp32, in the client state)."""
    trainable, frozen = count_params(model)
    half = precision in ("fp16", "bf16")
    return (trainable + frozen) * (2 if half else 4) + trainable * (12 if half else 8) + teacher_params * 4


def check_disk(run_dir: Path, one_checkpoint: int, keep_last: int, existing: int = 0) -> Optional[str]:
    """Free space against the checkpoints this run will keep (keep_last, plus the one being written before the
    oldest is pruned): refuse if not even one fits, return a one-line warning if they do not all fit."""
    import shutil

    probe = Path(run_dir).resolve()
    while not probe.exists():  # the run directory may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    size = f"{one_checkpoint / 1e9:.1f} GB"
    if free < one_checkpoint:
        raise PreflightError(f"{probe} has {free / 1e9:.1f} GB free, less than one checkpoint (~{size} estimated): "
                             "free space or set run.dir on a larger disk")
    count = keep_last + 1 - existing if keep_last > 0 else 1
    if free < count * one_checkpoint:
        return (f"warning: {probe} has {free / 1e9:.1f} GB free; run.keep_last={keep_last} needs ~{count} x {size} "
                f"more: a later save will fail (lower run.keep_last or free space)")
    return None


def check_fits(est: MemoryEstimate, gpu: Optional[GpuFacts], margin: float = 0.95,
               cap_bytes: Optional[int] = None) -> None:
    """Raise if the estimate exceeds the GPU's memory, or `cap_bytes` when set (with a margin for fragmentation)."""
    if gpu is None:
        return
    total = min(gpu.total_memory, cap_bytes) if cap_bytes else gpu.total_memory
    if est.total > margin * total:
        what = f"the {total / GIB:.1f} GiB cap (run.memory_cap_gib)" if cap_bytes and cap_bytes < gpu.total_memory \
            else f"this GPU's {total / GIB:.1f} GiB"
        raise PreflightError(f"estimated {est.total / GIB:.1f} GiB per GPU exceeds {margin:.0%} of {what}: lower "
                             "data.batch_size (raise train.grad_accum to keep the global batch), enable activation "
                             "checkpointing, or offload the optimizer")


def transformer_activation_bytes(batch: int, seq: int, hidden: int, heads: int, layers: int, *, half: bool,
                                 checkpointed: bool = False, cross_seq: int = 0, mlp_ratio: float = 4.0) -> int:
    """Activations a transformer stack keeps for backward (Korthikanti et al. 2022, without dropout masks).

    Per layer and token: the attention block keeps ~11h values (input, q, k, v, output projection input,
    norms) and the MLP ~(3 + 2*mlp_ratio)h; attention keeps 2*heads*seq scores+probs per token. Cross-attention
    to `cross_seq` keys adds its own q/k/v/out (~8h), scores over cross_seq and the key/value projections.
    With activation checkpointing only each layer's input survives, plus one layer recomputed in backward.
    """
    width = 2 if half else 4
    per_token = (11 + 3 + 2 * mlp_ratio) * hidden + 2 * heads * seq
    if cross_seq:
        per_token += 8 * hidden + 2 * heads * cross_seq
    layer = batch * seq * per_token * width
    if cross_seq:
        layer += 2 * batch * cross_seq * hidden * width  # key/value projections of the encoder states
    if checkpointed:
        return int(layers * batch * seq * hidden * width + layer)
    return int(layers * layer)
