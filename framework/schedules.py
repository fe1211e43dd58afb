"""Schedules are pure functions of the optimizer step: learning rate, loss weights, EMA decay."""
from __future__ import annotations

import math
from typing import Union


def warmup_cosine(step: int, *, peak: float, warmup_from: float, warmup_steps: int, end: float, total: int) -> float:
    """Linear warmup from `warmup_from` to `peak` over `warmup_steps`, then cosine from `peak` to `end` at `total`."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_from + (peak - warmup_from) * step / warmup_steps
    span = max(1, total - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * progress))


def ramp(step: int, *, start: float, end: float, steps: int, kind: str = "linear") -> float:
    """Value moving from `start` (step 0) to `end` (step >= `steps`): constant | linear | cosine."""
    if kind == "constant" or steps <= 0:
        return end
    t = min(1.0, max(0.0, step / steps))
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule kind {kind!r}; known: constant, linear, cosine")


def scheduled_value(spec: Union[float, int, dict], step: int, total: int) -> float:
    """A number, or {kind, start, end, steps} (steps defaults to the run length) evaluated at `step`."""
    if isinstance(spec, (int, float)):
        return float(spec)
    unknown = set(spec) - {"kind", "start", "end", "steps"}
    if unknown:
        raise ValueError(f"unknown schedule key {sorted(unknown)[0]!r}; known: kind, start, end, steps")
    return ramp(step, start=float(spec.get("start", 0.0)), end=float(spec.get("end", 1.0)),
                steps=int(spec.get("steps") or total), kind=spec.get("kind", "linear"))
