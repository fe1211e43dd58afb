"""Turn a model's named losses into the scalar to backward: static or step-scheduled objective weights."""
from __future__ import annotations

import torch

from .config import ObjectiveConfig
from .schedules import scheduled_value
from .task import ModelOutput


class StaticLossWeights:
    """total = sum_t w_t(step) * L_t, with w_t a number or a step schedule per objective (default 1)."""

    def __init__(self, objectives: dict[str, ObjectiveConfig], total_steps: int):
        self.objectives = objectives
        self.total_steps = total_steps

    def weight(self, name: str, step: int) -> float:
        cfg = self.objectives.get(name)
        return 1.0 if cfg is None else scheduled_value(cfg.weight, step, self.total_steps)

    def __call__(self, output: ModelOutput, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(total loss, logs); logged losses stay detached tensors so a GPU need not sync per micro-batch."""
        losses: dict[str, torch.Tensor] = output["losses"]
        if not losses:
            raise ValueError("the model returned no losses (are all objectives disabled?)")
        logs: dict[str, float] = {}
        total = None
        for name, loss in losses.items():
            w = self.weight(name, step)
            term = w * loss.float()
            total = term if total is None else total + term
            logs[f"loss/{name}"] = loss.detach().float()
            logs[f"weight/{name}"] = w
        logs["loss/total"] = total.detach()
        return total, logs
