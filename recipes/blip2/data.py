"""BLIP-2 batches from the same samples as MedBLIP: WebDataset caption shards (DAPT's) and VQA-RAD questions.

Sample decoding (image transform, pre_caption) is recipes.common.image_text's; only the tokenisation differs:
stage 1 tokenises captions for the Q-Former (BERT + [DEC]), stage 2 and VQA for the language model (LlmText).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from recipes.common.image_text import make_collate, make_decode

from .llm_text import LlmText

__all__ = ["make_decode", "qformer_collate", "LlmCollate"]


def qformer_collate(tokenizer: Any, max_len: int) -> Callable[[list[dict]], dict]:
    """Caption samples -> {"image", "input_ids" [B, max_len], "attention_mask", "keys", "captions"} (Q-Former
    tokens padded to max_len, as LAVIS's padding="max_length": every rank's batch has one shape for ITM's gather)."""
    return make_collate(tokenizer, max_len, padding="max_length")


class LlmCollate:
    """Samples -> {"image" [B,3,H,W], "llm_input_ids"/"llm_attention_mask"/"llm_labels" (+ "llm_decoder_mask"),
    and the texts}: a caption sample ({"caption"}) is trained without a prompt (LAVIS's stage 2), a VQA sample
    ({"question", "answers"}) with `prompt` ("Question: {} Answer:") and its first answer as the target."""

    def __init__(self, text: LlmText, prompt: str = "Question: {} Answer:"):
        self.text, self.prompt = text, prompt

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        vqa = "question" in samples[0]
        prompts = [self.prompt.format(s["question"]) if vqa else "" for s in samples]
        targets = [s["answers"][0] if vqa else s["caption"] for s in samples]
        batch = {"image": torch.stack([s["image"] for s in samples]), **self.text.training_batch(prompts, targets),
                 "prompts": prompts, "targets": targets}
        if vqa:
            batch |= {"answer_types": [s.get("answer_type", "") for s in samples],
                      "qids": [s.get("qid", "") for s in samples]}
        return batch
