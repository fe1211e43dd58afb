"""What every BLIP-2 stage shares: the frozen ViT, the learned query tokens and the Q-Former (transformers' modules).

Submodule names are transformers' own, so a `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`
`save_pretrained` directory loads by name: vision_model (Blip2VisionModel; its post_layernorm is LAVIS's
ln_vision), query_tokens, qformer (Blip2QFormerModel). The stages add their own parts in subclasses:
recipes.blip2.stage1_model.Blip2Stage1 (the ITC/ITM/ITG text heads) and recipes.blip2.llm_model.Blip2LLM (the
frozen language model, for stage 2 and VQA).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
from torch import nn
from transformers import Blip2QFormerModel, Blip2VisionModel

from framework.preflight import transformer_activation_bytes

from recipes.common.masks import prebuild_padding_masks

from .config import Blip2ModelConfig

LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is nn.LayerNorm(width) at torch's default eps (the ViT's own use EVA's 1e-6)


class _ParameterView(nn.Module):
    """Bare parameters of the model (query_tokens, temp) as a module, so that casting it casts them in place.
    Made on demand and never attached to the model (its names would otherwise appear twice in state_dict)."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)


class _DropMissingInputEmbeddings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "does not expose input embeddings" not in record.getMessage()


@contextlib.contextmanager
def _quiet_missing_input_embeddings() -> Iterator[None]:
    """Drop transformers' "Blip2QFormerModel does not expose input embeddings" warning while checkpointing is
    switched on: our text embeddings and query tokens live outside the Q-Former and already require grad, and
    non-reentrant checkpointing does not need the input hook it warns about. Nothing else is filtered."""
    logger = logging.getLogger("transformers.modeling_utils")
    dropped = _DropMissingInputEmbeddings()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def _qformer_dtype(qformer: nn.Module, kwargs: dict) -> torch.dtype:
    """The dtype Blip2QFormerModel builds its masks in: its query_embeds' (the embeddings' output)."""
    embeds = kwargs.get("query_embeds")
    return embeds.dtype if isinstance(embeds, torch.Tensor) else qformer.layernorm.weight.dtype


class Blip2Base(nn.Module):
    """The frozen ViT + query tokens + Q-Former; forward(batch) -> {"losses", "metrics", "reuse"[, "logits"]} with
    the losses from the subclass's batch_losses."""

    towers = ("vision_model", "qformer")  # what train.compile compiles (framework.compile); the LLM stays eager

    def __init__(self, mc: Blip2ModelConfig, config: Any):
        """`config`: transformers' Blip2Config for these sizes (recipes.blip2.config.hf_config)."""
        super().__init__()
        self.mc, self.config = mc, config
        self.keep_trainable_fp32 = False  # set by the recipe under fp16 (see fp32_modules)
        q = config.qformer_config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, mc.num_query_tokens, q.hidden_size).normal_(0.0, 0.02))
        self.qformer = Blip2QFormerModel(q)
        prebuild_padding_masks(self.qformer, _qformer_dtype)  # no host sync per Q-Former pass (recipes/common/masks)
        self._copy_text_ffn_to_query_ffn()
        # BLIP-2 trains with the image encoder frozen (LAVIS freeze_vit) but its final LayerNorm (LAVIS's ln_vision,
        # transformers' post_layernorm) is LAVIS's own module and trains with the Q-Former
        self.vision_model.requires_grad_(False)
        self.vision_model.post_layernorm.requires_grad_(True)
        # transformers builds post_layernorm with the ViT's layer_norm_eps (1e-6); on low-variance image tokens
        # LAVIS's 1e-5 moves the embeddings by up to 1e-2, so ours takes LAVIS's (the weights are the same tensors)
        self.vision_model.post_layernorm.eps = LN_VISION_EPS
        if mc.grad_checkpointing:
            with _quiet_missing_input_embeddings():
                self.qformer.activation_checkpointing_enable({"use_reentrant": False})
        self.vision_model.eval()

    def _copy_text_ffn_to_query_ffn(self) -> None:
        """LAVIS starts the query FFN (intermediate_query/output_query) as a copy of the text FFN (which only a
        Q-Former built with text input, stage 1's, has)."""
        if not self.config.qformer_config.use_qformer_text_input:
            return
        with torch.no_grad():
            for layer in self.qformer.encoder.layer:
                layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
                layer.output_query.load_state_dict(layer.output.state_dict())

    def train(self, mode: bool = True) -> "Blip2Base":
        super().train(mode)
        self.vision_model.eval()  # a frozen tower without dropout noise (LAVIS: disabled_train)
        return self

    # ------------------------------------------------------------------ what the engine is told

    def frozen_modules(self) -> list[nn.Module]:
        """The towers that never change (the ViT but its trained final LayerNorm; a subclass adds its LLM): an EMA
        teacher shares them instead of holding its own copy."""
        return [self.vision_model.embeddings, self.vision_model.encoder]

    def bare_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters held outside any submodule, by attribute name (a subclass adds its own)."""
        return {"query_tokens": self.query_tokens}

    def trainable_heads(self) -> list[nn.Module]:
        """The subclass's trainable submodules besides the Q-Former, in registration order."""
        return []

    def fp32_modules(self) -> list[nn.Module]:
        """Everything trainable, kept fp32 when DeepSpeed trains in fp16 (the engine casts these back after it).

        LAVIS #267: a Q-Former trained in fp16 sends the LM loss to inf; LAVIS trains it in fp32 under autocast
        (transformers keeps query_tokens and the Q-Former in fp32 too). Only under fp16 (keep_trainable_fp32, set
        by the recipe): bf16 has fp32's range and trains it in bf16. The frozen ViT and LLM stay half.
        """
        if not self.keep_trainable_fp32:
            return []
        return ([_ParameterView(self.bare_parameters()), self.vision_model.post_layernorm, self.qformer]
                + self.trainable_heads())

    # ------------------------------------------------------------------ image side

    def vit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the frozen ViT's tokens before its final LayerNorm [B, 1 + N, Dv] (no graph)."""
        with torch.no_grad():
            vm = self.vision_model
            hidden = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype))
            return vm.encoder(inputs_embeds=hidden).last_hidden_state

    def image_embeds(self, pixel_values: torch.Tensor, vit_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image tokens for the Q-Former: the trainable ln_vision (post_layernorm) over the frozen ViT's output."""
        features = self.vit_features(pixel_values) if vit_features is None else vit_features
        ln = self.vision_model.post_layernorm
        return ln(features.to(ln.weight.dtype))

    def query_output(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The Q learned queries through the Q-Former, cross-attending to the image: [B, Q, H]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state

    # ------------------------------------------------------------------ the engine's contract

    def batch_losses(self, image_embeds: torch.Tensor, batch: dict[str, Any],
                     negatives: Optional[tuple[torch.Tensor, torch.Tensor]],
                     return_logits: bool) -> tuple[dict[str, Any], Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """The stage's {"losses", "metrics"[, "logits"]} on one batch and the ITM negatives it scored (or None)."""
        raise NotImplementedError(f"{type(self).__name__} defines no losses: build Blip2Stage1 or Blip2LLM")

    def forward(self, batch: dict[str, Any], *, reuse: Optional[dict[str, Any]] = None,
                return_logits: bool = False) -> dict[str, Any]:
        """batch from recipes.blip2.data -> {"losses", "metrics", "reuse"[, "logits"]}.

        `reuse` (self-distillation's teacher pass) carries the student's frozen-ViT features and ITM negatives,
        so the teacher skips the frozen ViT and scores the very same pairs.
        """
        reuse = reuse or {}
        features = reuse.get("vit_features")
        if features is None:
            features = self.vit_features(batch["image"])
        image_embeds = self.image_embeds(batch["image"], features)
        out, negatives = self.batch_losses(image_embeds, batch, reuse.get("negatives"), return_logits)
        out["reuse"] = {"vit_features": features, "negatives": negatives}
        return out

    # ------------------------------------------------------------------ the memory estimate

    def vit_output_bytes(self, batch_size: int, precision: str) -> int:
        """The frozen ViT runs without a graph: only its output is kept for backward."""
        v = self.config.vision_config
        image_tokens = (v.image_size // v.patch_size) ** 2 + 1
        return batch_size * image_tokens * v.hidden_size * (2 if precision in ("fp16", "bf16") else 4)

    def qformer_activation_bytes(self, rows: int, seq: int, with_image: bool, precision: str) -> int:
        """One Q-Former pass over `seq` tokens (framework.preflight's per-layer formula); with_image: the queries
        cross-attend to the image in every cross-attention layer. The Q-Former computes in fp32 when
        keep_trainable_fp32 (fp16 training), else in the training precision."""
        v, qc = self.config.vision_config, self.config.qformer_config
        image_tokens = (v.image_size // v.patch_size) ** 2 + 1
        nq = self.mc.num_query_tokens
        cross_layers = -(-qc.num_hidden_layers // qc.cross_attention_frequency)
        kw = dict(hidden=qc.hidden_size, heads=qc.num_attention_heads,
                  half=precision in ("fp16", "bf16") and not self.keep_trainable_fp32,
                  checkpointed=self.mc.grad_checkpointing, mlp_ratio=qc.intermediate_size / qc.hidden_size)
        plain = transformer_activation_bytes(rows, seq, layers=qc.num_hidden_layers, **kw)
        if not with_image:
            return plain
        crossed = transformer_activation_bytes(rows, nq, layers=cross_layers, cross_seq=image_tokens, **kw)
        return plain + crossed - transformer_activation_bytes(rows, nq, layers=cross_layers, **kw)

    def activation_bytes(self, batch_size: int, precision: str) -> int:
        """Activations kept for backward at this micro-batch: the subclass's passes on top of the ViT's output."""
        raise NotImplementedError(f"{type(self).__name__} defines no activations: build Blip2Stage1 or Blip2LLM")
