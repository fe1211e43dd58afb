"""How text meets the language model: prompt and target tokens, the same for training, generation and ranking.

Decoder-only (OPT): the sequence is [bos] + prompt + " target" + end, where end is model.end_text (LAVIS: "\n")
and generation stops there; only the target tokens (end included) are scored. Encoder-decoder (Flan-T5): the
encoder reads the prompt (+ eos), the decoder produces the target (+ eos), as LAVIS's blip2_t5.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False,
             labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [N, W], mask [N, W]) padded to the longest row (on the left when `left`).
    With labels=True the padding value is -100 (ignored by the loss) instead of pad_id."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), IGNORE if labels else pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class LlmText:
    """Tokenisation of prompts and targets for one language model (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, encoder_decoder: bool, end_text: str = "\n",
                 max_len: int = 64, config_pad_id: int = 1):
        self.tokenizer, self.encoder_decoder, self.max_len = tokenizer, encoder_decoder, max_len
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config_pad_id)
        if encoder_decoder:
            self.bos_ids: list[int] = []
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            self.end_id = int(eos)
        else:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
            self.bos_ids = [] if bos is None else [int(bos)]
            end = tokenizer(end_text, add_special_tokens=False).input_ids
            if len(end) != 1:
                raise ValueError(f"model.end_text={end_text!r} must be one token of the LLM tokenizer (got "
                                 f"{len(end)}): e.g. '\\n' for OPT, '[SEP]' for a WordPiece vocabulary")
            self.end_id = int(end[0])

    def prompt_ids(self, prompt: str) -> list[int]:
        """Decoder-only: [bos] + prompt tokens; encoder-decoder: the encoder's prompt tokens + eos (T5's form)."""
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        return ids + [self.end_id] if self.encoder_decoder else self.bos_ids + ids

    def target_ids(self, target: str) -> list[int]:
        """The scored tokens: " target" + end (decoder-only) or target + eos (encoder-decoder)."""
        if self.encoder_decoder:
            return self.tokenizer(target, add_special_tokens=False).input_ids + [self.end_id]
        return self.tokenizer(" " + target, add_special_tokens=False).input_ids + [self.end_id]

    def prompts(self, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts for generation/ranking: ids/mask [B, P]. Decoder-only: LEFT-padded, so every row ends at the last
        column (after the queries the pads sit between them and the prompt, masked, as LAVIS's generate does; OPT's
        positions count only unmasked tokens). Encoder-decoder: right-padded (T5's relative positions would see a
        gap)."""
        ids, mask = pad_rows([self.prompt_ids(p) for p in prompts], self.pad_id, left=not self.encoder_decoder)
        return ids.to(device), mask.to(device)

    def targets(self, targets: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate answers for ranking: ids/mask [C, La], right-padded."""
        ids, mask = pad_rows([self.target_ids(t) for t in targets], self.pad_id)
        return ids.to(device), mask.to(device)

    def training_batch(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """Teacher-forcing inputs: llm_input_ids / llm_attention_mask / llm_labels (+ llm_decoder_mask for T5).

        Decoder-only: one right-padded sequence prompt + target, cut to max_len tokens; labels -100 except on the
        target. Encoder-decoder: the prompt for the encoder, the target as decoder labels.
        """
        if self.encoder_decoder:
            ids, mask = pad_rows([self.prompt_ids(p)[: self.max_len] for p in prompts], self.pad_id)
            labels, decoder_mask = pad_rows([self.target_ids(t)[: self.max_len] for t in targets], self.pad_id,
                                            labels=True)
            return {"llm_input_ids": ids, "llm_attention_mask": mask, "llm_labels": labels,
                    "llm_decoder_mask": decoder_mask}
        seqs, scored = [], []
        for p, t in zip(prompts, targets, strict=True):
            prompt, target = self.prompt_ids(p), self.target_ids(t)
            seqs.append((prompt + target)[: self.max_len])
            scored.append(([IGNORE] * len(prompt) + target)[: self.max_len])
        ids, mask = pad_rows(seqs, self.pad_id)
        labels, _ = pad_rows(scored, self.pad_id, labels=True)
        return {"llm_input_ids": ids, "llm_attention_mask": mask, "llm_labels": labels}
