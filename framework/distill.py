"""Self-distillation: the student's forward and its EMA teacher's on each batch, and the distillation terms.

loss_mse needs nothing of the model; output_kl and reuse= use the optional Model keywords (framework.task).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from .adaptive_weights import AdaptiveLossWeighter
from .config import DistillingConfig, check_distill_modes
from .ema import EMATeacher, check_zero_stage
from .run_env import zero_stage
from .loss_weights import StaticLossWeights
from .task import Batch, ModelOutput, Task, forward_keywords

IGNORE_INDEX = -100


def resolve_modes(spec: Union[str, dict[str, str]]) -> Callable[[str], str]:
    """distill.mode (one mode, or {objective: mode} with loss_mse for the others) -> objective -> mode."""
    check_distill_modes(spec)
    if isinstance(spec, str):
        return lambda name: spec
    return lambda name: spec.get(name, "loss_mse")


def kl_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the last dim, averaged over rows [...] where mask.

    Logits [..., C] (same shape); mask bool [...] or None (all rows). fp32 scalar; no gradient to the teacher.
    The T^2 factor (Hinton et al. 2015) keeps gradient sizes comparable across temperatures.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"output_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [...]
    if mask is None:
        return kl.mean() * t * t
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0) * t * t  # no host sync, 0 when every row is masked


def logits_kl(student: Any, teacher: Any, temperature: float = 1.0) -> torch.Tensor:
    """kl_with_temperature over a recipe's logits: a tensor [..., C], {"logits": [..., C], "mask" or "labels": [...]}
    (labels -100 are ignored rows), or a dict/list of those (averaged)."""
    if isinstance(student, torch.Tensor):
        return kl_with_temperature(student, teacher, temperature)
    if isinstance(student, dict) and "logits" in student:
        mask = student.get("mask")
        if mask is None and student.get("labels") is not None:
            mask = student["labels"] != IGNORE_INDEX
        return kl_with_temperature(student["logits"], teacher["logits"], temperature, mask)
    if isinstance(student, dict):
        parts = [logits_kl(student[k], teacher[k], temperature) for k in sorted(student)]
    elif isinstance(student, (list, tuple)):
        parts = [logits_kl(s, t, temperature) for s, t in zip(student, teacher, strict=True)]
    else:
        raise TypeError(f"output_kl: cannot read logits from a {type(student).__name__}")
    return torch.stack(parts).mean()


class SelfDistillation:
    """The student's forward, then its EMA teacher's on the same batch: ModelOutput + "teacher_losses" and
    "distill" ({objective: D_t}), D_t = (L_t^S - L_t^T)^2 (loss_mse, the study's) or logits_kl of the objective's
    outputs (output_kl).

    `student` computes the student's output: the DeepSpeed engine wrapping the recipe's model (in training), or the
    model itself; the teacher lives in the `ema` plugin, out of DeepSpeed's reach. `keywords`: the optional Model
    keywords the forward accepts (default: read from `student`).
    """

    def __init__(self, student: Callable[..., ModelOutput], ema: EMATeacher, mode: Union[str, dict[str, str]] =
                 "loss_mse", temperature: float = 1.0, keywords: Optional[frozenset[str]] = None):
        self.student = student
        self.ema = ema
        self.mode = resolve_modes(mode)
        self.temperature = temperature
        keywords = forward_keywords(student) if keywords is None else keywords
        self.accepts_reuse = "reuse" in keywords
        self._uses_kl = mode == "output_kl" or (isinstance(mode, dict) and "output_kl" in mode.values())
        if self._uses_kl and "return_logits" not in keywords:
            raise ValueError(f"distill.mode output_kl: {type(ema.student).__name__}.forward takes no return_logits=; "
                             "use loss_mse or make the model return its logits")

    def __call__(self, batch: Batch) -> ModelOutput:
        kwargs = {"return_logits": True} if self._uses_kl else {}
        # The teacher sees the buffers the student's forward starts from (e.g. the same ITC feature queue, which
        # the student's forward then advances), not last step's copy: same candidates under accumulation too.
        self.ema.copy_buffers()
        out = self.student(batch, **kwargs)
        t_kwargs = dict(kwargs)
        if self.accepts_reuse and out.get("reuse") is not None:
            t_kwargs["reuse"] = out["reuse"]  # the teacher scores the same sampled pairs as the student
        t_out = self.ema(batch, **t_kwargs)
        teacher_losses = {k: v.detach().float() for k, v in t_out["losses"].items()}
        distill: dict[str, torch.Tensor] = {}
        for name, loss in out["losses"].items():
            if name not in teacher_losses:
                raise RuntimeError(f"self-distillation: the teacher returned no {name!r} loss")
            if self.mode(name) == "output_kl":
                s_logits, t_logits = out.get("logits", {}).get(name), t_out.get("logits", {}).get(name)
                if s_logits is None or t_logits is None:
                    raise ValueError(f"distill.mode output_kl for {name!r}: the model returned no logits[{name!r}] "
                                     "with return_logits=True; use loss_mse for this objective")
                distill[name] = logits_kl(s_logits, t_logits, self.temperature)
            else:
                distill[name] = F.mse_loss(loss.float(), teacher_losses[name])
        result = {k: v for k, v in out.items() if k != "logits"}
        metrics = dict(out.get("metrics", {}))
        metrics |= {f"teacher/{k}": v for k, v in t_out.get("metrics", {}).items()
                    if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        result |= {"teacher_losses": teacher_losses, "distill": distill, "metrics": metrics}
        return result


@dataclass
class Distillation:
    """Progressive self-distillation for a task: the EMA teacher and the adaptive weighter (plugins, in this
    order, after the recipe's own) and the forward that runs both models."""

    teacher: EMATeacher
    weighter: AdaptiveLossWeighter
    mode: Union[str, dict[str, str]]
    temperature: float
    keywords: frozenset[str]

    @property
    def plugins(self) -> list[Any]:
        return [self.teacher, self.weighter]

    def forward(self, student: Callable[..., ModelOutput]) -> SelfDistillation:
        """The training forward around `student` (the DeepSpeed engine wrapping the recipe's model)."""
        return SelfDistillation(student, self.teacher, self.mode, self.temperature, keywords=self.keywords)


def setup_distillation(task: Task, cfg: DistillingConfig, total_steps: int) -> Distillation:
    """The teacher (a copy of the weights the student starts from: call before deepspeed.initialize) and the
    adaptive weighter for `task` as distill: configures them; refuses ZeRO-3 and a recipe's own loss combiner."""
    d = cfg.distill
    check_zero_stage(zero_stage(cfg))
    if task.combine_losses is not None:
        raise ValueError("distill.enabled: the recipe sets its own combine_losses, which self-distillation's "
                         "adaptive weighter would replace; disable one of them")
    teacher = EMATeacher(task.model, tau_start=d.tau_start, tau_end=d.tau_end, tau_schedule=d.tau_schedule,
                         tau_steps=d.tau_steps or total_steps, shared=task.frozen_modules)
    weighter = AdaptiveLossWeighter(StaticLossWeights(cfg.objectives, total_steps).weight,
                                    momentum=d.ratio_momentum, eps=d.eps, detach_weights=d.detach_weights)
    distillation = Distillation(teacher, weighter, d.mode, d.temperature, forward_keywords(task.model))
    distillation.forward(task.model)  # validates the mode against what the model's forward accepts
    return distillation
