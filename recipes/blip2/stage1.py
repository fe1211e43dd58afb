"""BLIP-2 stage 1: Q-Former representation learning (ITC + ITM + ITG) against the frozen ViT, on caption shards.

YAML: `recipe: recipes.blip2.stage1`, sections `model:` (Blip2ModelConfig) and `image:` (MedBLIP's ImageConfig);
objectives itc / itm / itg (all three when the section is empty); `run.init_from` = LAVIS's blip2_pretrained.pth,
a transformers Blip2 directory or one of our runs; model.vision_weights = the ViT if init_from lacks it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from framework.config import load_config
from framework.run_env import RunEnv
from framework.task import Recipe, Task

from .build import Blip2PretrainConfig, build_model, task_for
from .data import make_decode, qformer_collate
from .stage1_model import Blip2Stage1
from .objectives import STAGE1_OBJECTIVES

MAX_WORDS = 30  # pre_caption's word limit (BLIP's pretraining captions; tokens are cut at model.max_text_len)


def build(cfg: Blip2PretrainConfig, env: RunEnv) -> Task:
    """Config -> Task: Blip2Stage1 (the stage-1 heads); forward returns the enabled ITC/ITM/ITG losses."""
    model = build_model(cfg, stage="stage1", env=env)
    return task_for(model, decode=make_decode(cfg.image, train=True, max_words=MAX_WORDS),
                    collate=qformer_collate(model.tokenizer, cfg.model.max_text_len))


def from_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None, *, load_weights: bool = True) -> Blip2Stage1:
    """Python API: a recipe YAML (+ dotted overrides) -> the Blip2Stage1 model with its weights loaded."""
    return build_model(load_config(path, overrides), stage="stage1", load_weights=load_weights)


RECIPE = Recipe(config=Blip2PretrainConfig, objectives=STAGE1_OBJECTIVES, build=build)
