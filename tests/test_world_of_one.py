"""Alone, the engine skips DeepSpeed's gradient all-reduce with itself and trains exactly as DeepSpeed's own path does.

framework/build.py replaces the ZeRO-0 engine's world-of-one all-reduce (a flat copy of every gradient, reduced over
one rank, copied back) by its only effect on the gradients: trainable parameters without one get zeros.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.build import build_deepspeed
from framework.run_env import resolve_precision
from framework.config import config_from_dict
from framework.task import Task

STEPS = 3


class TwoHeads(nn.Module):
    """A regressor with a head no loss uses (its parameters get no gradient)."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, batch: dict) -> dict:
        return {"losses": {"mse": ((self.used(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()}}


def engine(zero: int = 0):
    cfg = config_from_dict({"recipe": "recipes.toy", "train": {"max_steps": STEPS, "lr": 0.1, "min_lr": 0.1,
                                                               "weight_decay": 0.5, "warmup_steps": 0,
                                                               "clip_grad": 1.0},
                            "data": {"batch_size": 4}, "deepspeed": {"zero_optimization": {"stage": zero}}})
    torch.manual_seed(0)
    task = Task(model=TwoHeads(), collate=list, decode=dict)
    return build_deepspeed(cfg, task, resolve_precision("fp32", torch.device("cpu")), STEPS, 1)


def train(ds) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = {"x": torch.randn(4, 4, generator=g), "y": torch.randn(4, generator=g)}
        ds.backward(ds(batch)["losses"]["mse"])
        ds.step()
    return {k: v.detach().clone() for k, v in ds.module.state_dict().items()}


def test_alone_the_engine_trains_as_deepspeeds_all_reduce_path(one_rank, monkeypatch):  # noqa: F811
    ours, theirs = engine(), engine()
    assert ours.allreduce_gradients.__name__ == "zero_fill_missing_gradients"
    del theirs.allreduce_gradients  # back to DeepSpeed's own method: flatten, all-reduce over one rank, copy back
    assert theirs.allreduce_gradients.__func__ is type(theirs).allreduce_gradients
    monkeypatch.setattr(type(ours), "buffered_allreduce_fallback",
                        lambda *a, **k: pytest.fail("the gradients were flattened and all-reduced"))
    start = {k: v.clone() for k, v in ours.module.state_dict().items()}
    a = train(ours)
    monkeypatch.undo()
    b = train(theirs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the unused head got zero gradients in both (not None): AdamW only decayed its weights, at lr 0.1 x decay 0.5
    torch.testing.assert_close(a["unused.weight"], start["unused.weight"] * (1 - 0.1 * 0.5) ** STEPS)


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_keeps_deepspeeds_reductions(one_rank, zero):  # noqa: F811
    ds = engine(zero)
    assert "allreduce_gradients" not in vars(ds)
