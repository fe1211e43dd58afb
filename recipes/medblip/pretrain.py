"""The MedBLIP pretraining recipe (DAPT, and PSD with the framework's self-distillation): config -> Task.

YAML: `recipe: recipes.medblip.pretrain`, sections `model:` (ModelConfig), `image:` (ImageConfig) and
`validation:` (ValidationConfig, used when data.val is set),
objectives itc / itm / lm (all three when the `objectives:` section is empty), `run.init_from` = weights to
start from (BLIP's model_base.pth path or URL, a transformers Blip* checkpoint, or one of our runs).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

import torch

from framework.config import Config, ConfigError, load_config
from framework.task import Task

from .checkpoint import load_pretrained
from .data import ImageConfig, make_collate, make_decode
from .model_config import ModelConfig
from .momentum import MomentumUpdate
from .objectives import OBJECTIVES
from .pretrain_model import MedBlipPretrain
from .validation import ValidationConfig, make_pretrain_evaluator

SECTIONS = {"model": ModelConfig, "image": ImageConfig, "validation": ValidationConfig}
__all__ = ["SECTIONS", "OBJECTIVES", "build", "build_model", "enabled_objectives", "from_recipe"]


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def enabled_objectives(cfg: Config) -> set[str]:
    """The objectives switched on in the YAML (all of BLIP's three when the section is empty)."""
    if not cfg.objectives:
        return set(OBJECTIVES)
    enabled = {name for name, o in cfg.objectives.items() if o.enabled}
    if not enabled:
        raise ConfigError(f"{cfg.source}: objectives: every objective is disabled; enable at least one of "
                          f"{', '.join(OBJECTIVES)}")
    return enabled


def model_config(cfg: Config) -> ModelConfig:
    """cfg.model with the ViT built for image.size (the images it will be fed)."""
    mc: ModelConfig = cfg.model
    size = cfg.image.size
    if mc.vit.image_size != size:
        _say(f"model: ViT built for image.size={size} (model.vit.image_size was {mc.vit.image_size})")
        mc = mc.replace(vit=dataclasses.replace(mc.vit, image_size=size))
    return mc


def check_queue(cfg: Config, world_size: int) -> None:
    """Refuse, before any weights are built, a queue that cannot hold whole global batches (BLIP's queue)."""
    global_batch = cfg.data.batch_size * world_size
    if "itc" in enabled_objectives(cfg) and cfg.model.queue_size % global_batch:
        raise ConfigError(f"{cfg.source}: model.queue_size={cfg.model.queue_size} is not a multiple of the global "
                          f"batch {global_batch} (data.batch_size x {world_size} ranks); BLIP's queue needs whole "
                          "batches")


def build_model(cfg: Config, *, load_weights: bool = True) -> MedBlipPretrain:
    """The model with the enabled objectives, initialised identically on every rank, then run.init_from loaded."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights (and queue) on every rank
    model = MedBlipPretrain(model_config(cfg), enabled_objectives(cfg), seed=cfg.train.seed)
    if load_weights and cfg.run.init_from:
        report = load_pretrained(model, cfg.run.init_from)
        _say(report.summary())
    return model


def build(cfg: Config) -> Task:
    """Config -> Task: MedBlipPretrain (forward returns the enabled losses), BLIP's data pipeline, momentum plugin."""
    check_queue(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    model = build_model(cfg)
    max_words = 30  # BLIP's pre_caption word limit for pretraining captions (tokens are cut at max_text_len)
    return Task(model=model,
                decode=make_decode(cfg.image, train=True, max_words=max_words),
                collate=make_collate(model.tokenizer, cfg.model.max_text_len),
                plugins=[MomentumUpdate(model, seed=cfg.train.seed)],
                # held-out ITC/ITM/LM losses, retrieval recall@k and sample captions on data.val (None without)
                evaluate=make_pretrain_evaluator(cfg, model.tokenizer))


def from_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None, *,
                load_weights: bool = True) -> MedBlipPretrain:
    """Python API: a recipe YAML (+ dotted overrides) -> MedBlipPretrain with run.init_from loaded (eval() it)."""
    return build_model(load_config(path, overrides), load_weights=load_weights)
