"""BLIP's tokenizer: bert-base-uncased WordPiece + bos "[DEC]" + additional special "[ENC]" (vocabulary 30524)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from transformers import BertTokenizer, PreTrainedTokenizerBase

BUNDLED_VOCAB = Path(__file__).resolve().parent / "assets" / "bert-base-uncased-vocab.txt"
DEC, ENC = "[DEC]", "[ENC]"


class TokenizerNotFound(FileNotFoundError):
    """The tokenizer could not be found locally; the message says how to provide one offline."""


def _read_vocab(path: Path) -> dict[str, int]:
    words = path.read_text(encoding="utf-8").split("\n")
    if words and words[-1] == "":
        words = words[:-1]
    return {w: i for i, w in enumerate(words)}


def _base_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    tok = _find_tokenizer(name_or_path)
    # transformers returns a placeholder vocabulary of the 5 special tokens when it finds no files
    if tok.vocab_size <= 5:
        raise TokenizerNotFound(f"model.tokenizer={name_or_path!r}: no vocabulary found there. Offline, use "
                                "model.tokenizer=bundled or a directory holding vocab.txt or tokenizer.json")
    return tok


def _find_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    if name_or_path == "bundled":
        return BertTokenizer(vocab=_read_vocab(BUNDLED_VOCAB), do_lower_case=True)
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".txt":  # a bare WordPiece vocab.txt
        return BertTokenizer(vocab=_read_vocab(path), do_lower_case=True)
    how = ("Offline, use model.tokenizer=bundled (bert-base-uncased shipped with the project), a directory "
           "holding vocab.txt or tokenizer.json, or a path to a vocab.txt file")
    if path.exists() or name_or_path.startswith(("/", ".", "~")):  # a path, never a hub name
        try:
            return BertTokenizer.from_pretrained(str(path.expanduser()), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerNotFound(f"model.tokenizer={name_or_path!r}: no tokenizer there "
                                    f"({type(e).__name__}). {how}") from None
    try:  # a hub name: the local cache first, so an offline machine does not wait on network retries
        return BertTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise TokenizerNotFound(f"model.tokenizer={name_or_path!r}: not in the local Hugging Face cache and "
                                f"HF_HUB_OFFLINE is set. {how}")
    try:
        return BertTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise TokenizerNotFound(
            f"model.tokenizer={name_or_path!r}: not found locally or on the hub ({type(e).__name__}). {how}") from None


def load_tokenizer(name_or_path: Union[str, Path] = "bundled") -> PreTrainedTokenizerBase:
    """BertTokenizer with bos [DEC] and additional special [ENC] (ids 30522, 30523 for bert-base-uncased).

    Adds `enc_token_id` as BLIP's init_tokenizer does. Idempotent for a saved BLIP tokenizer directory.
    """
    tok = _base_tokenizer(str(name_or_path))
    if tok.convert_tokens_to_ids(DEC) in (None, tok.unk_token_id):
        tok.add_special_tokens({"bos_token": DEC})
    else:
        tok.bos_token = DEC
    if tok.convert_tokens_to_ids(ENC) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [ENC]})
    tok.enc_token_id = tok.convert_tokens_to_ids(ENC)
    return tok
