"""Training health: objectives stuck at their chance level, a collapsing fp16 loss scale, zero gradients,
non-finite losses.

BLIP's most reported failure is a pre-training that learns nothing while its losses look settled (salesforce/BLIP
#51: the ITM loss flat at ~0.6365, the entropy of the 1 positive : 2 negatives label prior). A model declares, per
batch, the loss of a model that learned nothing (ModelOutput "chance"); an objective whose step losses all stay
within run.health_tolerance of it for run.health_window steps is flagged in the console and in TensorBoard
(health/at_chance/<objective> = 1).
"""
from __future__ import annotations

import sys
from collections import deque
from typing import Any, Optional

import torch

from .config import RunConfig
from .distributed import any_nonfinite, rank, world_size

ZERO_GRAD_STEPS = 3  # consecutive optimizer steps with a gradient norm of exactly 0 before it is flagged


class TrainingStopped(RuntimeError):
    """Raised by fit() once the last good state is saved, when the health monitor's verdict stopped the run
    (non-finite losses, loss-scale collapse): a reason the user must see."""


class StepLosses:
    """A step's micro-batch losses summed on the device (a sum is non-finite iff one of its terms is): the step is
    checked once, at its end, with no host sync per micro-batch."""

    def __init__(self) -> None:
        self.total: Optional[torch.Tensor] = None
        self.objectives: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, objectives: dict[str, torch.Tensor]) -> None:
        """Adds one micro-batch's total loss and its objectives' losses (detached, in fp32)."""
        self.total = _plus(self.total, loss)
        for name, value in objectives.items():
            self.objectives[name] = _plus(self.objectives.get(name), value)

    def clear(self) -> None:
        """Forgets the step's losses (after its check)."""
        self.total, self.objectives = None, {}


def _plus(acc: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().sum()
    return value if acc is None else acc + value


class HealthMonitor:
    """Watches every optimizer step's scalars; warns once per episode, stops on runaway non-finite losses."""

    COUNTS = ("nonfinite_run", "nonfinite_total", "zero_grad_run", "low_scale_run")  # steps (in a row) with a fault

    def __init__(self, run: RunConfig, state: Optional[dict[str, Any]] = None):
        """state: a state_dict() saved in the checkpoint resumed: counts and windows go on as if never stopped."""
        self.window, self.tolerance, self.max_nonfinite = run.health_window, run.health_tolerance, run.max_nonfinite
        state = state or {}
        self.losses: dict[str, deque[float]] = {k: deque(v, maxlen=self.window)
                                                for k, v in state.get("losses", {}).items()}
        self.flagged: set[str] = set(state.get("flagged", ()))
        self.nonfinite_run, self.nonfinite_total, self.zero_grad_run, self.low_scale_run = (
            int(state.get(name, 0)) for name in self.COUNTS)

    def state_dict(self) -> dict[str, Any]:
        """The counts, the chance-level windows and the flagged objectives, as plain data (for a checkpoint)."""
        return {**{name: getattr(self, name) for name in self.COUNTS}, "flagged": sorted(self.flagged),
                "losses": {k: list(v) for k, v in self.losses.items()}}

    def nonfinite(self, loss: torch.Tensor, output: dict[str, Any], step: int, log: Any,
                  skipped: str = "step skipped", bad: Optional[bool] = None) -> Optional[str]:
        """Reports a step whose `loss` is not finite on any rank (a step's summed losses, StepLosses: the step is
        skipped, by the engine under fp32/bf16, by the loss scaler under fp16), by objective; returns why the run
        must stop (more in a row than run.max_nonfinite), else None. `bad`: any_nonfinite(loss) if the caller has
        read it already, else read here (one host sync)."""
        # a non-finite objective makes the total non-finite (even at weight 0)
        if not (any_nonfinite(loss) if bad is None else bad):
            self.nonfinite_run = 0
            return None
        # every rank gets here together (any_nonfinite): all skip, count and stop alike, so they stay in step
        here = not torch.isfinite(loss.detach()).all()
        names = ([k for k, v in output["losses"].items() if not torch.isfinite(v.detach()).all()] or ["total"]) \
            if here else ["another rank's batch"]
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        log.scalars(step, {"train/nonfinite_losses": self.nonfinite_total})
        many = world_size() > 1
        where = f" on rank {rank()}" if many and here else ""
        text = f"step {step}: non-finite loss in {', '.join(names)}{where}; {skipped}{' on every rank' * many}"
        if here and rank() != 0:  # log.message prints on rank 0 only, which may not have seen it
            print(text, file=sys.stderr, flush=True)
        else:
            log.message(text)
        if self.nonfinite_run > self.max_nonfinite:
            return (f"{self.nonfinite_run} non-finite losses in a row (objective: {', '.join(names)}) > "
                    f"run.max_nonfinite={self.max_nonfinite}; lower the learning rate or check the data")
        return None

    def check(self, step: int, scalars: dict[str, float], output: dict[str, Any], log: Any,
              min_loss_scale: float = 1.0) -> tuple[dict[str, float], Optional[str]]:
        """After an optimizer step: chance levels, gradient norm, loss scale (warnings in `log`); returns the step's
        health/* scalars and why the run must stop (a collapsed fp16 loss scale), else None."""
        health: dict[str, float] = {}
        stop = None
        for name, chance in (output.get("chance") or {}).items():
            loss = scalars.get(f"loss/{name}")
            if loss is None:
                continue
            recent = self.losses.setdefault(name, deque(maxlen=self.window))
            recent.append(loss)
            stuck = len(recent) == self.window and all(abs(v - chance) <= self.tolerance * abs(chance)
                                                       for v in recent)
            health[f"health/at_chance/{name}"] = float(stuck)
            if stuck and name not in self.flagged:
                log.message(f"health: step {step}: {name} has stayed at its chance level for {self.window} steps "
                            f"(loss {loss:.4f}, a model that learned nothing: {chance:.4f}): {name} is not learning")
            (self.flagged.add if stuck else self.flagged.discard)(name)
        norm = scalars.get("train/grad_norm")
        if norm is not None:
            self.zero_grad_run = self.zero_grad_run + 1 if norm == 0.0 else 0
            if self.zero_grad_run == ZERO_GRAD_STEPS:
                log.message(f"health: step {step}: the gradient norm has been 0 for {ZERO_GRAD_STEPS} steps: nothing "
                            "trains (every parameter frozen, or the losses detached from them)")
            health["health/zero_grad"] = float(self.zero_grad_run >= ZERO_GRAD_STEPS)
        scale = scalars.get("fp16/loss_scale")
        if scale is not None:
            self.low_scale_run = self.low_scale_run + 1 if scale <= min_loss_scale else 0
            if self.low_scale_run == 1:
                log.message(f"health: step {step}: the fp16 loss scale fell to {scale:g}, its minimum: gradients "
                            "overflow even unscaled")
            health["health/loss_scale_collapsed"] = float(self.low_scale_run > 0)
            if self.low_scale_run > self.max_nonfinite:
                stop = (f"fp16 loss scale collapsed to {scale} for {self.low_scale_run} steps: gradients overflow "
                        "even at the minimum scale; lower the learning rate or use fp32/bf16")
        return health, stop
