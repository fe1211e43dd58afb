"""BLIP's caption and question normalisation (salesforce/BLIP data/utils.py), unchanged in behaviour.

Only the default word limits differ from BLIP's (50): the study uses 30 words for captions (pretraining)
and 35 for questions (VQA), as in BLIP's configs.
"""
from __future__ import annotations

import re

_PUNCT = r"([.!\"()*#:;~])"  # BLIP strips exactly these; commas, hyphens, slashes and '?' survive


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lowercase, replace . ! " ( ) * # : ; ~ with spaces, squeeze runs of whitespace, keep the first max_words."""
    caption = re.sub(_PUNCT, " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 35) -> str:
    """Lowercase, delete . ! " ( ) * # : ; ~ (no space left behind), strip trailing spaces, keep max_words."""
    question = re.sub(_PUNCT, "", question.lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question
