"""The `model:` section of the MedBLIP recipes: the towers (a preset or explicit sizes; VQA) and BLIP's pretraining
settings on top of them (ModelConfig)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from framework.config import ConfigError


@dataclass
class VisionConfig:
    """timm ViT sizes; None takes the preset's value."""

    # Not a YAML key: the recipes build the ViT for image.size (BLIP pretrains at 224, its VQA at 480, the study 224)
    image_size: Optional[int] = field(default=None, metadata={"yaml": False})
    patch_size: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    drop_path: float = 0.0  # BLIP's pretraining ViT uses 0


@dataclass
class TextConfig:
    """BERT sizes of the text encoder/decoder; None takes the preset's value."""

    hidden: Optional[int] = None
    layers: Optional[int] = None
    heads: Optional[int] = None
    intermediate: Optional[int] = None
    max_position: Optional[int] = None
    dropout: float = 0.1  # BLIP's bert_config.json: hidden_dropout_prob
    attention_dropout: float = 0.1  # BLIP's bert_config.json: attention_probs_dropout_prob
    # Std of the random initial weights (BERT's initializer_range, sized for width 768; a checkpoint replaces them).
    # A narrow tower trained from scratch needs more: at width 64 and 0.02 its [CLS] output barely depends on the
    # text (cosine 1.000 between captions) and ITM does not start (docs/demo.md).
    initializer_range: float = 0.02


PRESETS: dict[str, tuple[dict, dict]] = {
    # ViT-B/16 + BERT-base, as BLIP's model_base.pth
    "base": (dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_ratio=4.0),
             dict(hidden=768, layers=12, heads=12, intermediate=3072, max_position=512)),
    # for tests and the offline demo
    "tiny": (dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_ratio=2.0),
             dict(hidden=32, layers=2, heads=2, intermediate=64, max_position=64)),
}


@dataclass
class TowersConfig:
    """The BLIP towers: sizes from `preset` unless set under vit:/text:, and how the text towers run."""

    preset: str = "base"  # base | tiny
    vit: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    label_smoothing: float = 0.1  # LM loss; BLIP's med.py hard-codes 0.1
    grad_checkpointing_vit: bool = False  # non-reentrant activation checkpointing per ViT block
    grad_checkpointing_text: bool = False  # ... per text encoder/decoder layer
    # text-tower attention: sdpa = torch's fused scaled_dot_product_attention; eager = transformers' written-out
    # code (BLIP's med.py math), the one that can return attention maps (output_attentions, Grad-CAM)
    text_attention: str = "sdpa"
    tokenizer: str = "bundled"  # bundled bert-base-uncased vocab | a local directory | a hub name (cached)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        vit, text = PRESETS[self.preset]
        if isinstance(self.vit, dict):  # built directly from Python with plain dicts
            self.vit = VisionConfig(**self.vit)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        for section, defaults in ((self.vit, vit), (self.text, text)):
            for k, v in defaults.items():
                if getattr(section, k) is None:
                    setattr(section, k, v)
        self.check()

    def check(self) -> None:
        """Sizes that fit together. (The image size is checked where it is decided: the recipes build the ViT for
        image.size.)"""
        v, t = self.vit, self.text
        if v.width % v.heads:
            raise ConfigError(f"model.vit.width={v.width} is not a multiple of model.vit.heads={v.heads}")
        if t.hidden % t.heads:
            raise ConfigError(f"model.text.hidden={t.hidden} is not a multiple of model.text.heads={t.heads}")
        if self.text_attention not in ("sdpa", "eager"):
            raise ConfigError(f"model.text_attention must be sdpa or eager, got {self.text_attention!r}")

    def replace(self, **changes) -> "TowersConfig":
        """A copy with some fields changed (sizes re-validated)."""
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(TowersConfig):
    """BLIP's pretraining model: the towers plus its ITC/ITM/LM settings."""

    embed_dim: int = 256  # ITC projection size
    queue_size: int = 57600  # BLIP's default; the study used 256. Must be a multiple of the global batch
    momentum: float = 0.995  # momentum-encoder decay
    alpha: float = 0.4  # weight of the momentum-distilled ITC targets (the study: 0)
    alpha_ramp_steps: int = 0  # BLIP ramps alpha from 0 over its first 2 epochs; 0 = constant alpha
    temp: float = 0.07  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    # BLIP at HEAD: text-encoder and decoder word embeddings and the LM head's output weight are one Parameter;
    # false: BLIP's first commit, the LM head a weight of its own (+vocab x hidden parameters). Loading a file
    # whose LM head differs from its word embeddings keeps them apart either way (said in the load report).
    tie_lm_head: bool = True
    max_text_len: int = 30  # tokens per caption (BLIP pretraining: 30)
    share_image_kv: bool = True  # project the image tokens for cross-attention once per step (ITM + LM passes)

    def check(self) -> None:
        """The towers' checks, then the pretraining settings' ranges."""
        super().check()
        if self.max_text_len > self.text.max_position:
            raise ConfigError(f"model.max_text_len={self.max_text_len} exceeds model.text.max_position="
                              f"{self.text.max_position}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"model.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"model.momentum must be in [0, 1], got {self.momentum}")
        if self.queue_size < 1:
            raise ConfigError(f"model.queue_size must be >= 1, got {self.queue_size}")
