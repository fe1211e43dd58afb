"""CLIP recipe: contrastive-only image-text pretraining on the MedBLIP caption shards (a second, minimal recipe).

It reuses the framework unchanged and MedBLIP's sample decoding, collation and tokenizer; what it adds is a
model (recipes/clip/model.py) and one objective. See docs/demo.md "Adding a recipe".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from framework.config import Config, ConfigError
from framework.run_env import RunEnv
from framework.shards import expand_shards
from framework.streams import SKIPPED, ShardStream
from framework.task import Recipe, Task
from recipes.common.image_text import RETIRED_IMAGE_KEYS, ImageConfig, make_collate, make_decode
from recipes.common.tokenizer import load_tokenizer

from .model import ClipModel, ClipModelConfig


@dataclass
class ClipConfig(Config):
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    RETIRED: ClassVar[tuple[str, ...]] = Config.RETIRED + RETIRED_IMAGE_KEYS


def build(cfg: ClipConfig, env: RunEnv) -> Task:
    """Config -> Task: ClipModel, MedBLIP decode/collate, and retrieval evaluation on data.val when set."""
    enabled = [name for name, o in cfg.objectives.items() if o.enabled]
    if not enabled:
        raise ConfigError(f"{cfg.source}: objectives: no objective is enabled; the clip recipe trains "
                          "'contrastive' (objectives.contrastive.enabled: true)")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = ClipModel(cfg.model, cfg.image.size, len(tokenizer), enabled)
    if cfg.run.init_from:
        load_weights(model, cfg.run.init_from)
    collate = make_collate(tokenizer, cfg.model.max_len)
    evaluate = None
    if cfg.data.val:
        urls = expand_shards(cfg.data.val)
        eval_decode = make_decode(cfg.image, train=False, max_words=cfg.model.max_len)
        evaluate = lambda model, step: retrieval_metrics(model, urls, eval_decode, collate,  # noqa: E731
                                                         cfg.data.batch_size)
    return Task(model=model, decode=make_decode(cfg.image, train=True, max_words=cfg.model.max_len),
                collate=collate, evaluate=evaluate)


def retrieval_metrics(model: ClipModel, urls: list[str], decode: Any, collate: Any, batch_size: int,
                      limit: int = 2000) -> dict[str, float]:
    """Image->text and text->image recall@1 over (at most `limit`) validation pairs.

    A retrieved caption counts as right when its tokens equal the true caption's: identical captions
    (common in radiology) are interchangeable.
    """
    stream = ShardStream(urls, decode, collate, batch_size, shuffle_buffer=0)
    images, texts, ids = [], [], []
    for batch in stream:
        batch.pop(SKIPPED, None)
        dev = model.logit_scale.device
        images.append(model.encode_image(batch["image"].to(dev)))
        texts.append(model.encode_text(batch["input_ids"].to(dev), batch["attention_mask"].to(dev)))
        ids += [tuple(t[m.bool()].tolist()) for t, m in zip(batch["input_ids"], batch["attention_mask"])]
        if len(ids) >= limit:
            break
    sim = torch.cat(images) @ torch.cat(texts).t()
    same = torch.tensor([[a == b for b in ids] for a in ids])
    rows = torch.arange(len(ids))
    return {"i2t_r1": same[rows, sim.argmax(1)].float().mean().item(),
            "t2i_r1": same[sim.argmax(0), rows].float().mean().item(),
            "temp": 1.0 / model.scale().item()}


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict (a .pt/.pth file, {"model"|"module": state_dict} accepted) into `model`, strictly."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"run.init_from: {path} is not a file (a .pt/.pth state dict)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"run.init_from: {path} does not fit the CLIP model: {len(missing)} missing keys "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


RECIPE = Recipe(config=ClipConfig, objectives=("contrastive",), build=build)
