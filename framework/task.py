"""The whole contract between the framework and a recipe, in one place.

A recipe module declares `RECIPE = Recipe(config=..., objectives=(...), build=...)`. The framework validates the
YAML into `RECIPE.config` (a subclass of framework.config.Config with the recipe's own typed sections), then calls
`RECIPE.build(cfg, env) -> Task` (env: framework.run_env.RunEnv: ranks, device, precision, ZeRO stage). The Task's model is what DeepSpeed wraps; its forward returns a ModelOutput.
Nothing else of a recipe is looked up by name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, TypedDict

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import Config
    from .progress import Progress
    from .run_env import RunEnv

# A batch is whatever the recipe's collate returns: a dict of tensors (and plain values).
Batch = dict[str, Any]


class ModelOutput(TypedDict, total=False):
    """What the model's forward(batch) returns; only "losses" is required."""

    losses: dict[str, torch.Tensor]  # objective name -> fp32 scalar with grad (combined by the loss weighter)
    metrics: dict[str, Any]  # name -> float or 0-dim tensor, logged only
    chance: dict[str, float]  # objective -> the loss of a model that learned nothing (the health monitor)
    reuse: dict[str, torch.Tensor]  # this call's random draws, for forward(batch, reuse=...) (self-distillation)
    logits: dict[str, Any]  # with return_logits=True: objective -> logits structure (framework.distill.logits_kl)
    teacher_losses: dict[str, torch.Tensor]  # filled by framework.distill
    distill: dict[str, torch.Tensor]  # filled by framework.distill


class Model(Protocol):
    """The module DeepSpeed wraps. Two keywords are optional: a forward that takes them gets them.

    return_logits=True: also return output["logits"] (distill.mode output_kl needs it).
    reuse=output["reuse"] of an earlier call: repeat that call's random draws (the EMA teacher then scores the
    very pairs the student drew, e.g. BLIP's ITM negatives).
    """

    def __call__(self, batch: Batch, *, return_logits: bool = False,
                 reuse: Optional[dict[str, torch.Tensor]] = None) -> ModelOutput: ...


def forward_keywords(model: nn.Module) -> frozenset[str]:
    """Which of the optional Model keywords (return_logits, reuse) this model's forward accepts."""
    params = inspect.signature(model.forward).parameters
    return frozenset(k for k in ("return_logits", "reuse") if k in params)


class Plugin(Protocol):
    """Runs right after each optimizer step; owns state that must survive a resume, but no step count of its own."""

    name: str  # key of its state in checkpoints
    per_rank_state: bool  # True: every rank saves its own state (e.g. a per-rank RNG); False: rank 0's is saved
    # Optional: needs_whole_parameters (str), why ZeRO stage 3 cannot run; then it is refused before the engine is built
    # Optional: use_master_weights(masters: framework.master_weights.MasterWeights) -> None, called before setup; the
    # plugin then reads (or clamps) the optimizer's fp32 master weights where DeepSpeed holds them on this rank

    def setup(self, module: nn.Module, dtype: torch.dtype, device: torch.device, progress: Progress) -> None:
        """Called once after deepspeed.initialize with the recipe's model (DeepSpeed's engine.module) and the run's
        Progress: the one step count, advanced by the Trainer only, restored in place before load_state_dict."""

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """Called once per optimizer step; `step` is progress.step (1 after the first); returns logs."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# evaluate(model, step) -> {name: number (scalar) | str (Markdown text) | Tensor[3,H,W] (image)}; called on every
# rank with the recipe's model in eval mode under no_grad.
Evaluate = Callable[[nn.Module, int], dict[str, Any]]
# combine(output, step) -> (total loss, logs): turns the named losses into the scalar to backward.
Combine = Callable[[ModelOutput, int], tuple[torch.Tensor, dict[str, Any]]]


@dataclass
class Task:
    """What a recipe's build(cfg, env) hands the framework."""

    model: nn.Module  # a Model: forward(batch) -> ModelOutput; what DeepSpeed wraps
    collate: Callable[[list[dict[str, Any]]], Batch]  # decoded samples -> batch
    # Training samples: WebDataset shards from data.train decoded by `decode` (a raw sample -> decoded sample,
    # None or an exception = skip it), or a map-style dataset whose items are already decoded.
    decode: Optional[Callable[[dict[str, Any]], Optional[dict[str, Any]]]] = None
    train_dataset: Optional[torch.utils.data.Dataset] = None
    plugins: list[Plugin] = field(default_factory=list)
    evaluate: Optional[Evaluate] = None
    # Weight decay is off for parameters this returns True for (default: biases and norms, unless train.decay_1d).
    no_decay: Optional[Callable[[str, nn.Parameter], bool]] = None
    combine_losses: Optional[Combine] = None  # default: static objective weights (objectives.<name>.weight)
    # Submodules kept in fp32 under fp16/bf16 (EMA/momentum copies: 0.995-weighted updates round away in half).
    fp32_modules: list[nn.Module] = field(default_factory=list)
    # Submodules that never change (frozen towers): an EMA teacher shares them instead of copying them.
    frozen_modules: list[nn.Module] = field(default_factory=list)
    # activation_bytes(micro_batch, precision) -> bytes kept for backward, for the pre-flight memory estimate.
    activation_bytes: Optional[Callable[[int, str], int]] = None

    def __post_init__(self) -> None:
        if (self.decode is None) == (self.train_dataset is None):
            raise ValueError("Task: give exactly one of decode (WebDataset shards from data.train) or "
                             "train_dataset (a map-style dataset)")


@dataclass(frozen=True)
class Recipe:
    """A recipe module's declaration: `RECIPE = Recipe(config=MyConfig, objectives=("a", "b"), build=build)`."""

    config: type  # a dataclass subclassing framework.config.Config: the recipe's typed sections
    objectives: tuple[str, ...]  # the names objectives.<name> may use
    build: Callable[["Config", "RunEnv"], Task]
