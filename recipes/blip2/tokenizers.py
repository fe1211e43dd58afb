"""The two tokenizers of BLIP-2, loaded from local files only.

- Q-Former: bert-base-uncased WordPiece + bos "[DEC]" (LAVIS's Blip2Base.init_tokenizer: vocabulary 30523, no
  "[ENC]" as in BLIP-1). The bundled bert-base-uncased vocabulary of the MedBLIP recipe is reused.
- Language model: whatever tokenizer the LLM was trained with (GPT-2 BPE for OPT, SentencePiece for Flan-T5),
  from a local directory (the `Salesforce/blip2-opt-2.7b` download holds it) or, for tiny demo models, a
  WordPiece vocab.txt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from recipes.common.tokenizer import BUNDLED_VOCAB, TokenizerNotFound

DEC = "[DEC]"


def _wordpiece(vocab_file: Path) -> PreTrainedTokenizerBase:
    """A lower-casing BertTokenizer over a vocab.txt (one token per line, id = line number)."""
    words = vocab_file.read_text(encoding="utf-8").split("\n")
    if words and words[-1] == "":
        words = words[:-1]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def qformer_tokenizer(name_or_path: str = "bundled") -> PreTrainedTokenizerBase:
    """BertTokenizer (lower case) with bos [DEC]; `name_or_path`: bundled | a vocab.txt | a local directory."""
    path = BUNDLED_VOCAB if name_or_path == "bundled" else Path(name_or_path).expanduser()
    if path.is_file():
        tok = _wordpiece(path)
    elif path.is_dir():
        tok = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise TokenizerNotFound(f"model.tokenizer={name_or_path!r}: no vocab.txt or tokenizer directory there; "
                                "use model.tokenizer=bundled (bert-base-uncased, shipped with the project)")
    if tok.convert_tokens_to_ids(DEC) in (None, tok.unk_token_id):
        tok.add_special_tokens({"bos_token": DEC})
    else:
        tok.bos_token = DEC
    return tok


def llm_tokenizer(name_or_path: Optional[str]) -> PreTrainedTokenizerBase:
    """The language model's tokenizer from a local directory (AutoTokenizer) or a WordPiece vocab.txt."""
    if not name_or_path:
        raise TokenizerNotFound("model.llm_tokenizer is not set and run.init_from is not a directory holding a "
                                "tokenizer: point model.llm_tokenizer at the language model's tokenizer files")
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".txt":
        return _wordpiece(path)
    if not path.is_dir():
        raise TokenizerNotFound(f"model.llm_tokenizer={name_or_path!r}: not a local directory or vocab.txt (nothing "
                                "is downloaded: give the directory of the downloaded model)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerNotFound(f"model.llm_tokenizer={name_or_path!r}: no tokenizer files there "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
