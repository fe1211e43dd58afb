"""The MedBLIP pretraining recipe (DAPT, and PSD with the framework's self-distillation): config -> Task.

YAML: `recipe: recipes.medblip.pretrain`, sections `model:` (ModelConfig), `image:` (ImageConfig) and
`validation:` (ValidationConfig, used when data.val is set),
objectives itc / itm / lm (all three when the `objectives:` section is empty), `run.init_from` = weights to
start from (BLIP's model_base.pth path or URL, a transformers Blip* checkpoint, or one of our runs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Union

import torch

from framework.config import Config, ConfigError, DistillingConfig, load_config
from framework.distributed import say
from framework.run_env import RunEnv
from framework.task import Recipe, Task
from recipes.common.image_text import RETIRED_IMAGE_KEYS, ImageConfig, make_collate, make_decode
from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.config import PRESETS, ModelConfig, TowersConfig
from recipes.medblip.model.losses import OBJECTIVES
from recipes.medblip.model.weights import fetch_on_rank0, load_pretrained
from recipes.medblip.pretrain.momentum import MomentumUpdate
from recipes.medblip.pretrain.validation import (
    ValidationConfig,
    make_pretrain_evaluator,
)


@dataclass
class BlipConfig(Config):
    """The sections of every MedBLIP recipe: the framework's, the BLIP model and the image pipeline."""

    model: TowersConfig = field(default_factory=TowersConfig)  # the pretraining recipes declare ModelConfig
    image: ImageConfig = field(default_factory=ImageConfig)
    # Saved in run directories' config.yaml by earlier versions: the ViT's size (image.size is its one name now) and
    # the pretraining settings VQA's model: section held before it became the towers alone.
    RETIRED: ClassVar[tuple[str, ...]] = Config.RETIRED + RETIRED_IMAGE_KEYS + tuple(
        f"model.{k}" for k in ("vit.image_size", "embed_dim", "queue_size", "momentum", "alpha", "alpha_ramp_steps",
                               "temp", "tie_lm_head", "max_text_len", "share_image_kv"))

    @classmethod
    def upgrade(cls, data: dict, source: str) -> dict:
        """A model.vit.image_size other than image.size (and the preset's, which saved configs held) is refused."""
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        vit = model.get("vit") if isinstance(model.get("vit"), dict) else {}
        if "image_size" in vit:
            size = (data.get("image") or {}).get("size", ImageConfig.size)
            preset = PRESETS.get(model.get("preset", "base"), ({}, {}))[0].get("image_size")
            if vit["image_size"] not in (size, preset):
                raise ConfigError(f"{source}: model.vit.image_size={vit['image_size']} conflicts with image.size="
                                  f"{size}: the ViT is built for the images it is fed; set image.size alone")
        return super().upgrade(data, source)

    def check(self) -> None:
        self.model.vit.image_size = self.image.size  # the ViT is built for the images it is fed
        if self.image.size % self.model.vit.patch_size:
            raise ConfigError(f"image.size={self.image.size} is not a multiple of model.vit.patch_size="
                              f"{self.model.vit.patch_size}")
        super().check()


@dataclass
class PretrainConfig(BlipConfig, DistillingConfig):
    """dapt.yaml / psd.yaml: BLIP's sections, image-caption shards, self-distillation (psd.yaml) and held-out
    validation (used when data.val is set)."""

    model: ModelConfig = field(default_factory=ModelConfig)

    validation: ValidationConfig = field(default_factory=ValidationConfig)


__all__ = ["BlipConfig", "PretrainConfig", "RECIPE", "build", "build_model", "enabled_objectives", "from_recipe"]


def enabled_objectives(cfg: PretrainConfig) -> set[str]:
    """The objectives switched on in the YAML (all of BLIP's three when the section is empty)."""
    if not cfg.objectives:
        return set(OBJECTIVES)
    enabled = {name for name, o in cfg.objectives.items() if o.enabled}
    if not enabled:
        raise ConfigError(f"{cfg.source}: objectives: every objective is disabled; enable at least one of "
                          f"{', '.join(OBJECTIVES)}")
    return enabled


def model_config(cfg: BlipConfig) -> TowersConfig:
    """cfg.model with the ViT built for image.size (a loaded config has it already; one built in Python may not)."""
    mc = cfg.model
    if mc.vit.image_size != cfg.image.size:
        mc = mc.replace(vit=dataclasses.replace(mc.vit, image_size=cfg.image.size))
    return mc


def check_queue(cfg: PretrainConfig, world_size: int) -> None:
    """Refuse, before any weights are built, a queue that cannot hold whole global batches (BLIP's queue)."""
    global_batch = cfg.data.batch_size * world_size
    size = cfg.model.queue_size
    if "itc" in enabled_objectives(cfg) and size % global_batch:
        below = max(global_batch, size // global_batch * global_batch)
        fits = f"{below} or {below + global_batch}" if below < size else str(below)
        raise ConfigError(f"{cfg.source}: model.queue_size={size} is not a multiple of the global batch "
                          f"{global_batch} (data.batch_size x {world_size} ranks); BLIP's queue needs whole batches: "
                          f"use model.queue_size={fits}")


def build_model(cfg: PretrainConfig, *, load_weights: bool = True) -> MedBlipPretrain:
    """The model with the enabled objectives, initialised identically on every rank, then run.init_from loaded."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights (and queue) on every rank
    model = MedBlipPretrain(model_config(cfg), enabled_objectives(cfg), seed=cfg.train.seed)
    if load_weights and cfg.run.init_from:
        fetch_on_rank0(cfg.run.init_from)  # every rank builds the model: one download, not one per rank
        report = load_pretrained(model, cfg.run.init_from)
        say(report.summary())
        say_missing_heads(report.missing, enabled_objectives(cfg), cfg.run.init_from)
    return model


# The heads each objective trains that only a pretraining checkpoint holds (a VQA run has none of them).
OBJECTIVE_HEADS = {"itc": ("vision_proj.", "text_proj."), "itm": ("itm_head.",)}


def say_missing_heads(missing: list[str], enabled: set[str], source: str) -> list[str]:
    """One warning line when `source` lacks the ITC/ITM heads the enabled objectives train (e.g. PSD started from a
    VQA run): they start from random weights, which a long missing-key list hides. Returns the objectives named."""
    lacking = sorted(o for o in enabled & set(OBJECTIVE_HEADS)
                     if any(m.startswith(OBJECTIVE_HEADS[o]) for m in missing))
    if lacking:
        say(f"warning: run.init_from={source} holds no {' / '.join(o.upper() for o in lacking)} head (a VQA or "
            f"other non-pretraining run?): {', '.join(lacking)} start(s) from random weights; start from a DAPT "
            "run or model_base.pth")
    return lacking


def build(cfg: PretrainConfig, env: RunEnv) -> Task:
    """Config -> Task: MedBlipPretrain (forward returns the enabled losses), BLIP's data pipeline, momentum plugin."""
    check_queue(cfg, env.world_size)
    model = build_model(cfg)
    max_words = 30  # BLIP's pre_caption word limit for pretraining captions (tokens are cut at max_text_len)
    return Task(model=model,
                decode=make_decode(cfg.image, train=True, max_words=max_words),
                collate=make_collate(model.tokenizer, cfg.model.max_text_len),
                plugins=[MomentumUpdate(model, seed=cfg.train.seed)],
                # held-out ITC/ITM/LM losses, retrieval recall@k and sample captions on data.val (None without)
                evaluate=make_pretrain_evaluator(cfg, model.tokenizer, world_size=env.world_size),
                fp32_modules=model.fp32_modules(), activation_bytes=model.activation_bytes)


def from_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None, *,
                load_weights: bool = True) -> MedBlipPretrain:
    """Python API: a recipe YAML (+ dotted overrides) -> MedBlipPretrain with run.init_from loaded (eval() it)."""
    return build_model(load_config(path, overrides), load_weights=load_weights)


RECIPE = Recipe(config=PretrainConfig, objectives=OBJECTIVES, build=build)
