"""EMA teacher for self-distillation: a frozen fp32 copy of the student, moved toward it once per optimizer step.

Parameters that are frozen in the student when the teacher is made (requires_grad False: e.g. BLIP-2's image
encoder and language model) are shared with the student, not copied: the teacher holds the very same tensors,
the update skips them and the teacher's state_dict leaves them out. Only the trainable part is averaged.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn

from .schedules import ramp

TAU_SCHEDULES = ("constant", "linear", "cosine", "progressive")  # progressive = the study's linear ramp


class ZeroStage3Error(ValueError):
    """The EMA teacher needs whole parameters; ZeRO stage 3 partitions them."""


ZERO3_MESSAGE = ("distill: the EMA teacher needs the student's whole parameters on every rank; use DeepSpeed ZeRO "
                 "stage 0, 1 or 2 (deepspeed.zero_optimization.stage), not 3")


def check_zero_stage(stage: int) -> None:
    """Raise ZeroStage3Error (one line) for ZeRO stage 3; call before deepspeed.initialize."""
    if int(stage) >= 3:
        raise ZeroStage3Error(ZERO3_MESSAGE)


def tau_at(step: int, *, start: float, end: float, steps: int, schedule: str = "linear") -> float:
    """EMA decay used by the update after optimizer step `step` (1 = first): `start` at 0 -> `end` at >= `steps`.

    constant: always `end`; linear / progressive (the study's 0.95 -> 0.995 ramp): straight line; cosine: half
    cosine. A pure function of the optimizer step, so a resumed run continues the schedule exactly.
    """
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"distill.tau_schedule: unknown schedule {schedule!r}; known: {', '.join(TAU_SCHEDULES)}")
    return ramp(step, start=start, end=end, steps=steps, kind="linear" if schedule == "progressive" else schedule)


class EMATeacher:
    """Plugin: teacher <- tau*teacher + (1-tau)*student after each optimizer step; runs the teacher forward.

    The teacher is a deep copy of the student taken at construction (the same initial weights), its own tensors
    cast to fp32 and frozen; the student's frozen parameters are shared, not copied (see the module docstring).
    It is not a submodule of anything DeepSpeed wraps, so DeepSpeed never casts, optimises or checkpoints its
    own tensors; they travel in this plugin's state_dict (the engine's client state).
    """

    name = "ema_teacher"

    def __init__(self, student: nn.Module, *, tau_start: float = 0.95, tau_end: float = 0.995,
                 tau_schedule: str = "linear", tau_steps: int = 1):
        for key, v in (("tau_start", tau_start), ("tau_end", tau_end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"distill.{key} must be in [0, 1], got {v}")
        tau_at(0, start=tau_start, end=tau_end, steps=tau_steps, schedule=tau_schedule)  # validates the name
        if any(hasattr(p, "ds_id") for p in student.parameters()):
            raise ZeroStage3Error(ZERO3_MESSAGE)
        self.student = student
        frozen = {id(p): p for p in student.parameters() if not p.requires_grad}
        self.teacher = copy.deepcopy(student, memo=dict(frozen))  # memo: the frozen tensors are reused, not copied
        self._shared = set(frozen)  # ids of the tensors the teacher shares with the student
        for t in self._own_tensors():  # fp32 copies; a shared tensor keeps the student's dtype (a cast would be its)
            if t.is_floating_point():
                t.data = t.data.float()
        self.teacher.eval().requires_grad_(False)
        self.tau_start, self.tau_end, self.tau_schedule, self.tau_steps = tau_start, tau_end, tau_schedule, tau_steps
        self.step = 0  # optimizer steps whose update has been applied
        self.tau = self.tau_at(0)
        self.compute_dtype: Optional[torch.dtype] = None  # the training precision, set by setup()
        self._check_mirrors()

    def tau_at(self, step: int) -> float:
        return tau_at(step, start=self.tau_start, end=self.tau_end, steps=self.tau_steps, schedule=self.tau_schedule)

    # ------------------------------------------------------------------ plugin contract

    def setup(self, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        """After deepspeed.initialize: refuse ZeRO-3 partitioned parameters, put the fp32 teacher on `device`."""
        if any(hasattr(p, "ds_id") for p in module.parameters()):
            raise ZeroStage3Error(ZERO3_MESSAGE)
        self._move_own(device)
        self.compute_dtype = dtype

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """One EMA update with tau = tau_at(step); returns {"distill/tau": tau}."""
        tau = self.tau_at(step)
        self.update(tau)
        self.step, self.tau = step, tau
        return {"distill/tau": tau}

    def state_dict(self) -> dict[str, Any]:
        """The teacher's own tensors (the shared frozen ones are the student's, saved with it), step and tau."""
        teacher = {k: v.detach().to("cpu", copy=True) for k, v in self.teacher.state_dict(keep_vars=True).items()
                   if id(v) not in self._shared}
        return {"teacher": teacher, "step": self.step, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shared = self._shared_names()
        own = {k: v for k, v in state["teacher"].items() if k not in shared}  # older states held shared ones too
        result = self.teacher.load_state_dict(own, strict=False)  # copy_ into the fp32 tensors: dtype and device kept
        missing = sorted(set(result.missing_keys) - shared)
        if missing or result.unexpected_keys:
            raise RuntimeError(f"EMA teacher state does not fit the model: missing {missing[:3]}, unexpected "
                               f"{result.unexpected_keys[:3]}")
        self.step, self.tau = int(state["step"]), float(state["tau"])

    # ------------------------------------------------------------------ the update and the forward

    @torch.no_grad()
    def update(self, tau: float) -> None:
        """theta_t <- tau*theta_t + (1-tau)*theta_s for every parameter (fp32 math); buffers copied."""
        t_params, s_params = self._pairs("named_parameters")
        if t_params:
            if t_params[0].device != s_params[0].device:  # used without setup() after the student moved
                self._move_own(s_params[0].device)
                t_params, s_params = self._pairs("named_parameters")
            torch._foreach_mul_(t_params, tau)
            torch._foreach_add_(t_params, [s.detach() for s in s_params], alpha=1.0 - tau)  # bf16 s promotes
        self.copy_buffers()

    @torch.no_grad()
    def copy_buffers(self) -> None:
        """Teacher buffers := the student's (queues, pointers, running statistics); not averaged."""
        for t, s in zip(*self._pairs("named_buffers")):
            t.copy_(s)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's forward under no_grad, in the training precision (autocast when it is fp16/bf16)."""
        dtype = self.compute_dtype or self._student_dtype()
        device = next(self.teacher.parameters()).device
        ctx = torch.autocast(device.type, dtype=dtype) if dtype in (torch.float16, torch.bfloat16) else nullcontext()
        with torch.no_grad(), ctx:
            return self.teacher(*args, **kwargs)

    def _student_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.student.parameters() if p.is_floating_point()), torch.float32)

    def _pairs(self, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher tensors, student tensors) of `kind`, without the shared ones (nothing to average there)."""
        t = [v for _, v in getattr(self.teacher, kind)()]
        s = [v for _, v in getattr(self.student, kind)()]
        if len(t) != len(s):
            raise RuntimeError(f"EMA teacher: the student has {len(s)} {kind[6:]}, the teacher {len(t)}")
        keep = [i for i, v in enumerate(t) if id(v) not in self._shared]
        return [t[i] for i in keep], [s[i] for i in keep]

    def _own_tensors(self) -> list[torch.Tensor]:
        """The teacher's parameters and buffers that are not shared with the student."""
        return [v for v in [*self.teacher.parameters(), *self.teacher.buffers()] if id(v) not in self._shared]

    def _shared_names(self) -> set[str]:
        return {k for k, v in self.teacher.state_dict(keep_vars=True).items() if id(v) in self._shared}

    def _move_own(self, device: torch.device) -> None:
        """Move the teacher's own tensors to `device` (moving a shared one would move the student's)."""
        for t in self._own_tensors():
            t.data = t.data.to(device)

    def _check_mirrors(self) -> None:
        for kind in ("named_parameters", "named_buffers"):
            t = [n for n, _ in getattr(self.teacher, kind)()]
            s = [n for n, _ in getattr(self.student, kind)()]
            if t != s:
                raise RuntimeError(f"EMA teacher: the student's {kind[6:]} changed after the copy")
