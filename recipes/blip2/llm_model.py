"""BLIP-2 with the frozen language model (stage 2 and VQA): query outputs -> language_projection -> OPT / Flan-T5.

Submodule names are transformers' (Blip2ForConditionalGeneration): language_projection and language_model (frozen).
Training scores the LLM's next-token loss; inference generates (beam search) or ranks candidate answers.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from framework.preflight import transformer_activation_bytes

from .config import Blip2ModelConfig, hf_config
from .llm_text import IGNORE, LlmText
from .objectives import llm_loss
from .qformer_model import Blip2Base
from .weights import STAGE1_ONLY

RANK_CHUNK_ROWS = 256  # (question, candidate) rows scored per language-model call in rank_answers
QFORMER_VOCAB = 30523  # BERT's + [DEC]; a Q-Former without text input builds no word embeddings: config only


class Blip2LLM(Blip2Base):
    """BLIP-2 + frozen LLM: forward(batch) -> {"losses": {lm_objective: LM loss}, "metrics", "reuse"}."""

    other_stage_keys = STAGE1_ONLY  # checkpoint tensors of the stage-1 heads: ignored (and reported) when loading

    def __init__(self, mc: Blip2ModelConfig, *, image_size: int,
                 llm_tokenizer: Optional[PreTrainedTokenizerBase] = None, lm_objective: str = "lm"):
        """Without `llm_tokenizer` (shape-only builds, e.g. the memory estimate) there is no text side (`text`)."""
        super().__init__(mc, hf_config(mc, image_size=image_size, qformer_vocab=QFORMER_VOCAB, text_input=False,
                                       llm_vocab=len(llm_tokenizer) if llm_tokenizer else None,
                                       language_model=True))
        self.llm_tokenizer, self.lm_objective = llm_tokenizer, lm_objective
        self.objectives = (lm_objective,)
        t = self.config.text_config
        self.language_projection = nn.Linear(self.config.qformer_config.hidden_size, t.hidden_size)
        cls = AutoModelForSeq2SeqLM if self.config.is_encoder_decoder else AutoModelForCausalLM
        self.language_model = cls.from_config(t)
        self.language_model.requires_grad_(False)  # BLIP-2 stage 2: the LLM stays frozen
        self.text = None if llm_tokenizer is None else LlmText(
            llm_tokenizer, encoder_decoder=self.config.is_encoder_decoder, end_text=mc.end_text,
            max_len=mc.max_llm_len, config_pad_id=t.pad_token_id or 0)
        if mc.grad_checkpointing_llm:
            self.language_model.activation_checkpointing_enable({"use_reentrant": False})

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + [self.language_model]

    def trainable_heads(self) -> list[nn.Module]:
        return [self.language_projection]

    # ------------------------------------------------------------------ training and inference

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

    def batch_losses(self, image_embeds: torch.Tensor, batch: dict[str, Any],
                     negatives: Optional[tuple[torch.Tensor, torch.Tensor]],
                     return_logits: bool) -> tuple[dict[str, Any], Optional[tuple[torch.Tensor, torch.Tensor]]]:
        return self.llm_loss(image_embeds, batch["llm_input_ids"], batch["llm_attention_mask"], batch["llm_labels"],
                             batch.get("llm_decoder_mask"), return_logits=return_logits), None

    def activation_bytes(self, batch_size: int, precision: str) -> int:
        """Activations kept for backward at this micro-batch (framework.preflight's per-layer formula): the ViT's
        output, the query pass and the frozen LLM's full graph (the soft prompt's gradient runs back through it),
        plus the fp32 logits of the scored tokens."""
        half = precision in ("fp16", "bf16")
        t = self.config.text_config
        seq = self.mc.num_query_tokens + self.mc.max_llm_len
        total = self.vit_output_bytes(batch_size, precision)
        total += self.qformer_activation_bytes(batch_size, self.mc.num_query_tokens, True, precision)
        hidden = getattr(t, "hidden_size", None) or t.d_model  # OPT's names, else T5's
        heads = getattr(t, "num_attention_heads", None) or t.num_heads
        layers = getattr(t, "num_hidden_layers", None) or t.num_layers
        ffn = getattr(t, "ffn_dim", None) or getattr(t, "d_ff", None) or 4 * hidden
        total += transformer_activation_bytes(batch_size, seq, hidden, heads, layers, half=half,
                                              checkpointed=self.mc.grad_checkpointing_llm, mlp_ratio=ffn / hidden)
        total += batch_size * self.mc.max_llm_len * t.vocab_size * ((2 if half else 4) + 4 + 4)  # logits, fp32, softmax
        return int(total)
