"""Config -> Blip2Stage1 / Blip2LLM for the three BLIP-2 recipes: tokenizers, sizes, precision policy, weights (printed report)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Union

import torch

from framework.config import Config, ConfigError, DistillingConfig
from framework.distributed import say
from framework.run_env import RunEnv
from framework.master_weights import MasterClamp
from framework.task import Task
from recipes.medblip.model.weights import CheckpointError
from recipes.common.image_text import RETIRED_IMAGE_KEYS, ImageConfig
from recipes.medblip.model.weights import fetch_on_rank0

from .config import Blip2ModelConfig
from .llm_model import Blip2LLM
from .qformer_model import Blip2Base
from .stage1_model import STAGE1, Blip2Stage1
from .objectives import TEMP_MAX, TEMP_MIN
from .tokenizers import llm_tokenizer, qformer_tokenizer
from .weights import load_pretrained, weight_sources


@dataclass
class Blip2Config(Config):
    """The sections of every BLIP-2 recipe: the framework's + the BLIP-2 towers and the image pipeline."""

    model: Blip2ModelConfig = field(default_factory=Blip2ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    RETIRED: ClassVar[tuple[str, ...]] = Config.RETIRED + RETIRED_IMAGE_KEYS


@dataclass
class Blip2PretrainConfig(Blip2Config, DistillingConfig):
    """stage1.yaml / stage2.yaml: the BLIP-2 sections and self-distillation (distill:)."""


def task_for(model: Blip2Base, **fields) -> Task:
    """A Task around a BLIP-2 model with what the framework must know of it declared: the parts kept fp32 under fp16, the
    frozen towers (an EMA teacher shares them), the activation estimate; `temp` clamped in its fp32 master too."""
    plugins = [MasterClamp("blip2_temp", model.temp, TEMP_MIN, TEMP_MAX)] if isinstance(model, Blip2Stage1) else []
    return Task(model=model, fp32_modules=model.fp32_modules(), frozen_modules=model.frozen_modules(),
                activation_bytes=model.activation_bytes, plugins=plugins, **fields)


def enabled(cfg: Config, known: tuple[str, ...]) -> tuple[str, ...]:
    """The objectives switched on in the YAML (all of `known` when the section is empty)."""
    if not cfg.objectives:
        return known
    names = tuple(n for n in known if n in cfg.objectives and cfg.objectives[n].enabled)
    if not names:
        raise ConfigError(f"{cfg.source}: objectives: every objective is disabled; enable one of {', '.join(known)}")
    return names


def keep_trainable_fp32(env: Optional[RunEnv]) -> bool:
    """Whether the trainable part stays fp32: when the engine trains in fp16 and DeepSpeed does not own the
    parameters in fp16 partitions (ZeRO stage 3). False outside training (no RunEnv)."""
    if env is None or env.precision.name != "fp16":
        return False
    if env.zero_stage >= 3:
        say("blip2: ZeRO stage 3 partitions every parameter in fp16: the Q-Former trains in fp16 (LAVIS #267's risk)")
        return False
    return True


def _tokenizer_dir(cfg: Config) -> Optional[str]:
    mc = cfg.model
    if mc.llm_tokenizer:
        return mc.llm_tokenizer
    for where in (mc.llm_weights, cfg.run.init_from):
        if where and Path(where).is_dir() and any(Path(where).glob("tokenizer*")):
            return where
    return None


WEIGHT_KEYS = {"run.init_from": "the Q-Former (LAVIS's blip2_pretrained.pth), a transformers Blip2 directory or a run",
               "model.vision_weights": "the frozen ViT (LAVIS's eva_vit_g.pth)",
               "model.llm_weights": "the frozen language model (a transformers OPT / T5 directory)"}


def check_weight_files(cfg: Config) -> None:
    """Refuse a local weights path that does not exist in one line naming its key: BLIP-2's weights are never
    downloaded, so the user must place the file or change (or null) that key."""
    values = {"run.init_from": cfg.run.init_from, "model.vision_weights": cfg.model.vision_weights,
              "model.llm_weights": cfg.model.llm_weights}
    for key, where in values.items():
        if where and not str(where).startswith(("http://", "https://")) and not Path(where).exists():
            raise CheckpointError(f"{key}: checkpoint not found: {where} ({WEIGHT_KEYS[key]}; nothing is downloaded: "
                                  f"put the file there, point {key} at it, or set {key}=null to start that part "
                                  "from random weights)")


def build_model(cfg: Config, *, stage: str, load_weights: bool = True,
                env: Optional[RunEnv] = None) -> Union[Blip2Stage1, Blip2LLM]:
    """stage "stage1" (Q-Former heads, no LLM) | "lm" (captions through the LLM) | "vqa" (answers); weights from
    run.init_from + model.vision_weights + model.llm_weights, the same initial weights on every rank."""
    mc = cfg.model
    if load_weights:
        check_weight_files(cfg)  # before minutes of building ViT-g / OPT-2.7B
    torch.manual_seed(cfg.train.seed)
    if stage == "stage1":
        model = Blip2Stage1(mc, image_size=cfg.image.size, tokenizer=qformer_tokenizer(mc.tokenizer),
                            objectives=enabled(cfg, STAGE1))
    else:
        enabled(cfg, (stage,))
        model = Blip2LLM(mc, image_size=cfg.image.size, llm_tokenizer=llm_tokenizer(_tokenizer_dir(cfg)),
                         lm_objective=stage)
    model.keep_trainable_fp32 = keep_trainable_fp32(env)
    sources = weight_sources(cfg.run.init_from, mc.vision_weights, mc.llm_weights)
    if load_weights and sources:
        for spec, _ in sources:  # every rank builds the model: one download per URL, not one per rank
            fetch_on_rank0(spec)
        report = load_pretrained(model, sources)
        say(report.summary())
        frozen = [m for m in report.missing if m.startswith(("vision_model.", "language_model."))]
        if frozen:
            say(f"warning: {len(frozen)} tensors of the FROZEN towers are not in {report.source} and stay random "
                "(set model.vision_weights / model.llm_weights)")
    elif load_weights:
        say("blip2: run.init_from is not set: every tower starts from random weights (the frozen ones stay so)")
    return model
