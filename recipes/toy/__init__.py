"""A toy regression recipe on generated shards: proves the framework end to end without BLIP."""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import webdataset as wds
from torch import nn

from framework.config import DistillingConfig
from framework.progress import Progress
from framework.run_env import RunEnv
from framework.task import Recipe, Task


@dataclass
class ToyModelConfig:
    in_dim: int = 8
    hidden: int = 16
    dropout: float = 0.0  # >0 makes the forward random, to prove RNG state is restored on resume
    dataset_size: int = 0  # >0: an in-memory map-style dataset of this size instead of shards
    # Fault injection for the reliability tests:
    step_sleep: float = 0.0  # seconds each forward sleeps (a slow model)
    nan_after: int = -1  # forwards after this many return a NaN "mse" loss (-1: never)
    nan_at: int = -1  # this forward (1-based) alone returns a NaN "mse" loss: one fp16 overflow (-1: never)
    nan_count: int = 0  # >0: only this many forwards (after nan_after) are NaN, then finite again
    nan_rank: int = -1  # >=0: nan_after/nan_at act on this rank only (a bad sample on one rank)
    constant: bool = False  # predict one learned number (blind to x): a model that learns nothing, for the monitor
    stall_after: int = -1  # decodes after this many (per process) hang for an hour: a data source that stalls
    eval_sleep: Optional[float] = None  # an evaluation that sleeps this long (None: no evaluation)


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


def _l1(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y).abs().mean()


LOSSES = {"mse": _mse, "l1": _l1}  # objective -> loss; the loader refuses any other objectives.<name>


@dataclass
class ToyConfig(DistillingConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


class ToyRegressor(nn.Module):
    """MLP y = f(x); forward(batch {"x": [B,D], "y": [B]}) -> {"losses": {objective: scalar}}."""

    def __init__(self, cfg: ToyModelConfig, objectives: list[str]):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden), nn.Tanh(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, 1))
        self.objectives = objectives
        self.cfg = cfg
        self.forwards = 0
        self.rank = 0  # set by build: nan_rank injects a fault on one rank only

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.step_sleep:
            time.sleep(self.cfg.step_sleep)
        self.forwards += 1
        dtype = self.net[0].weight.dtype
        x = batch["x"].to(dtype)
        pred = self.net(x * 0 if self.cfg.constant else x).squeeze(-1).float()
        y = batch["y"].float()
        losses = {name: LOSSES[name](pred, y) for name in self.objectives}
        this_rank = self.cfg.nan_rank in (-1, self.rank)
        nan = 0 <= self.cfg.nan_after < self.forwards
        if self.cfg.nan_count > 0:
            nan = nan and self.forwards <= self.cfg.nan_after + self.cfg.nan_count
        if (nan or self.cfg.nan_at == self.forwards) and this_rank and "mse" in losses:
            losses["mse"] = losses["mse"] * float("nan")
        out = {"losses": losses, "metrics": {"pred_mean": pred.detach().mean()}}
        if self.cfg.constant:  # the best a blind model can do: predict the mean (mse = variance of y)
            out["chance"] = {"mse": float(((y - y.mean()) ** 2).mean())}
        return out


def decode(sample: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Raw sample {"npy": bytes, "json": bytes} -> {"x": Tensor[D], "y": float}."""
    _DECODES[0] += 1
    if 0 <= _STALL_AFTER[0] < _DECODES[0]:
        print("toy: the data source stalls now", flush=True)  # the event the signal tests wait on
        time.sleep(3600)
    x = np.load(io.BytesIO(sample["npy"]))
    y = json.loads(sample["json"])["y"]
    return {"x": torch.from_numpy(x).float(), "y": float(y), "key": sample["__key__"]}


_STALL_AFTER, _DECODES = [-1], [0]  # set by build (module state: DataLoader workers inherit it), decodes so far


def sleeping_evaluation(seconds: float):
    """An evaluation that takes `seconds` (a long evaluation, for the signal tests)."""
    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        print(f"toy: evaluating for {seconds:g} s", flush=True)  # the event the signal tests wait on
        time.sleep(seconds)
        return {"slept": float(seconds)}

    return evaluate


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"x": torch.stack([s["x"] for s in samples]), "y": torch.tensor([s["y"] for s in samples]),
            "keys": [s["key"] for s in samples]}


class StepCounter:
    """A plugin that records the optimizer steps it saw (state survives resume): proves the plugin contract."""

    name = "step_counter"
    per_rank_state = False

    def __init__(self) -> None:
        self.calls: list[int] = []

    def setup(self, module: nn.Module, dtype: torch.dtype, device: torch.device, progress: Progress) -> None:
        self.dtype = dtype

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        self.calls.append(step)
        return {"toy/plugin_calls": float(len(self.calls))}

    def state_dict(self) -> dict[str, Any]:
        return {"calls": list(self.calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = list(state["calls"])


class ToyDataset(torch.utils.data.Dataset):
    """n deterministic regression samples, map-style."""

    def __init__(self, n: int, in_dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_dim, generator=g)
        self.y = torch.sin(self.x @ torch.randn(in_dim, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": float(self.y[i]), "key": f"s{i:06d}"}


def build(cfg: ToyConfig, env: RunEnv) -> Task:
    enabled = [n for n, o in cfg.objectives.items() if o.enabled] or ["mse"]
    torch.manual_seed(cfg.train.seed)  # same init on every rank and every run
    dataset = ToyDataset(cfg.model.dataset_size, cfg.model.in_dim) if cfg.model.dataset_size else None
    _STALL_AFTER[0] = cfg.model.stall_after
    evaluate = sleeping_evaluation(cfg.model.eval_sleep) if cfg.model.eval_sleep is not None else None
    model = ToyRegressor(cfg.model, enabled)
    model.rank = env.rank
    return Task(model=model, decode=None if dataset else decode, collate=collate,
                plugins=[StepCounter()], train_dataset=dataset, evaluate=evaluate)


RECIPE = Recipe(config=ToyConfig, objectives=tuple(LOSSES), build=build)


def make_shards(out_dir: Path, n_samples: int = 64, n_shards: int = 4, in_dim: int = 8, seed: int = 0) -> list[Path]:
    """Write `n_samples` of y = sin(w.x) into `n_shards` tar shards; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=in_dim)
    paths = []
    for s in range(n_shards):
        path = out_dir / f"toy-{s:04d}.tar"
        with wds.TarWriter(str(path)) as tar:
            for i in range(s, n_samples, n_shards):
                x = rng.normal(size=in_dim).astype(np.float32)
                buf = io.BytesIO()
                np.save(buf, x)
                tar.write({"__key__": f"s{i:06d}", "npy": buf.getvalue(),
                           "json": json.dumps({"y": float(np.sin(w @ x))}).encode()})
        paths.append(path)
    return paths
