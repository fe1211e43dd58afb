"""EMA teacher for self-distillation: a frozen fp32 copy of the student, moved toward it once per optimizer step."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn

from .config import TAU_SCHEDULES
from .master_weights import MasterWeights
from .progress import Progress
from .schedules import ramp


@torch.no_grad()
def ema_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], decay: float) -> None:
    """targets <- decay * targets + (1 - decay) * sources, in the targets' dtype (fp32 copies of half sources)."""
    if not targets:
        return
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, [s.detach().to(t.dtype) for t, s in zip(targets, sources, strict=True)],
                        alpha=1.0 - decay)


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

    constant: always `end`; linear (the study's 0.95 -> 0.995 ramp): straight line; cosine: half
    cosine. A pure function of the optimizer step, so a resumed run continues the schedule exactly.
    """
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"distill.tau_schedule: unknown schedule {schedule!r}; known: {', '.join(TAU_SCHEDULES)}")
    return ramp(step, start=start, end=end, steps=steps, kind=schedule)


class EMATeacher:
    """Plugin: teacher <- tau*teacher + (1-tau)*student after each optimizer step; runs the teacher forward.

    The teacher is a deep copy of the student taken at construction (the same initial weights), cast to fp32 and
    frozen; the `shared` submodules (frozen towers that never change) are the student's own, not copied. It is not
    a submodule of anything DeepSpeed wraps, so DeepSpeed never casts, optimises or checkpoints it; its weights
    travel in this plugin's state_dict (the engine's client state).
    """

    name = "ema_teacher"
    per_rank_state = False  # every rank holds the same teacher

    def __init__(self, student: nn.Module, *, tau_start: float = 0.95, tau_end: float = 0.995,
                 tau_schedule: str = "linear", tau_steps: int = 1, shared: Optional[list[nn.Module]] = None):
        for key, v in (("tau_start", tau_start), ("tau_end", tau_end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"distill.{key} must be in [0, 1], got {v}")
        self.tau_start, self.tau_end, self.tau_schedule, self.tau_steps = tau_start, tau_end, tau_schedule, tau_steps
        self.tau = self.tau_at(0)  # (refuses an unknown schedule before anything is copied)
        self.student = student
        shared = list(shared or [])
        memo = {id(t): t for m in shared for t in [*m.parameters(), *m.buffers()]}  # deepcopy keeps these as-is
        self._shared = set(memo)
        self.teacher = copy.deepcopy(student, memo=dict(memo)).eval().requires_grad_(False)
        for t in [*self.teacher.parameters(), *self.teacher.buffers()]:
            if id(t) not in self._shared and t.is_floating_point():
                t.data = t.data.float()  # fp32 copies; the shared towers keep their own dtype
        self.compute_dtype: Optional[torch.dtype] = None  # the training precision, set by setup()
        self.masters: Optional[MasterWeights] = None  # the student's fp32 masters, set by use_master_weights()

    def tau_at(self, step: int) -> float:
        return tau_at(step, start=self.tau_start, end=self.tau_end, steps=self.tau_steps, schedule=self.tau_schedule)

    # ------------------------------------------------------------------ plugin contract

    def use_master_weights(self, masters: MasterWeights) -> None:
        """Before setup: the update reads the student's fp32 master weights where the optimizer holds them."""
        self.masters = masters

    def setup(self, module: nn.Module, dtype: torch.dtype, device: torch.device, progress: Progress) -> None:
        """After deepspeed.initialize: refuse ZeRO-3 partitioned parameters, put the fp32 teacher on `device`; a
        submodule that reads the run's Progress (e.g. an alpha ramp) reads the very same one in the teacher."""
        if any(hasattr(p, "ds_id") for p in module.parameters()):
            raise ZeroStage3Error(ZERO3_MESSAGE)
        self.teacher.to(device=device)
        self.compute_dtype = dtype
        for m in self.teacher.modules():  # the copy was made before the recipe's plugins handed the model its Progress
            if isinstance(getattr(m, "progress", None), Progress):
                m.progress = progress

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """One EMA update with tau = tau_at(step); returns {"distill/tau": tau}."""
        tau = self.tau_at(step)
        self.update(tau)
        self.tau = tau
        return {"distill/tau": tau}

    def state_dict(self) -> dict[str, Any]:
        teacher = {k: v.detach().to("cpu", copy=True) for k, v in self._own_state().items()}
        return {"teacher": teacher, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self._own_state()
        # copy_ into the fp32 tensors (dtype and device kept); shared towers are the student's, restored with it
        self.teacher.load_state_dict({k: v for k, v in state["teacher"].items() if k in own}, strict=False)
        missing = sorted(set(own) - set(state["teacher"]))
        if missing:
            raise RuntimeError(f"EMA teacher state does not fit this model: it lacks {len(missing)} tensors "
                               f"(e.g. {missing[0]})")
        self.tau = float(state["tau"])  # an older state's "step" is ignored: the run's Progress is the count

    def _own_state(self) -> dict[str, torch.Tensor]:
        """The teacher's state dict without the shared (student-owned) tensors."""
        return {k: v for k, v in self.teacher.state_dict(keep_vars=True).items() if id(v) not in self._shared}

    # ------------------------------------------------------------------ the update and the forward

    @torch.no_grad()
    def update(self, tau: float) -> None:
        """theta_t <- tau*theta_t + (1-tau)*theta_s for every own parameter (fp32 math); buffers copied.

        theta_s is the student's fp32 master weight where `masters` holds one, else its module weight."""
        teacher, student = self._pairs("named_parameters")
        ema_update_(teacher, student if self.masters is None else self.masters.of(student), tau)
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
        """(teacher, student) tensors of `kind`, in order, without the shared ones."""
        t = [v for _, v in getattr(self.teacher, kind)()]
        s = [v for _, v in getattr(self.student, kind)()]
        if len(t) != len(s):
            raise RuntimeError(f"EMA teacher: the student has {len(s)} {kind[6:]}, the teacher {len(t)}")
        pairs = [(a, b) for a, b in zip(t, s) if id(a) not in self._shared]
        return [a for a, _ in pairs], [b for _, b in pairs]
