"""What the framework decides about a GPU, decided from one place: its compute capability, name and memory.

`torch.cuda.is_bf16_supported()` is not used: since torch 2.3 it returns True on pre-Ampere GPUs (P100, T4, V100)
because it only checks that a bf16 tensor can be created (emulation), not that the GPU computes in bf16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: native bf16 arithmetic and tensor cores
TENSOR_CORE_MIN_CAPABILITY = (7, 0)  # Volta: fp16 tensor cores (a P100, sm_60, runs fp16 at about the fp32 rate)
COMPILE_MIN_CAPABILITY = (7, 5)  # train.compile: Triton has no kernels for sm_60 (P100) and sm_70 (V100)


@dataclass(frozen=True)
class GpuFacts:
    """One GPU as the framework sees it: name, compute capability (major, minor), total memory in bytes."""

    name: str
    capability: tuple[int, int]
    total_memory: int

    @property
    def sm(self) -> int:
        """Capability as BLIP-era tooling writes it: (6, 0) -> 60."""
        return self.capability[0] * 10 + self.capability[1]

    @property
    def has_bf16(self) -> bool:
        """Native bf16 (capability >= 8.0); older GPUs train in fp16 with dynamic loss scaling."""
        return tuple(self.capability) >= BF16_MIN_CAPABILITY

    @property
    def has_tensor_cores(self) -> bool:
        return tuple(self.capability) >= TENSOR_CORE_MIN_CAPABILITY

    @property
    def arch(self) -> str:
        """The TORCH_CUDA_ARCH_LIST entry for this GPU, e.g. "6.0" for a P100."""
        return f"{self.capability[0]}.{self.capability[1]}"

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.arch}, {self.total_memory / 1024 ** 3:.1f} GiB)"


# Dense peak TFLOPS by GPU name fragment: (fp32 without TF32, fp16/bf16: tensor cores where there are any).
# A P100 has no tensor cores: its fp16 peak is the half2 rate, which PyTorch matmuls rarely reach.
PEAK_TFLOPS = {"P100": (9.3, 18.7), "T4": (8.1, 65.0), "V100": (15.7, 125.0), "A100": (19.5, 312.0),
               "L4": (30.3, 121.0), "A10": (31.2, 125.0), "H100": (67.0, 989.0), "H200": (67.0, 989.0)}


def peak_tflops(gpu: GpuFacts, precision: str) -> Optional[float]:
    """The GPU's dense peak for `precision` (fp32 | fp16 | bf16) from PEAK_TFLOPS, or None for an unknown GPU."""
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in gpu.name), None)
    if peaks is None:
        return None
    return peaks[0] if precision == "fp32" else peaks[1]


def gpu_facts(device: Union[torch.device, int] = 0) -> GpuFacts:
    """Read a GPU's facts from torch.cuda.get_device_properties (the only place the framework asks the driver)."""
    index = device if isinstance(device, int) else (device.index or 0)
    props = torch.cuda.get_device_properties(index)
    return GpuFacts(str(props.name), (int(props.major), int(props.minor)), int(props.total_memory))


def set_extension_arch(facts: GpuFacts) -> str:
    """Compile DeepSpeed's JIT extensions (CPU Adam for optimizer offload, fused ops) for this GPU.

    Without TORCH_CUDA_ARCH_LIST the build targets the toolkit's default list, which on CUDA 12.8+ no longer holds
    sm_60: a P100 needs TORCH_CUDA_ARCH_LIST=6.0. An explicit setting from the user is kept. Returns the value used.
    """
    return os.environ.setdefault("TORCH_CUDA_ARCH_LIST", facts.arch)


def user_device(spec: str, option: str = "--device") -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch.device, or ValueError in one line (a typo, a GPU that is not there)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {spec!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {spec!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {spec}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {spec}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return device
