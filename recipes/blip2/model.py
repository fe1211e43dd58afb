"""BLIP-2 (Li et al. 2023) on transformers' modules: a frozen ViT, the Q-Former, and stage-1 heads or a frozen LLM.

Submodule names are transformers' own, so a `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`
`save_pretrained` directory loads by name: vision_model (Blip2VisionModel; its post_layernorm is LAVIS's
ln_vision), query_tokens, qformer (Blip2QFormerModel), and
- stage 1 (`text_heads=True`): embeddings (Blip2TextEmbeddings), vision_projection, text_projection, itm_head,
  plus what transformers lacks: itg_head (BERT's LM head, tied to the word embeddings; LAVIS's Qformer.cls) and
  temp (the ITC temperature);
- stage 2 / VQA (`language_model=True`): language_projection and language_model (OPT or Flan-T5, frozen).

The model is a plain nn.Module with a method per computation (image_embeds, query_output, itc/itm/itg, llm_*,
generate, rank_answers); forward(batch) only dispatches to them and returns {"losses", "metrics"}.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2QFormerModel,
    Blip2VisionModel,
    PreTrainedTokenizerBase,
)
from transformers.models.bert.modeling_bert import BertOnlyMLMHead
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from framework.distributed import all_gather_cat
from framework.preflight import transformer_activation_bytes

from recipes.common.masks import prebuild_padding_masks

from .config import Blip2ModelConfig, hf_config
from .llm_text import IGNORE, LlmText
from .objectives import (
    TEMP_MAX,
    TEMP_MIN,
    hard_negatives,
    itc_loss,
    itc_similarities,
    itg_loss,
    itg_targets,
    itm_loss,
    llm_loss,
    multimodal_causal_mask,
)

STAGE1 = ("itc", "itm", "itg")
LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is nn.LayerNorm(width) at torch's default eps (the ViT's own use EVA's 1e-6)
RANK_CHUNK_ROWS = 256  # (question, candidate) rows scored per language-model call in rank_answers


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


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Blip2(nn.Module):
    """BLIP-2: forward(batch) -> {"losses": {"itc","itm","itg"} (stage 1) | {lm_objective} (LLM), "metrics"}."""

    towers = ("vision_model", "qformer")  # what train.compile compiles (framework.compile); the LLM stays eager

    def __init__(self, mc: Blip2ModelConfig, *, image_size: int, tokenizer: Optional[PreTrainedTokenizerBase] = None,
                 llm_tokenizer: Optional[PreTrainedTokenizerBase] = None, text_heads: bool = True,
                 language_model: bool = False, objectives: Sequence[str] = STAGE1, lm_objective: str = "lm"):
        super().__init__()
        if text_heads and tokenizer is None:
            raise ValueError("the stage-1 heads need the Q-Former tokenizer")
        self.mc, self.tokenizer, self.llm_tokenizer = mc, tokenizer, llm_tokenizer
        self.objectives = tuple(o for o in STAGE1 if o in objectives) if text_heads else (lm_objective,)
        self.lm_objective = lm_objective
        self.keep_trainable_fp32 = False  # set by the recipe under fp16 (see fp32_modules)
        self.config = hf_config(mc, image_size=image_size,
                                qformer_vocab=len(tokenizer) if tokenizer is not None else 30523,
                                text_input=text_heads, llm_vocab=len(llm_tokenizer) if llm_tokenizer else None,
                                language_model=language_model)
        q = self.config.qformer_config
        self.vision_model = Blip2VisionModel(self.config.vision_config)
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
        if text_heads:
            self.embeddings = Blip2TextEmbeddings(q)
            nn.init.normal_(self.embeddings.word_embeddings.weight, std=q.initializer_range)
            nn.init.normal_(self.embeddings.position_embeddings.weight, std=q.initializer_range)
            with torch.no_grad():
                self.embeddings.word_embeddings.weight[q.pad_token_id].zero_()
            self.vision_projection = nn.Linear(q.hidden_size, mc.embed_dim)
            self.text_projection = nn.Linear(q.hidden_size, mc.embed_dim)
            self.itm_head = nn.Linear(q.hidden_size, 2)
            self.itg_head = BertOnlyMLMHead(q)
            head = self.itg_head.predictions
            head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as BERT / LAVIS
            head.decoder.bias = head.bias
            nn.init.zeros_(head.bias)
            # [1], not 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor
            self.temp = nn.Parameter(torch.full((1,), float(mc.temp)))
        if language_model:
            t = self.config.text_config
            self.language_projection = nn.Linear(q.hidden_size, t.hidden_size)
            cls = AutoModelForSeq2SeqLM if self.config.is_encoder_decoder else AutoModelForCausalLM
            self.language_model = cls.from_config(t)
            self.language_model.requires_grad_(False)  # BLIP-2 stage 2: the LLM stays frozen
            # without a tokenizer (shape-only builds, e.g. the memory estimate) there is no text side
            self.text = None if llm_tokenizer is None else LlmText(
                llm_tokenizer, encoder_decoder=self.config.is_encoder_decoder, end_text=mc.end_text,
                max_len=mc.max_llm_len, config_pad_id=t.pad_token_id or 0)
        if mc.grad_checkpointing:
            with _quiet_missing_input_embeddings():
                self.qformer.activation_checkpointing_enable({"use_reentrant": False})
        if mc.grad_checkpointing_llm and language_model:
            self.language_model.activation_checkpointing_enable({"use_reentrant": False})
        self.vision_model.eval()

    # ------------------------------------------------------------------ set-up

    def _copy_text_ffn_to_query_ffn(self) -> None:
        """LAVIS starts the query FFN (intermediate_query/output_query) as a copy of the text FFN."""
        with torch.no_grad():
            for layer in self.qformer.encoder.layer:
                if hasattr(layer, "intermediate"):
                    layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
                    layer.output_query.load_state_dict(layer.output.state_dict())

    def train(self, mode: bool = True) -> "Blip2":
        super().train(mode)
        self.vision_model.eval()  # a frozen tower without dropout noise (LAVIS: disabled_train)
        return self

    @property
    def has_text_heads(self) -> bool:
        return hasattr(self, "embeddings")

    @property
    def has_language_model(self) -> bool:
        return hasattr(self, "language_model")

    def frozen_modules(self) -> list[nn.Module]:
        """The towers that never change (the ViT but its trained final LayerNorm, the LLM): an EMA teacher shares
        them instead of holding its own copy."""
        towers = [self.vision_model.embeddings, self.vision_model.encoder]
        return towers + ([self.language_model] if self.has_language_model else [])

    def fp32_modules(self) -> list[nn.Module]:
        """Everything trainable, kept fp32 when DeepSpeed trains in fp16 (the engine casts these back after it).

        LAVIS #267: a Q-Former trained in fp16 sends the LM loss to inf; LAVIS trains it in fp32 under autocast
        (transformers keeps query_tokens and the Q-Former in fp32 too). Only under fp16 (keep_trainable_fp32, set
        by the recipe): bf16 has fp32's range and trains it in bf16. The frozen ViT and LLM stay half.
        """
        if not self.keep_trainable_fp32:
            return []
        names = ("qformer", "embeddings", "vision_projection", "text_projection", "itm_head", "itg_head",
                 "language_projection")
        bare = {n: getattr(self, n) for n in ("query_tokens", "temp") if hasattr(self, n)}
        return ([_ParameterView(bare), self.vision_model.post_layernorm]
                + [getattr(self, n) for n in names if hasattr(self, n)])

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

    # ------------------------------------------------------------------ stage 1

    def _text_embeds(self, input_ids: torch.Tensor, with_queries: bool) -> torch.Tensor:
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1) if with_queries else None
        return self.embeddings(input_ids=input_ids, query_embeds=queries)

    def text_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unimodal text encoder (no queries, no image): [B, L, H]."""
        return self.qformer(query_embeds=self._text_embeds(input_ids, False), query_length=0,
                            attention_mask=attention_mask).last_hidden_state

    def itc_features(self, query_output: torch.Tensor, text_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ITC features: image [B, Q, E] (every query), text [B, E] (first token)."""
        image_feats = F.normalize(self.vision_projection(query_output), dim=-1)
        text_feats = F.normalize(self.text_projection(text_output[:, 0, :]), dim=-1)
        return image_feats, text_feats

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Queries and text attend to each other (bidirectional), queries cross-attend to the image; the itm_head
        logits averaged over the query outputs: [N, 2] for N (image, text) rows."""
        q = self.mc.num_query_tokens
        mask = torch.cat([torch.ones(input_ids.shape[0], q, dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        hidden = self.qformer(query_embeds=self._text_embeds(input_ids, True), query_length=q, attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        return self.itm_head(hidden[:, :q, :]).mean(dim=1)

    def itg_logits(self, image_embeds: torch.Tensor, decoder_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Text logits [B, L, V] of the image-grounded decoder: one pass over [queries; text] with the multimodal
        causal mask. It equals LAVIS's cached form (text attending to the keys/values of a query-only pass):
        queries never see the text, so their states are those of the query-only pass."""
        q = self.mc.num_query_tokens
        embeds = self._text_embeds(decoder_ids, True)
        mask = multimodal_causal_mask(q, attention_mask, self.qformer.layernorm.weight.dtype)
        hidden = self.qformer(query_embeds=embeds, query_length=q, attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        return self.itg_head(hidden[:, q:, :])

    def fixed_length(self, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions padded to model.max_text_len (LAVIS: padding="max_length"): every rank's token ids have one
        shape, so ITM can all-gather them; padding is masked, so the losses do not change."""
        missing = self.mc.max_text_len - input_ids.shape[1]
        if missing < 0:
            raise ValueError(f"captions of {input_ids.shape[1]} tokens are longer than model.max_text_len="
                             f"{self.mc.max_text_len}: tokenise them with truncation at that length")
        if missing == 0:
            return input_ids, attention_mask
        return (F.pad(input_ids, (0, missing), value=self.tokenizer.pad_token_id),
                F.pad(attention_mask, (0, missing), value=0))

    def temperature(self) -> torch.Tensor:
        """The learnable ITC temperature, clamped to [0.001, 0.5] in place first (BLIP's range)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        return self.temp

    def stage1_losses(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                      return_logits: bool = False) -> dict[str, Any]:
        """ITC / ITM / ITG (the enabled ones) on one batch -> {"losses", "metrics", "negatives"[, "logits"]}.

        Gradients as LAVIS's Blip2Qformer: the ITC similarities see the gathered (global) features without
        gradient, so image-to-text sends gradient to this rank's image features only and text-to-image to its text
        features only (one rank as on many); ITM's negative images keep theirs, sent back to the rank they came from.
        """
        input_ids, attention_mask = self.fixed_length(input_ids, attention_mask)
        b = input_ids.shape[0]
        losses, logits, metrics = {}, {}, {}
        need_sims = "itc" in self.objectives or ("itm" in self.objectives and negatives is None)
        if need_sims:
            with torch.set_grad_enabled(torch.is_grad_enabled() and "itc" in self.objectives):
                image_feats, text_feats = self.itc_features(self.query_output(image_embeds),
                                                            self.text_output(input_ids, attention_mask))
                temp = self.temperature()
                sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats, temp, all_gather_cat(image_feats),
                                                    all_gather_cat(text_feats))
            offset = _rank() * b
            if "itc" in self.objectives:
                losses["itc"] = itc_loss(sim_i2t, sim_t2i, offset, self.mc.itc_label_smoothing)
                logits["itc"] = [sim_i2t, sim_t2i]
                metrics["temp"] = temp.detach()[0]  # a tensor: the engine reads metrics once per log interval
        if "itm" in self.objectives:
            ids_all, mask_all, embeds_all = (all_gather_cat(input_ids), all_gather_cat(attention_mask),
                                             all_gather_cat(image_embeds, with_grad=True))
            if negatives is None:
                negatives = hard_negatives(sim_i2t, sim_t2i, offset)
            neg_image, neg_text = negatives
            rows_ids = torch.cat([input_ids, input_ids, ids_all[neg_text]])  # pos, pos, neg text
            rows_mask = torch.cat([attention_mask, attention_mask, mask_all[neg_text]])
            rows_image = torch.cat([image_embeds, embeds_all[neg_image], image_embeds])  # pos, neg image, pos
            itm = self.itm_logits(rows_image, rows_ids, rows_mask)
            losses["itm"] = itm_loss(itm)
            logits["itm"] = itm
            with torch.no_grad():
                labels = torch.zeros(3 * b, dtype=torch.long, device=itm.device)  # made on the device: no copy
                labels[:b] = 1
                metrics["itm_acc"] = (itm.argmax(-1) == labels).float().mean()
        if "itg" in self.objectives:
            decoder_ids, labels = itg_targets(input_ids, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id)
            text_logits = self.itg_logits(image_embeds, decoder_ids, attention_mask)
            losses["itg"] = itg_loss(text_logits, labels, self.mc.itg_label_smoothing)
            logits["itg"] = {"logits": text_logits[:, :-1], "labels": labels[:, 1:]}
        out: dict[str, Any] = {"losses": losses, "metrics": metrics, "negatives": negatives}
        if return_logits:
            out["logits"] = logits
        return out

    # ------------------------------------------------------------------ the language model

    def llm_inputs(self, query_output: torch.Tensor) -> torch.Tensor:
        """Query outputs projected into the LLM's input space, in the LLM's dtype: [B, Q, D]."""
        projected = self.language_projection(query_output.to(self.language_projection.weight.dtype))
        return projected.to(self.language_model.get_input_embeddings().weight.dtype)

    def _with_queries(self, soft: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[soft prompt; token embeddings] and the matching attention mask."""
        embeds = torch.cat([soft, self.language_model.get_input_embeddings()(ids)], dim=1)
        ones = torch.ones(soft.shape[:2], dtype=mask.dtype, device=mask.device)
        return embeds, torch.cat([ones, mask], dim=1)

    def llm_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   decoder_input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LLM's logits for image + text, as Blip2ForConditionalGeneration computes them: decoder-only
        [B, Q + L, V] over [queries; input_ids]; encoder-decoder [B, Ld, V] over decoder_input_ids."""
        soft = self.llm_inputs(self.query_output(self.image_embeds(pixel_values)))
        embeds, mask = self._with_queries(soft, input_ids, attention_mask)
        if self.config.is_encoder_decoder:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                       decoder_input_ids=decoder_input_ids).logits
        return self.language_model(inputs_embeds=embeds, attention_mask=mask).logits

    def llm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, decoder_mask: Optional[torch.Tensor] = None,
                 return_logits: bool = False) -> dict[str, Any]:
        """Next-token CE of the frozen LLM on the labelled tokens (-100 elsewhere), fp32 from its logits.

        Decoder-only: input_ids/labels [B, L] are prompt + target (labels -100 on the prompt and padding).
        Encoder-decoder: input_ids is the encoder prompt, labels [B, Ld] the decoder target (decoder_mask).
        Only the scored positions go through the LM head (a [T, V] matrix instead of [B, Q + L, V]).
        """
        soft = self.llm_inputs(self.query_output(image_embeds))
        embeds, mask = self._with_queries(soft, input_ids, attention_mask)
        if self.config.is_encoder_decoder:  # answers are short: the decoder's full logits are small
            decoder_ids = self.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
            full_logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                                              decoder_attention_mask=decoder_mask).logits
            scored = labels != IGNORE
            logits, targets = full_logits[scored], labels[scored]
        else:
            head = self.language_model.get_output_embeddings()
            hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            full = torch.cat([torch.full(soft.shape[:2], IGNORE, dtype=labels.dtype, device=labels.device),
                              labels], dim=1)
            scored = full[:, 1:] != IGNORE  # position p predicts token p + 1
            logits = head(hidden[:, :-1][scored])
            targets = full[:, 1:][scored]
        out = {"losses": {self.lm_objective: llm_loss(logits, targets)},
               "metrics": {"token_acc": (logits.detach().argmax(-1) == targets).float().mean()}}
        if return_logits:
            out["logits"] = {self.lm_objective: {"logits": logits}}
        return out

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, prompts: Sequence[str], *, num_beams: int = 5,
                 max_new_tokens: int = 10, min_length: int = 1, length_penalty: float = 0.0) -> list[str]:
        """Beam-search text for each image after its prompt (LAVIS predict_answers: beams 5, max 10 new tokens,
        length penalty 0); generation stops at model.end_text."""
        soft = self.llm_inputs(self.query_output(image_embeds))
        ids, mask = self.text.prompts(prompts, soft.device)
        embeds, full_mask = self._with_queries(soft, ids, mask)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, do_sample=False,
                                           num_beams=num_beams, max_new_tokens=max_new_tokens,
                                           min_length=min_length, length_penalty=length_penalty,
                                           eos_token_id=self.text.end_id, pad_token_id=self.text.pad_id)
        return [t.strip() for t in self.llm_tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def rank_answers(self, image_embeds: torch.Tensor, prompts: Sequence[str], candidate_ids: torch.Tensor,
                     candidate_mask: torch.Tensor, k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """rank_all_answers' best candidate: (index [B], its log-likelihood [B])."""
        top, scores = self.rank_all_answers(image_embeds, prompts, candidate_ids, candidate_mask, k)
        return top[:, 0], scores[:, 0]

    @torch.no_grad()
    def rank_all_answers(self, image_embeds: torch.Tensor, prompts: Sequence[str], candidate_ids: torch.Tensor,
                         candidate_mask: torch.Tensor, k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank candidate answers by the LLM's log-likelihood log p(answer tokens | image, prompt).

        candidate_ids/mask [C, La] from self.text.targets (the tokens training scores). As BLIP's rank: the k candidates whose first token is most
        likely are rescored in full (k >= C scores every candidate). Returns (candidate indices [B, k],
        their log-likelihoods [B, k]), best first. The prompt is run once per question; candidates reuse its
        key/value cache.
        """
        soft = self.llm_inputs(self.query_output(image_embeds))
        ids, mask = self.text.prompts(prompts, soft.device)
        embeds, prefix_mask = self._with_queries(soft, ids, mask)
        b, c = len(prompts), candidate_ids.shape[0]
        k = min(k, c)
        if self.config.is_encoder_decoder:
            encoder_out = self.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=prefix_mask)
            start = torch.full((b, 1), self.config.text_config.decoder_start_token_id, device=soft.device)
            first = self.language_model(encoder_outputs=encoder_out, attention_mask=prefix_mask,
                                        decoder_input_ids=start).logits[:, 0].float().log_softmax(-1)
            cache = None
        else:
            out = self.language_model(inputs_embeds=embeds, attention_mask=prefix_mask, use_cache=True)
            first = out.logits[:, -1].float().log_softmax(-1)  # [B, V]: the first answer token
            cache = out.cache
        top = first[:, candidate_ids[:, 0]].topk(k, dim=1).indices  # [B, k] candidates by first-token probability
        rows_q = torch.arange(b, device=soft.device).repeat_interleave(k)
        rows_c = top.reshape(-1)
        scores = torch.empty(rows_q.shape[0], device=soft.device)
        for start in range(0, rows_q.shape[0], RANK_CHUNK_ROWS):
            q_idx, c_idx = rows_q[start:start + RANK_CHUNK_ROWS], rows_c[start:start + RANK_CHUNK_ROWS]
            cand, cand_mask = candidate_ids[c_idx], candidate_mask[c_idx]
            if cache is None:
                logp = self._decoder_log_probs(encoder_out.last_hidden_state[q_idx], prefix_mask[q_idx], cand,
                                               cand_mask)
            else:
                rows_cache = copy.deepcopy(cache)
                rows_cache.batch_select_indices(q_idx)
                logits = self.language_model(input_ids=cand, cache=rows_cache, use_cache=True,
                                             attention_mask=torch.cat([prefix_mask[q_idx], cand_mask], 1)).logits
                following = logits[:, :-1].float().log_softmax(-1).gather(-1, cand[:, 1:, None]).squeeze(-1)
                logp = torch.cat([first[q_idx, cand[:, 0]][:, None], following], dim=1)
            scores[start:start + len(q_idx)] = (logp * cand_mask).sum(1)
        scores = scores.view(b, k)
        # stable: among equal scores the earlier candidate wins, as argmax picked it before this returned them all
        order = scores.sort(dim=1, descending=True, stable=True).indices
        return top.gather(1, order), scores.gather(1, order)

    def _decoder_log_probs(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor, targets: torch.Tensor,
                           target_mask: torch.Tensor) -> torch.Tensor:
        """Encoder-decoder: log p(target token t | encoder states, targets < t): [N, Lt]."""
        from transformers.modeling_outputs import BaseModelOutput

        decoder_ids = self.language_model.prepare_decoder_input_ids_from_labels(
            labels=targets.masked_fill(target_mask == 0, IGNORE))
        logits = self.language_model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                                     attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
                                     decoder_attention_mask=target_mask).logits
        return logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)

    # ------------------------------------------------------------------ the engine's contract

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
        if self.has_text_heads:
            out = self.stage1_losses(image_embeds, batch["input_ids"], batch["attention_mask"],
                                     negatives=reuse.get("negatives"), return_logits=return_logits)
            negatives = out.pop("negatives")
        else:
            out = self.llm_loss(image_embeds, batch["llm_input_ids"], batch["llm_attention_mask"],
                                batch["llm_labels"], batch.get("llm_decoder_mask"), return_logits=return_logits)
            negatives = None
        out["reuse"] = {"vit_features": features, "negatives": negatives}
        return out

    def activation_bytes(self, batch_size: int, precision: str) -> int:
        """Activations kept for backward at this micro-batch (framework.preflight's per-layer formula).

        The frozen ViT runs without a graph (only its output is kept). The Q-Former computes in fp32 when
        keep_trainable_fp32 (fp16 training), else in the training precision. Stage 1 keeps four Q-Former
        passes (queries, text, ITM over 3B rows, ITG); stage 2 the query pass and the frozen LLM's full graph
        (the soft prompt's gradient runs back through it), plus the fp32 logits of the scored tokens.
        """
        half = precision in ("fp16", "bf16")
        width = 2 if half else 4
        q_half = half and not self.keep_trainable_fp32
        v, qc = self.config.vision_config, self.config.qformer_config
        image_tokens = (v.image_size // v.patch_size) ** 2 + 1
        nq, text = self.mc.num_query_tokens, self.mc.max_text_len
        cross_layers = -(-qc.num_hidden_layers // qc.cross_attention_frequency)

        def qformer(rows: int, seq: int, with_image: bool) -> int:
            kw = dict(hidden=qc.hidden_size, heads=qc.num_attention_heads, half=q_half,
                      checkpointed=self.mc.grad_checkpointing,
                      mlp_ratio=qc.intermediate_size / qc.hidden_size)
            plain = transformer_activation_bytes(rows, seq, layers=qc.num_hidden_layers, **kw)
            if not with_image:
                return plain
            crossed = transformer_activation_bytes(rows, nq, layers=cross_layers, cross_seq=image_tokens, **kw)
            return plain + crossed - transformer_activation_bytes(rows, nq, layers=cross_layers, **kw)

        total = batch_size * image_tokens * v.hidden_size * width  # the frozen ViT's output
        if self.has_text_heads:
            total += qformer(batch_size, nq, True) + qformer(batch_size, text, False)
            total += qformer(3 * batch_size, nq + text, True) + qformer(batch_size, nq + text, True)
            total += batch_size * text * qc.vocab_size * 4 * 2  # ITG logits in fp32 + their softmax
            return int(total)
        t = self.config.text_config
        seq = nq + self.mc.max_llm_len
        total += qformer(batch_size, nq, True)
        hidden = getattr(t, "hidden_size", None) or t.d_model
        heads = getattr(t, "num_attention_heads", None) or t.num_heads
        layers = getattr(t, "num_hidden_layers", None) or t.num_layers
        ffn = getattr(t, "ffn_dim", None) or getattr(t, "d_ff", None) or 4 * hidden
        total += transformer_activation_bytes(batch_size, seq, hidden, heads, layers, half=half,
                                              checkpointed=self.mc.grad_checkpointing_llm, mlp_ratio=ffn / hidden)
        total += batch_size * self.mc.max_llm_len * t.vocab_size * (width + 4 + 4)  # logits, fp32 copy, softmax
        return int(total)
