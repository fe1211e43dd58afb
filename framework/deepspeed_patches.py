"""Every change the framework makes to DeepSpeed's behaviour, in one place, each with a test in
tests/test_deepspeed_patches.py that fails when DeepSpeed's own behaviour changes (see docs/tests.md, "A new
DeepSpeed or transformers").

Written against deepspeed 0.19.x (setup.py pins the range the suite passes with).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

import torch

from .distributed import say
from .gpu import GpuFacts

# ----------------------------------------------------------------------------- fp16 on the device


def allow_fp16(device: torch.device, gpu: Optional[GpuFacts]) -> None:
    """Let DeepSpeed's sanity check accept fp16 where the framework runs it: compute capability 6.x, and the CPU.

    Must run before deepspeed.initialize (its _do_sanity_check asks get_accelerator().is_fp16_supported()).
    """
    if device.type == "cuda" and gpu is not None and gpu.capability[0] < 7:
        # DeepSpeed >= 0.13 calls fp16 on 6.x "deprecated" and refuses it unless this is set; a P100 computes fp16
        # correctly (at about its fp32 rate: no tensor cores), and fp16 is the only half precision it has
        if os.environ.get("DS_ALLOW_DEPRECATED_FP16") != "1":
            os.environ["DS_ALLOW_DEPRECATED_FP16"] = "1"
            say(f"note: {gpu.name} is compute capability {gpu.arch}: set DS_ALLOW_DEPRECATED_FP16=1, without which "
                "DeepSpeed refuses fp16 below 7.0")
    elif device.type == "cpu":
        _allow_fp16_on_the_cpu()


def _allow_fp16_on_the_cpu() -> None:
    """DeepSpeed's CPU accelerator accepts fp16 only where oneDNN has fp16 kernels (recent Xeons); elsewhere torch
    still computes fp16 on the CPU, slowly, which is what the CPU tests of the fp16 path need."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" or accelerator.is_fp16_supported():
        return
    accelerator.is_fp16_supported = lambda: True  # the instance only: the class keeps DeepSpeed's answer
    say("note: fp16 on the CPU is emulated and slow (for testing the fp16 path); train in fp32 or bf16 here")


# ----------------------------------------------------------------------------- the engine, after initialize


def patch_engine(engine: Any) -> None:
    """All per-engine patches, applied right after deepspeed.initialize."""
    scale_loss_at_zero0(engine)
    forget_the_zero_gradient_step(engine)
    keep_fp32_grad_norm(engine)
    skip_allreduce_in_a_world_of_one(engine)
    skip_flagged_steps(engine)


def loss_scale(engine: Any) -> float:
    """The fp16 optimizer's current loss scale (every DeepSpeed fp16 optimizer has `loss_scale`; only ZeRO's
    also has `cur_scale`, which the engine once read and crashed on at ZeRO 0)."""
    return float(engine.optimizer.loss_scale)


def scale_loss_at_zero0(engine: Any) -> None:
    """DeepSpeed's engine.backward multiplies the loss by the loss scale for ZeRO optimizers only, while its ZeRO-0
    fp16 optimizers (FP16_Optimizer, FP16_UnfusedOptimizer) still divide the gradients by it in step(): unpatched,
    AdamW gets gradients 1/scale too small (its epsilon dominates), clipping never engages and nothing protects
    against underflow. Scale the loss as those optimizers' own backward() would."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return
    backward, grad_norm = engine.backward, engine.get_global_grad_norm
    used = {"scale": 1.0}  # the scale this step's gradients carry (step() may grow the optimizer's afterwards)

    def scaled_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        used["scale"] = float(engine.optimizer.loss_scale or 1.0)
        return backward(loss.float() * used["scale"], *args, **kwargs)

    def true_grad_norm() -> Optional[float]:
        """These optimizers keep the norm of the scaled gradients (they clip at norm / scale): report the true one."""
        norm = grad_norm()
        return None if norm is None else norm / used["scale"]

    engine.backward = scaled_backward
    engine.get_global_grad_norm = true_grad_norm


def forget_the_zero_gradient_step(engine: Any) -> None:
    """DeepSpeed's ZeRO-0 fp16 optimizers create the inner optimizer's state by stepping it once with zero gradients
    (initialize_optimizer_states): AdamW's step count starts at 1, so its bias correction makes the first real step
    0.74x as long as fp32's (the second 0.87x...). Drop that state: AdamW creates it afresh at the first real step,
    as under fp32 and ZeRO. (The zero step's decoupled weight decay, a factor 1 - lr*wd at the warm-up rate, stays.)"""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        engine.optimizer.optimizer.state.clear()


def keep_fp32_grad_norm(engine: Any) -> None:
    """DeepSpeed reports the clipped gradient norm (get_global_grad_norm) from its fp16/bf16/ZeRO optimizers only;
    on the plain fp32 path it computes the norm to clip, in a Python loop, and drops it. There the gradients are
    already averaged over ranks (identical everywhere): clip with torch's multi-tensor kernel and keep the norm."""
    def clip_fp32_gradients() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, engine.gradient_clipping(), foreach=True)

    if hasattr(engine, "clip_fp32_gradients") and engine.mpu is None:
        engine.clip_fp32_gradients = clip_fp32_gradients


def skip_allreduce_in_a_world_of_one(engine: Any) -> None:
    """Alone, DeepSpeed's ZeRO-0 engine still all-reduces every gradient with itself: it copies all of them into one
    flat buffer, reduces it over one rank and copies them back (two passes over the gradients and a buffer of their
    size per step, for nothing). Keep only what that does to the gradients: a trainable parameter that got none gets
    zeros (as DeepSpeed gives every rank's bucket), so AdamW treats it as before."""
    alone = torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    if not alone or engine.zero_optimization() or hasattr(engine.optimizer, "get_grads_for_reduction"):
        return  # several ranks, ZeRO's own reductions, or the bf16 optimizer's fp32 gradient buffers

    def zero_fill_missing_gradients(*_args: Any, **_kwargs: Any) -> None:
        if not engine.is_gradient_accumulation_boundary():  # DeepSpeed reduces at the boundary only
            return
        for p in engine.module.parameters():
            if p.requires_grad and p.grad is None and p.numel():
                p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = zero_fill_missing_gradients


def skip_next_step(engine: Any) -> None:
    """Make the engine's next optimizer step (engine.step() at an accumulation boundary) a skipped one, as fp16's
    loss scaler skips an overflow: gradients dropped, parameters and optimizer state unchanged, the lr schedule not
    advanced, engine.skipped_steps + 1 (engine.global_steps still counts it). Needs skip_flagged_steps."""
    engine.optimizer.skip_next_step = True


def skip_flagged_steps(engine: Any) -> None:
    """Let the framework skip a step whose losses were non-finite (skip_next_step) under fp32/bf16, where DeepSpeed
    has no loss scaler to do it: DeepSpeed skips a step only when its optimizer says `overflow` (the engine then
    counts it in skipped_steps and leaves the lr scheduler alone). On a flagged step each optimizer takes its own
    overflow path (ZeRO 1/2/3, BF16_Optimizer, bf16's FP16_(Unfused)Optimizer at ZeRO 0: they clear their gradient
    buffers) or, a plain torch optimizer at ZeRO 0, does not step (the engine zeroes its gradients after step()).
    fp16's optimizers keep their loss scaler. Every rank must flag the same steps (the caller all-reduces)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if engine.fp16_enabled() or not hasattr(opt, "step"):
        return
    step = opt.step
    opt.skip_next_step = False

    def overflowing(*_args: Any, **_kwargs: Any) -> bool:  # the optimizer's own check, answering "overflow"
        opt.overflow = True
        return True

    def flagged_step(*args: Any, **kwargs: Any) -> Any:
        if not opt.skip_next_step:
            if isinstance(opt, torch.optim.Optimizer):
                opt.overflow = False  # the engine reads it after every step once it exists
            return step(*args, **kwargs)
        opt.skip_next_step = False
        if isinstance(opt, BF16_Optimizer):  # its step()'s own branch for an invalid gradient norm
            opt.overflow, opt._global_grad_norm = True, float("inf")
            opt.clear_hp_grads()
            opt.clear_lp_grads()
        elif isinstance(opt, DeepSpeedZeroOptimizer):  # step() checks overflow (check_overflow) when asked to
            check = opt.check_grad_overflow
            opt.check_grad_overflow, opt.check_overflow = True, overflowing
            try:
                step(*args, **kwargs)
            finally:
                opt.check_grad_overflow = check
                del opt.check_overflow  # the class's method again
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            opt._overflow_check_and_loss_scale_update = (
                lambda update_scale=True: overflowing() and (not update_scale or
                                                              opt._loss_scale_update_and_overflow_cleanup()))
            try:
                step(*args, **kwargs)
            finally:
                del opt._overflow_check_and_loss_scale_update
        elif hasattr(opt, "_skip_invalid_grad_norm"):  # FP16_(Unfused)Optimizer, bf16 at ZeRO 0: their own skip
            opt._skip_invalid_grad_norm()
        elif isinstance(opt, torch.optim.Optimizer):
            opt.overflow = True  # no update; the engine zeroes the gradients and counts the skip
            engine._global_grad_norm = float("inf")  # as DeepSpeed's optimizers report a skipped step's norm
        else:
            raise NotImplementedError(f"cannot skip a step of {type(opt).__name__}")
        return None

    opt.step = flagged_step


# ----------------------------------------------------------------------------- communication and checkpoints


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce (deepspeed_shm_comm) at start-up.

    Only DeepSpeed's inference all-reduce uses it; training's collectives go through torch.distributed (gloo).
    Building it needs a C++ compiler (without one every CPU run died in a 65-line traceback) and ~50 s.
    """
    try:  # by module name: the attribute deepspeed.comm.torch is the torch package (a star import shadows it)
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None  # TorchBackend treats None as "no shm op": plain all_reduce


def torch_checkpoint_engine(ds_engine: Any) -> Optional[Any]:
    """The engine's checkpoint engine if it is DeepSpeed's plain torch one (whose `load` the framework routes
    through safe_load), else None (Nebula, async... read their own way: the user's explicit choice)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = getattr(ds_engine, "checkpoint_engine", None)
    return engine if type(engine) is TorchCheckpointEngine else None
