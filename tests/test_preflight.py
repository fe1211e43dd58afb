"""Start-up checks: GPU architecture vs the PyTorch build, memory estimate against hand-computed bytes."""
import pytest
from torch import nn

from framework.preflight import CUDA_CONTEXT_BYTES, PreflightError, check_gpu_arch, estimate_memory

CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]


def arch(cap, archs, name="Tesla P100-PCIE-16GB"):
    return dict(capability=lambda i: cap, arch_list=lambda: archs, name=lambda i: name)


def test_p100_on_a_cuda128_build_is_refused_with_the_build_to_install():
    with pytest.raises(PreflightError) as e:
        check_gpu_arch(0, **arch((6, 0), CU128))
    assert "Tesla P100-PCIE-16GB is sm_60" in str(e.value) and "cu126" in str(e.value)


def test_supported_gpus_pass():
    check_gpu_arch(0, **arch((6, 0), CU126))  # P100 on a CUDA 12.6 build
    check_gpu_arch(0, **arch((7, 5), CU128, "Tesla T4"))
    check_gpu_arch(0, **arch((8, 9), CU126, "L4"))  # sm_89 runs sm_86 binaries (same major)
    check_gpu_arch(0, **arch((12, 1), CU128, "future"))  # PTX compute_120 JIT-compiles forward


def test_memory_estimate_by_hand():
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10))
    model[1].weight.requires_grad_(False)  # 10,000 frozen
    trainable = 1000 * 1000 + 1000 + 10
    est = estimate_memory(model, "fp16", zero_stage=0, fp32_params=0, teacher_params=trainable + 10_000,
                          activation_bytes=123, cuda_context=True)
    assert est.parts["weights"] == 2 * (trainable + 10_000)
    assert est.parts["gradients"] == 2 * trainable
    assert est.parts["optimizer (Adam + fp32 master)"] == 12 * trainable
    assert est.parts["EMA teacher (fp32)"] == 4 * (trainable + 10_000)
    assert est.total == 2 * (trainable + 10_000) + 2 * trainable + 12 * trainable + 4 * (trainable + 10_000) \
        + 123 + CUDA_CONTEXT_BYTES
    fp32 = estimate_memory(model, "fp32", zero_stage=2, world_size=2, cuda_context=False)
    assert fp32.parts["gradients"] == 4 * trainable / 2 and fp32.parts["optimizer (Adam)"] == 8 * trainable / 2
    assert fp32.parts["weights"] == 4 * (trainable + 10_000)  # only ZeRO-3 partitions weights
    mixed = estimate_memory(model, "bf16", zero_stage=0, fp32_params=10_000, cuda_context=False)
    assert mixed.parts["weights"] == 2 * trainable + 4 * 10_000  # fp32 momentum copies stay 4 bytes
    assert "activations not estimated" in mixed.table()
