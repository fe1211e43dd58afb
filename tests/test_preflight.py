"""Start-up checks: GPU architecture vs the PyTorch build, memory estimate against hand-computed bytes."""
import pytest
import torch
from torch import nn

from framework.gpu import GpuFacts
from framework.preflight import (
    CUDA_CONTEXT_BYTES,
    PreflightError,
    check_gpu_arch,
    estimate_memory,
)
from tests.conftest import GPUS, ROOT, fake_gpu

CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]


def gpu(kind: str = "P100", cap=None, name=None) -> GpuFacts:
    n, major, minor, memory = GPUS[kind]
    return GpuFacts(name or n, cap or (major, minor), memory)


def test_p100_on_a_cuda128_build_is_refused_with_the_build_to_install():
    with pytest.raises(PreflightError) as e:
        check_gpu_arch(gpu("P100"), CU128)
    assert "Tesla P100-PCIE-16GB is sm_60" in str(e.value) and "cu126" in str(e.value)


def test_supported_gpus_pass():
    check_gpu_arch(gpu("P100"), CU126)  # P100 on a CUDA 12.6 build
    check_gpu_arch(gpu("T4"), CU128)
    check_gpu_arch(gpu("A100", cap=(8, 9), name="L4"), CU126)  # sm_89 runs sm_86 binaries (same major)
    check_gpu_arch(gpu("H200", cap=(12, 1), name="future"), CU128)  # PTX compute_120 JIT-compiles forward


def test_gpu_facts_are_read_from_the_device_properties(monkeypatch):
    from framework.gpu import gpu_facts

    fake_gpu(monkeypatch, "P100")
    facts = gpu_facts(torch.device("cuda", 0))
    assert facts == GpuFacts("Tesla P100-PCIE-16GB", (6, 0), GPUS["P100"][3])
    assert not facts.has_bf16 and not facts.has_tensor_cores and facts.arch == "6.0" and facts.sm == 60
    assert gpu("T4").has_tensor_cores and not gpu("T4").has_bf16 and not gpu("V100").has_bf16
    assert gpu("A100").has_bf16 and gpu("H200").has_bf16


@pytest.mark.parametrize("kind, auto", [("P100", "fp16"), ("T4", "fp16"), ("V100", "fp16"), ("A100", "bf16"),
                                        ("H200", "bf16")])
def test_auto_precision_follows_compute_capability(monkeypatch, kind, auto):
    """torch says bf16 is supported on every one of these GPUs; only capability >= 8.0 computes in bf16."""
    from framework.run_env import PrecisionError, resolve_precision

    fake_gpu(monkeypatch, kind)
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda).name == auto
    assert resolve_precision("fp16", cuda).dtype == torch.float16  # fp16 runs everywhere (loss scaling)
    if auto == "fp16":
        with pytest.raises(PrecisionError, match=rf"{GPUS[kind][0]} \(compute capability \d\.\d\) has no native "
                                                 "bf16 .*use train.precision=fp16 or auto"):
            resolve_precision("bf16", cuda)
    else:
        assert resolve_precision("bf16", cuda).dtype == torch.bfloat16


def test_extensions_are_built_for_the_gpu_in_use_unless_the_user_chose(monkeypatch):
    from framework.gpu import set_extension_arch

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert set_extension_arch(gpu("P100")) == "6.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.0;7.0")
    assert set_extension_arch(gpu("T4")) == "6.0;7.0"


def test_memory_fits_against_the_device_or_the_cap():
    from framework.preflight import GIB, MemoryEstimate, check_fits

    est = MemoryEstimate({"weights": 20 * GIB})
    check_fits(est, None)  # the CPU: nothing to check
    check_fits(est, gpu("H200"))
    with pytest.raises(PreflightError, match="exceeds 95% of the 16.0 GiB cap"):
        check_fits(est, gpu("H200"), cap_bytes=16 * GIB)
    with pytest.raises(PreflightError, match="this GPU's 15.9 GiB"):
        check_fits(est, gpu("P100"))


def test_memory_estimate_by_hand():
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10))
    model[1].weight.requires_grad_(False)  # 10,000 frozen
    trainable = 1000 * 1000 + 1000 + 10
    est = estimate_memory(model, "fp16", zero_stage=0, fp32_params=0, teacher_params=trainable + 10_000,
                          activation_bytes=123, cuda_context=True)
    assert est.parts["weights"] == 2 * (trainable + 10_000)
    assert est.parts["gradients"] == 2 * trainable
    assert est.parts["optimizer (Adam + fp32 master)"] == 12 * trainable
    assert est.parts["fp32 gradient copies (step)"] == 4 * trainable  # DeepSpeed's fp16 step casts them to fp32
    assert est.parts["EMA teacher (fp32)"] == 4 * (trainable + 10_000)
    assert est.total == 2 * (trainable + 10_000) + 2 * trainable + 12 * trainable + 4 * trainable \
        + 4 * (trainable + 10_000) + 123 + CUDA_CONTEXT_BYTES
    fp32 = estimate_memory(model, "fp32", zero_stage=2, world_size=2, cuda_context=False)
    assert fp32.parts["gradients"] == 4 * trainable / 2 and fp32.parts["optimizer (Adam)"] == 8 * trainable / 2
    assert fp32.parts["weights"] == 4 * (trainable + 10_000)  # only ZeRO-3 partitions weights
    mixed = estimate_memory(model, "bf16", zero_stage=0, fp32_params=10_000, cuda_context=False)
    assert mixed.parts["weights"] == 2 * trainable + 4 * 10_000  # fp32 momentum copies stay 4 bytes
    assert "activations not estimated" in mixed.table()
    assert "fp32 gradient copies (step)" not in mixed.parts  # bf16 at ZeRO 0 steps AdamW on the bf16 gradients
    zero2 = estimate_memory(model, "bf16", zero_stage=2, world_size=2, cuda_context=False)
    assert zero2.parts["fp32 gradient copies (step)"] == 4 * trainable / 2  # ZeRO's flat fp32 partition


def test_precision_on_the_cpu():
    from framework.run_env import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu).dtype == torch.float16  # emulated, slow: the CPU tests of the fp16 path


def test_deepspeed_config_derivation():
    import torch

    from framework.build import deepspeed_config
    from framework.run_env import Precision
    from framework.config import ConfigError, config_from_dict

    data = {"recipe": "recipes.toy", "train": {"max_steps": 3, "grad_accum": 4, "clip_grad": 0.5},
            "data": {"batch_size": 16}, "deepspeed": {"zero_optimization": {"stage": 2}}}
    cfg = config_from_dict(data)
    ds = deepspeed_config(cfg, Precision("fp16", torch.float16), world_size=2)
    assert ds["train_batch_size"] == 16 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    assert not ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    bad = config_from_dict({**data, "deepspeed": {"gradient_accumulation_steps": 2}})
    with pytest.raises(ValueError, match="conflicts"):
        deepspeed_config(bad, Precision("fp32", torch.float32), 1)
    with pytest.raises(ConfigError, match="deepspeed: file not found"):
        config_from_dict({**data, "deepspeed": "nope.yaml"}, "x.yaml")


def test_transformer_activation_estimate_by_hand():
    from framework.preflight import transformer_activation_bytes

    # one layer, batch 2, seq 4, hidden 8, 2 heads, fp32: per token (11+3+8)*8 + 2*2*4 = 192 values
    assert transformer_activation_bytes(2, 4, 8, 2, 1, half=False) == 2 * 4 * 192 * 4
    assert transformer_activation_bytes(2, 4, 8, 2, 3, half=True) == 3 * 2 * 4 * 192 * 2
    # checkpointed: 3 layer inputs + one recomputed layer
    assert transformer_activation_bytes(2, 4, 8, 2, 3, half=True, checkpointed=True) == 3 * 2 * 4 * 8 * 2 \
        + 2 * 4 * 192 * 2
    # cross-attention to 5 keys: + (8*8 + 2*2*5) per token and the k/v projections 2*2*5*8
    assert transformer_activation_bytes(2, 4, 8, 2, 1, half=False, cross_seq=5) == \
        (2 * 4 * (192 + 64 + 20) + 2 * 2 * 5 * 8) * 4


def test_a_v100_on_a_cuda128_build_is_told_the_build_to_install():
    with pytest.raises(PreflightError) as e:
        check_gpu_arch(gpu("V100"), CU128)
    assert "V100/sm_70 needs a CUDA 12.6" in str(e.value) and "cu126" in str(e.value)


@pytest.mark.parametrize("script,args", [("evaluate", ["--device", "cuda"]), ("bench/benchmark_model", []),
                                         ("gpu_check", [])])
def test_every_cuda_entry_point_checks_the_build_first(monkeypatch, capsys, script, args):
    """A P100 on a CUDA 12.8 build: each entry point that runs CUDA kernels refuses in one line naming cu126
    (not CUDA's "no kernel image is available" from its first kernel)."""
    from tests.conftest import load_launch

    fake_gpu(monkeypatch, "P100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU128)
    rc = load_launch(script).main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "sm_60" in err[-1] and "cu126" in err[-1], err[-5:]


def test_disk_check_refuses_or_warns_in_one_line(tmp_path, monkeypatch):
    """Free space against run.keep_last (+1 being written) checkpoints of the estimated size."""
    import collections
    import shutil

    from framework.preflight import check_disk, checkpoint_bytes

    model = nn.Linear(1000, 1000)  # 1,001,000 trainable
    assert checkpoint_bytes(model, "fp16") == 1_001_000 * (2 + 12)
    assert checkpoint_bytes(model, "fp32", teacher_params=10) == 1_001_000 * 12 + 40
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100e9, 0, 10e9))
    assert check_disk(tmp_path / "not" / "yet", 2e9, keep_last=3) is None  # 4 x 2 GB fit in 10 GB
    warning = check_disk(tmp_path, 4.4e9, keep_last=3)  # DAPT at BLIP-base, fp16
    assert warning.startswith("warning:") and "run.keep_last=3 needs ~4 x 4.4 GB" in warning and "\n" not in warning
    assert check_disk(tmp_path, 4.4e9, keep_last=3, existing=2) is None  # 2 of the 4 are already on disk
    with pytest.raises(PreflightError, match=r"10.0 GB free, less than one checkpoint \(~12.6 GB estimated\)"):
        check_disk(tmp_path, 12.6e9, keep_last=1)


def test_train_refuses_a_disk_without_room_for_one_checkpoint(tmp_path, monkeypatch, capsys, one_rank):
    import collections
    import shutil

    from recipes.toy import make_shards
    from tests.conftest import load_launch

    make_shards(tmp_path / "shards", 16, 2)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100e9, 100e9 - 1000, 1000))  # 1 kB free
    rc = load_launch("train").main(["--recipe", str(ROOT / "recipes" / "toy" / "toy.yaml"),
                                    f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "less than one checkpoint" in err[-1], err[-5:]
    assert not (tmp_path / "run").exists()  # refused before anything was written
