"""A minimal CLIP: timm ViT + transformers BERT, projections, learnable temperature, symmetric InfoNCE."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BertConfig, BertModel

from framework.config import ConfigError

from .loss import contrastive_loss, gather_with_grad


@dataclass
class ClipModelConfig:
    """Tower sizes (defaults: ViT-B/16 and BERT-base, as BLIP's towers) and the contrastive head."""

    patch_size: int = 16  # the image side comes from the image: section
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    max_len: int = 30  # caption tokens, as BLIP's pretraining
    vision_pool: str = "token"  # image feature: "token" ([CLS], as CLIP) | "avg" (mean of patch tokens)
    embed_dim: int = 256  # shared embedding space
    temp: float = 0.07  # initial temperature (CLIP: 0.07) ...
    temp_min: float = 0.01  # ... clamped from below (CLIP caps the logit scale at 100)
    tokenizer: str = "bundled"  # as MedBLIP's model.tokenizer: bundled | a local directory | a hub name
    gather: bool = True  # contrast against the whole global batch (all ranks), as open_clip does

    def check(self) -> None:
        if self.vision_pool not in ("token", "avg"):
            raise ConfigError(f"model.vision_pool must be token or avg, got {self.vision_pool!r}")
        if not 0 < self.temp_min <= self.temp:
            raise ConfigError(f"model.temp_min must be in (0, model.temp], got {self.temp_min} (temp {self.temp})")


class ClipModel(nn.Module):
    """forward(batch {"image": [B,3,H,W], "input_ids"/"attention_mask": [B,L]}) -> {"losses", "metrics"}."""

    def __init__(self, cfg: ClipModelConfig, image_size: int, vocab_size: int, objectives: list[str]):
        super().__init__()
        self.cfg, self.objectives = cfg, objectives
        self.visual = VisionTransformer(img_size=image_size, patch_size=cfg.patch_size,
                                        embed_dim=cfg.vision_width, depth=cfg.vision_depth,
                                        num_heads=cfg.vision_heads, num_classes=0, global_pool=cfg.vision_pool,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.text = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=cfg.text_width,
                                         num_hidden_layers=cfg.text_depth, num_attention_heads=cfg.text_heads,
                                         intermediate_size=4 * cfg.text_width,
                                         max_position_embeddings=max(512, cfg.max_len)), add_pooling_layer=False)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        # CLIP's parameterisation; shape [1], not [], because DeepSpeed's broadcast cannot view a 0-dim tensor.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.temp)))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped so the temperature stays >= temp_min."""
        return self.logit_scale.float().clamp(max=math.log(1 / self.cfg.temp_min)).exp().squeeze(0)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B, embed_dim], L2-normalised."""
        dtype = self.vision_proj.weight.dtype  # DeepSpeed half precision does not cast inputs
        return F.normalize(self.vision_proj(self.visual(image.to(dtype))).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B,L] token ids + mask -> [B, embed_dim], L2-normalised ([CLS] state projected)."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        if self.cfg.gather:
            image, text = gather_with_grad(image), gather_with_grad(text)
        scale = self.scale()
        losses = {}
        if "contrastive" in self.objectives:
            losses["contrastive"] = contrastive_loss(image, text, scale)
        with torch.no_grad():
            hits = (image @ text.t()).argmax(1) == torch.arange(len(image), device=image.device)
        return {"losses": losses, "metrics": {"temp": 1.0 / scale.detach(), "acc_i2t": hits.float().mean()}}
