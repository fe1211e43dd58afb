"""The `model:` section of the BLIP-2 recipes -> transformers' Blip2Config (ViT, Q-Former, language model sizes).

Sizes come from a preset (the published shapes, known without any file) with per-tower overrides on top, so the
full-size recipes validate and the memory estimate runs without weights. Presets:
- `blip2-opt-2.7b`: EVA ViT-g/14 (1408 wide, 39 layers), BERT-base Q-Former (cross-attention every 2nd layer,
  32 queries), OPT-2.7B (2560 wide, 32 layers) — `Salesforce/blip2-opt-2.7b`'s config.
- `blip2-flan-t5-xl`: the same ViT and Q-Former, Flan-T5-XL (d_model 2048, 24+24 layers).
- `tiny`: 2-layer towers of width 32-64 for tests and the CPU demo.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from framework.config import ConfigError

# The published shapes (transformers' configs for Salesforce/blip2-opt-2.7b and facebook/opt-2.7b).
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
QFORMER_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    cross_attention_frequency=2, layer_norm_eps=1e-12, max_position_embeddings=512)
OPT_2_7B = dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                word_embed_proj_dim=2560, vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
                dropout=0.1, attention_dropout=0.0, activation_function="relu", bos_token_id=2, eos_token_id=2,
                pad_token_id=1)
FLAN_T5_XL = dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24,
                  num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                patch_size=8, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02)  # ViT-g's 1e-10 assumes loading
TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    cross_attention_frequency=1, layer_norm_eps=1e-12, max_position_embeddings=64,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_OPT = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                word_embed_proj_dim=32, max_position_embeddings=128, do_layer_norm_before=True, dropout=0.0,
                attention_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # WordPiece's [PAD]/[CLS]/[SEP]
PRESETS: dict[str, dict[str, dict]] = {
    "blip2-opt-2.7b": {"vision": VIT_G, "qformer": QFORMER_BASE, "text": OPT_2_7B},
    "blip2-flan-t5-xl": {"vision": VIT_G, "qformer": QFORMER_BASE, "text": FLAN_T5_XL},
    "tiny": {"vision": TINY_VIT, "qformer": TINY_QFORMER, "text": TINY_OPT},
}
LANGUAGE_MODELS = ("opt", "t5")


@dataclass
class Blip2ModelConfig:
    """Tower sizes (preset + overrides), tokenizers, and the few switches of the objectives."""

    preset: str = "blip2-opt-2.7b"  # blip2-opt-2.7b | blip2-flan-t5-xl | tiny
    vision: dict = field(default_factory=dict)  # Blip2VisionConfig overrides (image_size follows image.size)
    qformer: dict = field(default_factory=dict)  # Blip2QFormerConfig overrides (vocab_size: the tokenizer's)
    text: dict = field(default_factory=dict)  # language model overrides (OPTConfig / T5Config fields)
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC feature size (vision_projection / text_projection)
    tokenizer: str = "bundled"  # Q-Former tokenizer: bert-base-uncased (bundled) or a vocab.txt / directory; + [DEC]
    vision_weights: Optional[str] = None  # the frozen ViT when run.init_from lacks it (LAVIS: eva_vit_g.pth)
    llm_weights: Optional[str] = None  # the frozen LLM when run.init_from lacks it (a transformers OPT/T5 directory)
    llm_tokenizer: Optional[str] = None  # the language model's tokenizer: a local directory (the blip2-opt-2.7b
                                         # download holds one) or a vocab.txt; None = the llm_weights or
                                         # run.init_from directory
    end_text: str = "\n"  # what ends a caption/answer for a decoder-only LM (LAVIS: "\n" for OPT)
    max_text_len: int = 32  # Q-Former caption tokens (LAVIS: 32)
    max_llm_len: int = 64  # language-model tokens of prompt + caption/answer
    temp: float = 0.07  # initial ITC temperature (learnable, clamped to BLIP's [0.001, 0.5]; LAVIS's BLIP-2 does not)
    itc_label_smoothing: float = 0.1  # LAVIS's ITC
    itg_label_smoothing: float = 0.1  # LAVIS's Q-Former LM head (BertLMHeadModel)
    grad_checkpointing: bool = False  # Q-Former activation checkpointing (non-reentrant)
    grad_checkpointing_llm: bool = False  # the frozen LLM's too: its activations carry the soft prompt's gradient
    prompt: str = "Question: {} Answer:"  # the VQA prompt (BLIP-2 paper); captions use no prompt

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.num_query_tokens < 1 or self.embed_dim < 1:
            raise ConfigError("model.num_query_tokens and model.embed_dim must be >= 1")
        if not 0.001 <= self.temp <= 0.5:
            raise ConfigError(f"model.temp must be in [0.001, 0.5] (LAVIS's clamp), got {self.temp}")
        kind = self.text_dict().get("model_type")
        if kind not in LANGUAGE_MODELS:
            raise ConfigError(f"model.text.model_type must be one of {', '.join(LANGUAGE_MODELS)}, got {kind!r}")
        if "{}" not in self.prompt:
            raise ConfigError(f"model.prompt must hold {{}} where the question goes, got {self.prompt!r}")
        from transformers import AutoConfig, Blip2QFormerConfig, Blip2VisionConfig

        tower = PRESETS[self.preset]
        self.vision = check_tower("model.vision", self.vision, Blip2VisionConfig, tower["vision"])
        self.qformer = check_tower("model.qformer", self.qformer, Blip2QFormerConfig, tower["qformer"])
        base = {k: v for k, v in tower["text"].items() if k != "model_type"}
        text = check_tower("model.text", {k: v for k, v in self.text.items() if k != "model_type"},
                           type(AutoConfig.for_model(kind)), base if tower["text"]["model_type"] == kind else {})
        self.text = {**({"model_type": self.text["model_type"]} if "model_type" in self.text else {}), **text}

    def vision_dict(self, image_size: Optional[int] = None) -> dict[str, Any]:
        out = {**PRESETS[self.preset]["vision"], **self.vision}
        if image_size is not None:
            out["image_size"] = image_size
        return out

    def qformer_dict(self, vocab_size: int, text_input: bool) -> dict[str, Any]:
        return {**PRESETS[self.preset]["qformer"], **self.qformer, "vocab_size": vocab_size,
                "use_qformer_text_input": text_input}

    def text_dict(self) -> dict[str, Any]:
        return copy.deepcopy({**PRESETS[self.preset]["text"], **self.text})

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_dict()["model_type"] == "t5"


# Token ids any transformers config takes as keyword arguments, whether or not its class declares them as fields.
GENERIC_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
                "tie_word_embeddings"}


def check_tower(path: str, overrides: dict[str, Any], cls: type, base: dict[str, Any]) -> dict[str, Any]:
    """`overrides` of the transformers config `cls` checked (on top of the preset's `base`), numbers written as
    integers or YAML strings ("1e-6") made floats where the field is one. Refuses, in one line naming the key
    path, a key `cls` does not know (transformers would keep a typo as a silent extra attribute) or a value of
    another type than the field's default."""
    import dataclasses
    import difflib

    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)} | set(defaults.to_dict()) | GENERIC_KEYS
    out = dict(overrides)
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{path}.{key}: unknown key ({cls.__name__} has no such field{hint})")
        default = getattr(defaults, key, None)
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) == isinstance(default, bool) or default is None
        elif isinstance(default, float):
            try:
                out[key] = value = float(value) if isinstance(value, (int, str)) else value
            except ValueError:
                pass
            ok = isinstance(value, float)
        elif isinstance(default, (int, str)):
            ok = isinstance(value, type(default))
        else:
            ok = True  # None or a structure by default: transformers' own validation below
        if not ok:
            raise ConfigError(f"{path}.{key}: expected {type(default).__name__}, got {value!r}")
    try:
        cls(**{**base, **out})
    except Exception as e:  # transformers' strict validation: its last line names field and type
        raise ConfigError(f"{path}: {str(e).strip().splitlines()[-1].strip()}") from None
    return out


def hf_config(mc: Blip2ModelConfig, *, image_size: int, qformer_vocab: int, text_input: bool,
              llm_vocab: Optional[int] = None, language_model: bool = True) -> Any:
    """transformers.Blip2Config for these sizes; llm_vocab fills text.vocab_size when the preset leaves it open
    (without a language model the text config is a placeholder nobody builds)."""
    from transformers import (
        AutoConfig,
        Blip2Config,
        Blip2QFormerConfig,
        Blip2VisionConfig,
    )

    vision = Blip2VisionConfig(**mc.vision_dict(image_size))
    qformer = Blip2QFormerConfig(**mc.qformer_dict(qformer_vocab, text_input))
    text = mc.text_dict()
    kind = text.pop("model_type")
    if "vocab_size" not in text:
        if llm_vocab is None and not language_model:
            llm_vocab = 64  # a placeholder above the presets' special-token ids
        if llm_vocab is None:
            raise ConfigError("model.text.vocab_size is not set and no language-model tokenizer gives one")
        text["vocab_size"] = llm_vocab
    text_config = AutoConfig.for_model(kind, **text)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text_config.to_dict(), num_query_tokens=mc.num_query_tokens,
                       image_text_hidden_size=mc.embed_dim)
