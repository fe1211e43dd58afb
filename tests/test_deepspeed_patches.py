"""What each patch in framework/deepspeed_patches.py works around is still DeepSpeed's behaviour: a test here fails
when a new DeepSpeed changes it (then drop or adapt the patch; docs/tests.md, "A new DeepSpeed")."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from framework import deepspeed_patches


def engine(precision: str = "fp16", zero: int = 0, clip: float = 0.0, patch: bool = False):
    """A two-layer model under DeepSpeed with torch's AdamW (as the framework builds it), on the CPU."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
              "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 8},
              "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": zero},
              "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if patch:
        deepspeed_patches.patch_engine(ds)
    return ds


@pytest.fixture
def cpu_fp16(one_rank, monkeypatch):
    """The CPU accelerator accepts fp16 for this test (as allow_fp16 makes it where oneDNN has no fp16 kernels)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)


def loss_of(ds) -> torch.Tensor:
    x = torch.linspace(-1, 1, 8).reshape(2, 4).to(next(ds.module.parameters()).dtype)
    return ds(x).float().pow(2).mean()


def grads(ds) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in ds.module.parameters()])


def test_cuda_refuses_fp16_on_6x_unless_allowed(monkeypatch):
    """allow_fp16: DeepSpeed's CUDA accelerator says no to fp16 on compute capability 6.x without the variable."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 0))
    monkeypatch.delenv("DS_ALLOW_DEPRECATED_FP16", raising=False)
    accelerator = CUDA_Accelerator.__new__(CUDA_Accelerator)  # no __init__: it would load CUDA libraries
    assert not accelerator.is_fp16_supported()
    monkeypatch.setenv("DS_ALLOW_DEPRECATED_FP16", "1")
    assert accelerator.is_fp16_supported()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.delenv("DS_ALLOW_DEPRECATED_FP16")
    assert accelerator.is_fp16_supported()


def test_the_sanity_check_asks_the_accelerator_about_fp16(one_rank, monkeypatch):
    """allow_fp16 on the CPU: DeepSpeed's own check refuses fp16 when the accelerator says no."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)
    with pytest.raises(ValueError, match="Type fp16 is not supported on your device"):
        deepspeed.initialize(model=nn.Linear(2, 1), optimizer=torch.optim.AdamW(nn.Linear(2, 1).parameters()),
                             config={"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}})


def test_zero0_fp16_does_not_scale_the_loss(cpu_fp16):
    """scale_loss_at_zero0: DeepSpeed's ZeRO-0 fp16 optimizer (FP16_UnfusedOptimizer with torch's AdamW) gets
    unscaled gradients from engine.backward, has no `cur_scale`, and steps AdamW once at start-up."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    ds = engine()
    assert isinstance(ds.optimizer, FP16_UnfusedOptimizer) and not hasattr(ds.optimizer, "cur_scale")
    assert ds.optimizer.loss_scale == 256
    assert all(s["step"] == 1 for s in ds.optimizer.optimizer.state.values())  # forget_the_zero_gradient_step
    ds.backward(loss_of(ds))
    unscaled = grads(ds)
    ds.zero_grad()
    patched = engine(patch=True)
    assert not patched.optimizer.optimizer.state  # forgotten: AdamW starts at step 0, as under fp32
    patched.backward(loss_of(patched))
    assert torch.allclose(grads(patched), 256 * unscaled, rtol=1e-2, atol=1e-3)
    patched.step()
    assert all(s["step"] == 1 for s in patched.optimizer.optimizer.state.values())


def test_zero1_fp16_scales_the_loss_itself(cpu_fp16):
    """scale_loss_at_zero0 stays away from ZeRO: its optimizer scales the loss in engine.backward already."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    ds = engine(zero=1, patch=True)
    assert isinstance(ds.optimizer, DeepSpeedZeroOptimizer) and ds.optimizer.cur_scale == 256
    assert "scaled_backward" not in getattr(ds.backward, "__qualname__", "")


def test_fp32_clipping_drops_the_norm(one_rank):
    """keep_fp32_grad_norm: on the plain fp32 path DeepSpeed clips (clip_fp32_gradients) but reports no norm."""
    ds = engine("fp32", clip=1.0)
    assert hasattr(ds, "clip_fp32_gradients")
    ds.backward(loss_of(ds))
    ds.step()
    assert ds.get_global_grad_norm() is None
    patched = engine("fp32", clip=1.0, patch=True)
    patched.backward(loss_of(patched))
    patched.step()
    assert patched.get_global_grad_norm() > 0


def test_zero0_reduces_gradients_through_allreduce_gradients(one_rank, monkeypatch):
    """skip_allreduce_in_a_world_of_one: DeepSpeed's ZeRO-0 engine calls engine.allreduce_gradients at the
    boundary, even alone."""
    ds = engine("fp32")
    calls = []
    original = ds.allreduce_gradients
    monkeypatch.setattr(ds, "allreduce_gradients", lambda *a, **k: calls.append(1) or original(*a, **k))
    ds.backward(loss_of(ds))
    assert calls == [1]


def test_the_torch_backend_builds_its_shm_op_through_build_shm_op():
    """skip_shared_memory_allreduce: DeepSpeed's TorchBackend gets its CPU shared-memory op from
    deepspeed.comm.torch.build_shm_op, and treats None as none."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    assert callable(ds_torch.build_shm_op)
    source = inspect.getsource(ds_torch.TorchBackend.__init__)
    assert "build_shm_op()" in source


def test_checkpoint_reads_go_through_the_torch_engines_load(one_rank, tmp_path, monkeypatch):
    """torch_checkpoint_engine: a plain engine's checkpoint engine is TorchCheckpointEngine, and DeepSpeed reads
    the model states through its `load(path, map_location=...)`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ds = engine("fp32")
    assert deepspeed_patches.torch_checkpoint_engine(ds) is ds.checkpoint_engine
    assert type(ds.checkpoint_engine) is TorchCheckpointEngine
    ds.save_checkpoint(str(tmp_path), tag="t")
    reads = []
    load = ds.checkpoint_engine.load
    monkeypatch.setattr(ds.checkpoint_engine, "load",
                        lambda path, map_location=None: reads.append(str(path)) or load(path, map_location=map_location))
    ds.load_checkpoint(str(tmp_path), tag="t")
    assert any(r.endswith("mp_rank_00_model_states.pt") for r in reads), reads


def test_bf16_accumulates_in_fp32_at_zero1_only(one_rank):
    """framework.build.deepspeed_config asks for fp32 gradient accumulation under bf16 at ZeRO 1, where DeepSpeed
    builds its BF16_Optimizer for it; at ZeRO 0 DeepSpeed refuses the mix (so the framework leaves it bf16)."""
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from framework.build import deepspeed_config
    from framework.run_env import Precision
    from framework.config import config_from_dict

    for zero, expected in ((0, None), (1, {"grad_accum_dtype": "fp32"}), (2, None)):
        cfg = config_from_dict({"recipe": "recipes.toy", "train": {"max_steps": 1},
                                "deepspeed": {"zero_optimization": {"stage": zero}}})
        assert deepspeed_config(cfg, Precision("bf16", torch.bfloat16), 1).get("data_types") == expected
    ds = engine("bf16", zero=1)
    assert not isinstance(ds.optimizer, BF16_Optimizer)  # DeepSpeed's default at ZeRO 1: bf16 accumulation
    model = nn.Linear(2, 1)
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
              "data_types": {"grad_accum_dtype": "fp32"}}
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    assert isinstance(ds.optimizer, BF16_Optimizer)
    with pytest.raises(NotImplementedError, match="unsupported mix"):
        deepspeed.initialize(model=nn.Linear(2, 1), optimizer=torch.optim.AdamW(nn.Linear(2, 1).parameters()),
                             config={**config, "zero_optimization": {"stage": 0}})


@pytest.mark.parametrize("precision,zero,fp32_accum", [("fp32", 0, False), ("fp32", 1, False), ("fp32", 2, False),
                                                       ("fp32", 3, False), ("bf16", 0, False), ("bf16", 1, True),
                                                       ("bf16", 2, False)])
def test_a_flagged_step_is_skipped_like_an_fp16_overflow(one_rank, precision, zero, fp32_accum):
    """skip_flagged_steps: under fp32/bf16 DeepSpeed skips a step only when its optimizer reports `overflow` (then
    engine.skipped_steps + 1, no lr-scheduler step). A flagged step (its gradients finite) must leave parameters,
    optimizer state and schedule as they were and drop its gradients: the step after it then lands exactly where an
    engine that never saw the flagged step lands."""
    import deepspeed

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
                  "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": zero},
                  "steps_per_print": 10 ** 9, **({"data_types": {"grad_accum_dtype": "fp32"}} if fp32_accum else {})}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        deepspeed_patches.patch_engine(ds)
        return ds, optimizer

    def params(ds) -> list[torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(ds.module.parameters())):  # whole again under ZeRO 3
            return [p.detach().float().clone() for p in ds.module.parameters()]

    def micro_batches(ds, scale: float = 1.0) -> None:
        for _ in range(2):
            ds.backward(loss_of(ds) * scale)
            ds.step()

    def state(optimizer) -> list[dict[str, torch.Tensor]]:
        return [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]

    ds, optimizer = make()
    micro_batches(ds)  # a first real step: AdamW has state
    before, lr, kept = params(ds), ds.get_lr()[0], state(optimizer)
    assert kept and ds.skipped_steps == 0 and ds.global_steps == 1
    deepspeed_patches.skip_next_step(ds)
    micro_batches(ds, scale=100.0)  # large, finite gradients: were they kept, the next step would differ
    assert ds.skipped_steps == 1 and ds.global_steps == 2 and ds.get_lr()[0] == lr  # the schedule did not move
    assert all(torch.equal(a, b) for a, b in zip(before, params(ds)))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(kept, state(optimizer)) for k in a)
    micro_batches(ds)
    assert ds.skipped_steps == 1 and ds.global_steps == 3 and ds.get_lr()[0] < lr
    reference, _ = make()
    micro_batches(reference)
    micro_batches(reference)
    assert all(torch.equal(a, b) for a, b in zip(params(reference), params(ds)))
    assert not all(torch.equal(a, b) for a, b in zip(before, params(ds)))


def test_fp16_keeps_its_loss_scaler(cpu_fp16):
    """skip_flagged_steps leaves fp16's optimizers alone: their loss scaler skips overflowing steps itself."""
    ds = engine("fp16", patch=True)
    assert not hasattr(ds.optimizer, "skip_next_step")
