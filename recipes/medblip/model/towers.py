"""BLIP's towers from well-kept libraries: timm's ViT, transformers' BLIP text encoder/decoder, and their fixes.

- `build_vit`: timm `VisionTransformer` with BLIP's key names (patch_embed.proj, cls_token, pos_embed,
  blocks.N.*, norm), LayerNorm eps 1e-6, no head; `forward_features(x) -> [B, 1+N, width]`.
- `build_text_encoder` / `build_text_decoder`: transformers `BlipTextModel` (no pooler, with cross-attention
  layers) / `BlipTextLMHeadModel`, configured as BLIP's bert_config.json (dropout 0.1, LayerNorm eps 1e-12).
- `fix_cross_attention_mask`: transformers drops the cross-attention padding mask;
  applied by both builders, so padded encoder states + mask give the unpadded result.
- `set_text_attention`: transformers' BLIP text attention is written out (matmul, softmax, dropout, matmul; it has
  no attention-implementation switch); "sdpa" swaps in torch's scaled_dot_product_attention (fused kernels, no
  stored probability matrix), "eager" keeps transformers' code. The builders apply `model.text_attention`.
- `tie_text_towers`: BLIP's tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention') at
  HEAD (one word-embedding/LM-head Parameter), or its first commit's argument order (the LM head its own).
- `interpolate_pos_embed`: BLIP's bicubic resize of ViT position embeddings for another image size.
"""
from __future__ import annotations

import functools
import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import use_reentrant_ckpt
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BlipTextConfig
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.blip.modeling_blip_text import (
    BlipTextAttention,
    BlipTextLMHeadModel,
    BlipTextModel,
    BlipTextSelfAttention,
)

from recipes.common.masks import prebuild_padding_masks
from recipes.medblip.model.config import TowersConfig

log = logging.getLogger(__name__)

# bert-base-uncased + BLIP's two added tokens
PAD_ID, SEP_ID, DEC_ID, ENC_ID = 0, 102, 30522, 30523


# ----------------------------------------------------------------------------- vision


def build_vit(cfg: TowersConfig) -> VisionTransformer:
    """timm ViT as BLIP's create_vit: qkv bias, GELU, LayerNorm eps 1e-6, class token, no head."""
    v = cfg.vit
    if v.image_size % v.patch_size:
        raise ValueError(f"image.size={v.image_size} (the ViT's) is not a multiple of model.vit.patch_size="
                         f"{v.patch_size}")
    vit = VisionTransformer(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                            num_heads=v.heads, mlp_ratio=v.mlp_ratio, qkv_bias=True, num_classes=0,
                            drop_path_rate=v.drop_path, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    set_vit_grad_checkpointing(vit, cfg.grad_checkpointing_vit)
    return vit


def set_vit_grad_checkpointing(vit: VisionTransformer, enable: bool) -> None:
    """Per-block activation checkpointing through timm (non-reentrant: safe with ZeRO-2 and shared weights)."""
    if enable and use_reentrant_ckpt():
        raise RuntimeError("timm is set to reentrant checkpointing (timm.layers.set_reentrant_ckpt(True)); "
                           "MedBLIP needs the non-reentrant kind")
    vit.set_grad_checkpointing(enable)


@torch.no_grad()
def interpolate_pos_embed(pos_embed: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """[1, extra+n_old, D] -> [1, extra+n_new, D] by bicubic interpolation of the patch grid (BLIP's function)."""
    num_patches = vit.patch_embed.num_patches
    num_extra = vit.pos_embed.shape[-2] - num_patches
    old = int((pos_embed.shape[-2] - num_extra) ** 0.5)
    new = int(num_patches ** 0.5)
    if old == new:
        return pos_embed
    if old * old + num_extra != pos_embed.shape[-2]:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not a square patch grid "
                         f"plus {num_extra} class token(s)")
    dim = pos_embed.shape[-1]
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    grid = grid.reshape(-1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    log.info("reshape position embedding from %d to %d", old * old, new * new)
    return torch.cat((extra, grid), dim=1)


# ----------------------------------------------------------------------------- text


def text_config(cfg: TowersConfig, vocab_size: int, *, label_smoothing: float | None = None) -> BlipTextConfig:
    """BlipTextConfig matching BLIP's bert_config.json at the recipe's sizes (cross-attention to the ViT width)."""
    t = cfg.text
    ids_fit = vocab_size > ENC_ID  # the bert-base ids only mean something in a bert-base vocabulary
    config = BlipTextConfig(
        vocab_size=vocab_size, hidden_size=t.hidden, encoder_hidden_size=cfg.vit.width,
        intermediate_size=t.intermediate, num_hidden_layers=t.layers, num_attention_heads=t.heads,
        max_position_embeddings=t.max_position, hidden_act="gelu", layer_norm_eps=1e-12,
        hidden_dropout_prob=t.dropout, attention_probs_dropout_prob=t.attention_dropout,
        initializer_range=t.initializer_range, pad_token_id=PAD_ID,
        bos_token_id=DEC_ID if ids_fit else None, eos_token_id=SEP_ID if ids_fit else None,
        sep_token_id=SEP_ID if ids_fit else None,
        label_smoothing=cfg.label_smoothing if label_smoothing is None else label_smoothing,
        is_decoder=True,  # builds the cross-attention layers (BLIP: add_cross_attention=true); the mask
        use_cache=False,  # is chosen per call (is_decoder=False in the forward = bidirectional)
    )
    # BLIP's text modules implement attention themselves (SdpaSelfAttention too); "eager" makes transformers build
    # the additive float masks [B, 1, Q, K] (0 = attend, dtype min = masked) that both implementations take
    config._attn_implementation = "eager"
    return config


def build_text_encoder(cfg: TowersConfig, vocab_size: int) -> BlipTextModel:
    """BLIP's text encoder (BertModel, add_pooling_layer=False) with cross-attention layers; mask fix applied."""
    encoder = BlipTextModel(text_config(cfg, vocab_size), add_pooling_layer=False)
    prebuild_padding_masks(encoder, _embeddings_dtype)  # no host sync per text pass (recipes/common/masks.py)
    fix_cross_attention_mask(encoder)
    set_text_attention(encoder, cfg.text_attention)
    set_text_grad_checkpointing(encoder, cfg.grad_checkpointing_text)
    return encoder


def build_text_decoder(cfg: TowersConfig, vocab_size: int) -> BlipTextLMHeadModel:
    """BLIP's text decoder (BertLMHeadModel: bert + cls head) with label smoothing; mask fix applied."""
    decoder = BlipTextLMHeadModel(text_config(cfg, vocab_size))
    prebuild_padding_masks(decoder.bert, _embeddings_dtype)
    fix_cross_attention_mask(decoder)
    set_text_attention(decoder, cfg.text_attention)
    set_text_grad_checkpointing(decoder, cfg.grad_checkpointing_text)
    return decoder


def _embeddings_dtype(model: nn.Module, kwargs: dict) -> torch.dtype:
    """The dtype BlipTextModel builds its masks in: its embeddings' output dtype."""
    return model.embeddings.LayerNorm.weight.dtype


def set_text_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """Non-reentrant activation checkpointing per text layer (transformers' own layer mechanism)."""
    fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = enable
            module._gradient_checkpointing_func = fn


class MaskedCrossAttention(BlipTextAttention):
    """BlipTextAttention whose cross-attention honours the encoder padding mask.

    transformers (4.57, 5.x) passes the encoder mask as `attention_mask`, and BlipTextSelfAttention then
    replaces it with its `encoder_attention_mask` argument, which nobody sets: padding is attended to.
    BLIP's med.py masks it. Here the mask reaches the attention under the name that is used.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        mask = attention_mask if attention_mask is not None else kwargs.get("encoder_attention_mask")
        kwargs.pop("encoder_attention_mask", None)
        outputs = self.self(hidden_states, attention_mask=mask, encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=mask, **kwargs)  # kwargs: the cache, as transformers passes it
        return (self.output(outputs[0], hidden_states),) + tuple(outputs[1:])


def fix_cross_attention_mask(model: nn.Module) -> int:
    """Make every `crossattention` block of a BLIP text model use the encoder mask; returns how many."""
    n = 0
    for name, module in model.named_modules():
        if name.endswith("crossattention") and type(module) is BlipTextAttention:
            module.__class__ = MaskedCrossAttention  # same parameters and key names, corrected forward
            n += 1
    return n


class SdpaSelfAttention(BlipTextSelfAttention):
    """BlipTextSelfAttention through torch's scaled_dot_product_attention: the same math, one fused call.

    softmax(Q K^T / sqrt(d) + mask) V with dropout on the attention weights, as transformers' eager code, but without
    materialising the [B, heads, Q, K] probabilities for backward where a fused kernel runs (memory-efficient
    kernels on GPUs from sm_60, flash on the CPU without dropout). Projections, the key/value cache (generation) and
    the masks are transformers' (the additive masks `text_config` asks for). Returns no attention probabilities:
    attention maps need model.text_attention=eager.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross else attention_mask
        # the key/value cache exactly as BlipTextSelfAttention keeps it (cross-attention keys computed once)
        layer_cache, reuse = cache, False
        if cache is not None and isinstance(cache, EncoderDecoderCache):
            reuse = is_cross and bool(cache.is_updated.get(self.layer_idx))
            layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if reuse:
            key, value = layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
        else:
            states = encoder_hidden_states if is_cross else hidden_states
            kv_shape = (*states.shape[:-1], -1, self.attention_head_size)
            key = self.key(states).view(kv_shape).transpose(1, 2)
            value = self.value(states).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                if is_cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        if mask is not None:
            mask = mask.to(device=query.device, dtype=query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                 dropout_p=self.dropout.p if self.training else 0.0)
        return context.transpose(1, 2).reshape(*input_shape, self.all_head_size), None


TEXT_ATTENTION = {"sdpa": SdpaSelfAttention, "eager": BlipTextSelfAttention}


def set_text_attention(model: nn.Module, kind: str) -> int:
    """Run every self- and cross-attention of a BLIP text model as `kind` (sdpa | eager); returns how many.

    Only the modules' class changes: parameters, key names, state dicts and deepcopies are untouched.
    """
    if kind not in TEXT_ATTENTION:
        raise ValueError(f"model.text_attention: unknown {kind!r}; known: {', '.join(TEXT_ATTENTION)}")
    n = 0
    for module in model.modules():
        if type(module) in (BlipTextSelfAttention, SdpaSelfAttention):
            module.__class__ = TEXT_ATTENTION[kind]
            n += 1
    return n


_SELF_ATTENTION = re.compile(r"(^|\.)attention(\.|$)")  # BLIP's skip key '/attention' ('crossattention' is tied)


def lm_head_is_tied(decoder: BlipTextLMHeadModel) -> bool:
    """Whether the decoder's LM head output weight is its word-embedding Parameter (BertLMHeadModel's tie)."""
    return decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def tie_text_towers(encoder: BlipTextModel, decoder: BlipTextLMHeadModel, *, lm_head: bool = True) -> list[str]:
    """Share every weight of encoder and decoder.bert except self-attention, as BLIP's pretraining model.

    lm_head=True, BLIP at HEAD (tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention')): the
    encoder takes the decoder's Parameters, and as the decoder's word embeddings are its LM head's output weight,
    encoder embeddings = decoder embeddings = LM head: one Parameter. lm_head=False, BLIP's first commit (the
    arguments the other way round): the decoder takes the encoder's Parameters and the LM head keeps the decoder's
    original embedding tensor, a weight of its own. The LM bias (cls.predictions.bias) is decoder.bias either way.
    Returns the tied module names (decoder.bert names).
    """
    if lm_head and not lm_head_is_tied(decoder):  # transformers ties them unless tie_word_embeddings is off
        decoder.cls.predictions.decoder.weight = decoder.bert.embeddings.word_embeddings.weight
    decoder.cls.predictions.decoder.bias = decoder.cls.predictions.bias
    tied = []
    enc_modules = dict(encoder.named_modules())
    for name, dec_mod in decoder.bert.named_modules():
        if "weight" not in dec_mod._parameters or _SELF_ATTENTION.search(name):
            continue
        enc_mod = enc_modules.get(name)
        if enc_mod is None or "weight" not in enc_mod._parameters:
            raise ValueError(f"cannot tie decoder module {name!r}: the encoder has no such module")
        source, target = (dec_mod, enc_mod) if lm_head else (enc_mod, dec_mod)
        for attr in ("weight", "bias"):
            d, e = dec_mod._parameters.get(attr), enc_mod._parameters.get(attr)
            if d is None and e is None:
                continue
            if d is None or e is None or d.shape != e.shape:
                raise ValueError(f"cannot tie {name}.{attr}: shapes differ between encoder and decoder")
            setattr(target, attr, source._parameters[attr])
        tied.append(name)
    return tied


def untie_lm_head(decoder: BlipTextLMHeadModel) -> None:
    """Give the LM head an output weight of its own (a copy of the shared one), as BLIP's first commit has it."""
    head = decoder.cls.predictions.decoder
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
