"""The contract between the engine and a recipe: what a recipe's ``build(cfg)`` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

# A batch is whatever the recipe's collate returns: a dict of tensors (and plain values).
Batch = dict[str, Any]

# What the module that DeepSpeed wraps returns from forward(batch):
#   {"losses":  {objective name: scalar tensor with grad},   # combined by the loss weighter
#    "metrics": {name: float or 0-dim tensor},                # logged only (optional)
#    "teacher_losses": {...}, "distill": {...}}               # filled by framework.distill (optional)
ModelOutput = dict[str, Any]


class Plugin(Protocol):
    """Runs right after each optimizer step; owns state that must survive a resume."""

    name: str

    def setup(self, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        """Called once after deepspeed.initialize with the wrapped module (unwrapped: engine.module)."""

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """Called once per optimizer step; ``step`` counts optimizer steps done (1 after the first)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Task:
    """What a recipe hands the engine: the model, how to turn samples into batches, plugins, evaluation."""

    model: nn.Module  # forward(batch) -> ModelOutput; this module is what DeepSpeed wraps
    decode: Callable[[dict[str, Any]], Optional[dict[str, Any]]]  # raw webdataset sample -> decoded sample
    collate: Callable[[list[dict[str, Any]]], Batch]  # decoded samples -> batch
    plugins: list[Any] = field(default_factory=list)
    # Optional map-style training set (e.g. VQA-RAD questions) used instead of WebDataset shards.
    train_dataset: Optional[torch.utils.data.Dataset] = None
    # Optional evaluation: evaluate(model, step) -> {name: number (scalar) | str (text) | Tensor[3,H,W] (image)};
    # model is the unwrapped module, called in eval mode under no_grad on every rank.
    evaluate: Optional[Callable[[nn.Module, int], dict[str, float]]] = None
    # Optional parameter filter: names for which weight decay is off (default: biases and norms).
    no_decay: Optional[Callable[[str, torch.nn.Parameter], bool]] = None
    # Optional loss combiner (e.g. self-distillation's adaptive weighter); default: static objective weights.
    combine_losses: Optional[Callable[[ModelOutput, int], tuple[torch.Tensor, dict[str, float]]]] = None
