"""BLIP-2 stage 1: the Q-Former's text heads and the ITC / ITM / ITG losses (LAVIS's Blip2Qformer).

Submodule names are transformers' (Blip2ForImageTextRetrieval): embeddings (Blip2TextEmbeddings),
vision_projection, text_projection, itm_head; plus what transformers lacks: itg_head (BERT's LM head, tied to the
word embeddings; LAVIS's Qformer.cls) and temp (the ITC temperature).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import BertOnlyMLMHead
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from framework.distributed import all_gather_cat

from .config import Blip2ModelConfig, hf_config
from .objectives import (
    TEMP_MAX,
    TEMP_MIN,
    hard_negatives,
    itc_loss,
    itc_similarities,
    itg_loss,
    itg_targets,
    itm_loss,
    multimodal_causal_mask,
)
from .qformer_model import Blip2Base
from .weights import LLM_ONLY

STAGE1 = ("itc", "itm", "itg")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Blip2Stage1(Blip2Base):
    """BLIP-2 stage 1: forward(batch) -> {"losses": the enabled of {"itc", "itm", "itg"}, "metrics", "reuse"}."""

    other_stage_keys = LLM_ONLY  # checkpoint tensors of the LLM stage: ignored (and reported) when loading

    def __init__(self, mc: Blip2ModelConfig, *, image_size: int, tokenizer: PreTrainedTokenizerBase,
                 objectives: Sequence[str] = STAGE1):
        """`tokenizer`: the Q-Former's (BERT's + a [DEC] bos token); only its length is read at construction."""
        super().__init__(mc, hf_config(mc, image_size=image_size, qformer_vocab=len(tokenizer), text_input=True,
                                       llm_vocab=None, language_model=False))
        self.tokenizer = tokenizer
        self.objectives = tuple(o for o in STAGE1 if o in objectives)
        q = self.config.qformer_config
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

    def bare_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().bare_parameters(), "temp": self.temp}

    def trainable_heads(self) -> list[nn.Module]:
        return [self.embeddings, self.vision_projection, self.text_projection, self.itm_head, self.itg_head]

    # ------------------------------------------------------------------ the Q-Former's text passes

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

    # ------------------------------------------------------------------ the losses

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

    def batch_losses(self, image_embeds: torch.Tensor, batch: dict[str, Any],
                     negatives: Optional[tuple[torch.Tensor, torch.Tensor]],
                     return_logits: bool) -> tuple[dict[str, Any], Optional[tuple[torch.Tensor, torch.Tensor]]]:
        out = self.stage1_losses(image_embeds, batch["input_ids"], batch["attention_mask"], negatives=negatives,
                                 return_logits=return_logits)
        return out, out.pop("negatives")

    def activation_bytes(self, batch_size: int, precision: str) -> int:
        """Activations kept for backward at this micro-batch (framework.preflight's per-layer formula): the ViT's
        output and four Q-Former passes (queries, text, ITM over 3B rows, ITG), plus the fp32 ITG logits."""
        nq, text, vocab = self.mc.num_query_tokens, self.mc.max_text_len, self.config.qformer_config.vocab_size

        def qformer(rows: int, seq: int, with_image: bool) -> int:
            return self.qformer_activation_bytes(rows, seq, with_image, precision)

        total = self.vit_output_bytes(batch_size, precision)
        total += qformer(batch_size, nq, True) + qformer(batch_size, text, False)
        total += qformer(3 * batch_size, nq + text, True) + qformer(batch_size, nq + text, True)
        total += batch_size * text * vocab * 4 * 2  # ITG logits in fp32 + their softmax
        return int(total)
