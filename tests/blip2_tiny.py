"""Tiny BLIP-2 models and tokenizers for the tests (hidden 32, 2 layers, a WordPiece vocabulary of ~30 words)."""
from __future__ import annotations

from typing import Any

import torch
from transformers import BertTokenizer

from recipes.blip2.config import Blip2ModelConfig
from recipes.blip2.llm_model import Blip2LLM
from recipes.blip2.stage1_model import Blip2Stage1

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a an the ct mri scan of head abdomen lesion left right yes no is there what organ bright dark small large "
    "question answer : ? shows with").split()
TINY_T5 = dict(model_type="t5", d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
               decoder_start_token_id=0, eos_token_id=3, pad_token_id=0, dropout_rate=0.0,
               tie_word_embeddings=False)


def wordpiece(words: list[str] = WORDS) -> BertTokenizer:
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def qformer_tok() -> BertTokenizer:
    tok = wordpiece()
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def model_config(**kw: Any) -> Blip2ModelConfig:
    return Blip2ModelConfig(**{"preset": "tiny", "num_query_tokens": 4, "end_text": "[SEP]", "max_text_len": 12,
                               **kw})


def stage1(seed: int = 0, image_size: int = 32, **kw: Any) -> Blip2Stage1:
    torch.manual_seed(seed)
    return Blip2Stage1(model_config(**kw), image_size=image_size, tokenizer=qformer_tok()).eval()


def with_llm(seed: int = 0, image_size: int = 32, t5: bool = False, **kw: Any) -> Blip2LLM:
    torch.manual_seed(seed)
    if t5:
        kw["text"] = TINY_T5
    return Blip2LLM(model_config(**kw), image_size=image_size, llm_tokenizer=wordpiece()).eval()


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def captions(tok: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    t = tok(texts, padding=True, return_tensors="pt")
    return t.input_ids, t.attention_mask
