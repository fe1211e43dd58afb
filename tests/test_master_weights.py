"""framework.master_weights on DeepSpeed's real fp16 engine (CPU, world of one): after a step at an lr too small to
move the half weights, the EMA teacher and MedBLIP's momentum encoders move toward the fp32 masters, which did move;
`temp` is clamped in its master. Reading the half weights instead fails these tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from framework import deepspeed_patches
from framework.build import build_deepspeed
from framework.run_env import resolve_precision, run_env
from framework.config import config_from_dict
from framework.distributed import DistInfo
from framework.ema import EMATeacher
from framework.master_weights import MasterClamp, MasterWeights
from framework.progress import Progress
from recipes.medblip import pretrain
from tests.test_medblip_model import CAPTIONS

LR = 4e-7  # an AdamW step of ~4e-7: below half an fp16 ulp of weights ~0.1-1, so only the fp32 master moves


@pytest.fixture
def cpu_fp16(one_rank, monkeypatch):
    """The CPU accelerator accepts fp16 for this test (as allow_fp16 makes it where oneDNN has no fp16 kernels)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)


def toy_engine(student: nn.Module, zero: int, precision: str = "fp16"):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 8},
              "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": zero},
              "steps_per_print": 10 ** 9}
    ds, _, _, _ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(student.parameters(), lr=LR,
                                                                                  weight_decay=0), config=config)
    deepspeed_patches.patch_engine(ds)  # as framework.build does
    return ds


def step(ds) -> None:
    x = torch.linspace(-1, 1, 8).reshape(2, 4).to(next(ds.module.parameters()).dtype)
    ds.backward(ds(x).float().pow(2).mean())
    ds.step()


def hand_ema(before: torch.Tensor, source: torch.Tensor, decay: float) -> torch.Tensor:
    """decay * before + (1 - decay) * source, in the order framework.ema.ema_update_ computes it."""
    return before.clone().mul_(decay).add_(source.float(), alpha=1.0 - decay)


@pytest.mark.parametrize("zero,kind", [(0, "FP16_UnfusedOptimizer"), (1, "DeepSpeedZeroOptimizer")])
def test_ema_teacher_follows_the_fp32_master(cpu_fp16, zero, kind):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ema = EMATeacher(student, tau_start=0.5, tau_end=0.5, tau_schedule="constant")
    ds = toy_engine(student, zero)
    masters = MasterWeights(ds)
    assert masters.reads_masters and masters.source == f"fp32 masters ({kind}{', hp mapping' if zero else ''})"
    ema.use_master_weights(masters)
    ema.setup(ds.module, torch.float16, torch.device("cpu"), Progress())
    params = list(student.parameters())
    half_before = [p.detach().clone() for p in params]
    step(ds)
    master = [m.clone() for m in masters.of(params)]
    assert all(m.dtype == torch.float32 for m in master)
    assert all(torch.equal(p, h) for p, h in zip(params, half_before))  # the half weights did not move ...
    assert all(not torch.equal(m, p.float()) for m, p in zip(master, params))  # ... their masters did
    before = [t.detach().clone() for t in ema.teacher.parameters()]
    ema.after_optimizer_step(1)
    for t, b, m, p in zip(ema.teacher.parameters(), before, master, params):
        assert torch.equal(t, hand_ema(b, m, 0.5))
        assert not torch.equal(t, hand_ema(b, p, 0.5))  # what following the half weights gives


def test_fp32_training_reads_the_module_and_bf16_at_zero0_its_masters(one_rank):
    """fp32: the parameters are the masters. bf16 at ZeRO 0: DeepSpeed 0.19.8 builds FP16_UnfusedOptimizer, which
    keeps fp32 masters too."""
    torch.manual_seed(0)
    fp32 = MasterWeights(toy_engine(nn.Linear(4, 1), 0, "fp32"))
    params = list(fp32.params)
    assert not fp32.reads_masters and "fp32 training" in fp32.source
    assert all(a is b for a, b in zip(fp32.of(params), params))
    bf16 = MasterWeights(toy_engine(nn.Linear(4, 1), 0, "bf16"))
    assert bf16.reads_masters and bf16.source == "fp32 masters (FP16_UnfusedOptimizer)"
    assert all(m.dtype == torch.float32 and m is not p for m, p in zip(bf16.of(bf16.params), bf16.params))


def test_a_frozen_parameter_is_its_own_source(cpu_fp16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    masters = MasterWeights(toy_engine(model, 1))
    frozen, trained = model[0].weight, model[1].weight
    m_frozen, m_trained = masters.of([frozen, trained])
    assert m_frozen is frozen and m_trained.dtype == torch.float32 and m_trained.shape == trained.shape


def test_master_clamp_clamps_the_master_the_next_step_starts_from(cpu_fp16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ds = toy_engine(model, 0)
    clamp = MasterClamp("bias", model[2].bias, -0.25, 0.25)
    clamp.use_master_weights(MasterWeights(ds))
    (master,) = clamp.masters.of([model[2].bias])
    with torch.no_grad():
        master.fill_(0.75)
    assert clamp.after_optimizer_step(1) == {}
    assert float(master) == 0.25
    step(ds)  # DeepSpeed copies the master into the module weight: from the clamped value (~4e-7 away)
    assert abs(float(model[2].bias) - 0.25) < 1e-3


@pytest.mark.parametrize("zero", [0, 1])
def test_medblip_momentum_follows_the_master_and_temp_is_clamped_there(cpu_fp16, zero):
    cfg = config_from_dict({
        "recipe": "recipes.medblip.pretrain",
        "train": {"max_steps": 2, "lr": LR, "warmup_steps": 0, "weight_decay": 0.0, "precision": "fp16", "seed": 0},
        "data": {"batch_size": 4},
        "model": {"preset": "tiny", "queue_size": 4, "embed_dim": 16, "momentum": 0.5},
        "image": {"size": 32},
        "deepspeed": {"zero_optimization": {"stage": zero}, "fp16": {"initial_scale_power": 8}},
    })
    task = pretrain.build(cfg, run_env(cfg, DistInfo(0, 1, 0, torch.device("cpu"))))
    model = task.model
    prec = resolve_precision("fp16", torch.device("cpu"))
    engine = build_deepspeed(cfg, task, prec, 2, 1)
    for m in model.fp32_modules():
        m.float()
    (plugin,) = task.plugins
    masters = MasterWeights(engine)
    assert masters.reads_masters
    plugin.use_master_weights(masters)
    progress = Progress()
    plugin.setup(engine.module, prec.dtype, torch.device("cpu"), progress)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), **model.tokenize(CAPTIONS)}
    engine.backward(sum(engine(batch)["losses"].values()))
    engine.step()
    progress.step = 1  # what the Trainer does after the optimizer step
    plugin.after_optimizer_step(1)
    online, copy = model.text_proj.weight, model.text_proj_m.weight  # a trained weight and its momentum copy
    (master,) = masters.of([online])
    assert master.dtype == torch.float32 and not torch.equal(master, online.float())
    expected, from_half = hand_ema(copy, master, 0.5), hand_ema(copy, online, 0.5)
    assert model.momentum_update_for_step()  # the next step's update, as its first forward runs it
    assert torch.equal(copy, expected) and not torch.equal(copy, from_half)

    (temp,) = masters.of([model.temp])
    with torch.no_grad():
        temp.fill_(0.75)  # an optimizer step past BLIP's bound (0.5)
    progress.step = 2
    plugin.after_optimizer_step(2)
    assert float(temp) == 0.5 and float(model.temp) <= 0.5
