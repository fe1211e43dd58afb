"""Stage 0 of the OFFLINE DEMO only: a language model pretrained on text, to be frozen by stages 2 and 3.

BLIP-2 freezes a pretrained LLM (OPT, Flan-T5); offline there is none, and a random one cannot be steered (its
final LayerNorm and small head bound every logit, so no soft prompt makes it confident). This recipe trains the
tiny OPT on the demo's own texts, in the very token layout stages 2 and 3 use: the captions of data.train
(" caption" + end) and, with corpus.vqa_root, the TRAINING questions and answers ("Question: q Answer: a" + end;
never the test split). Real runs skip it and point model.llm_weights at a downloaded OPT / Flan-T5.

YAML: `recipe: recipes.blip2.lm`, sections `model:` (its text: sizes) and `corpus:`; objective `lm`.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from framework.config import Config, ConfigError
from framework.distributed import say
from framework.run_env import RunEnv
from framework.shards import expand_shards
from framework.task import Recipe, Task
from recipes.common.text import pre_caption
from recipes.common.vqa_rad import load_split

from .build import enabled
from .config import Blip2ModelConfig, hf_config
from .llm_text import IGNORE, LlmText
from .objectives import LM_OBJECTIVES, llm_loss
from .stage1 import MAX_WORDS
from .tokenizers import llm_tokenizer


@dataclass
class CorpusConfig:
    """The `corpus:` section: which texts the language model reads."""

    captions: bool = True  # the captions of data.train's shards
    vqa_root: Optional[str] = None  # + the training questions/answers of this VQA-RAD-layout folder
    vqa_split: str = "official"


@dataclass
class LmConfig(Config):
    """demo/lm.yaml: the framework's sections + the language model's sizes and the corpus."""

    model: Blip2ModelConfig = field(default_factory=Blip2ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


class LanguageModel(nn.Module):
    """A causal LM under the name Blip2LLM gives it (`language_model.*`), so model.llm_weights loads this run as is."""

    def __init__(self, cfg: Config, tokenizer: Any):
        super().__init__()
        if cfg.model.is_encoder_decoder:
            raise ConfigError(f"{cfg.source}: recipes.blip2.lm pretrains decoder-only models (model.text.model_type "
                              "opt), not T5")
        config = hf_config(cfg.model, image_size=32, qformer_vocab=8, text_input=False, llm_vocab=len(tokenizer))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.text = LlmText(tokenizer, encoder_decoder=False, end_text=cfg.model.end_text,
                            max_len=cfg.model.max_llm_len, config_pad_id=config.text_config.pad_token_id or 0)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """{"llm_input_ids", "llm_attention_mask"} -> {"losses": {"lm": next-token CE over every token after bos}}."""
        ids, mask = batch["llm_input_ids"], batch["llm_attention_mask"]
        logits = self.language_model(input_ids=ids, attention_mask=mask).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        scored = targets != IGNORE
        return {"losses": {"lm": llm_loss(logits[:, :-1][scored], targets[scored])}, "metrics": {}}


class TextCollate:
    """{"prompt", "target"} items -> the LlmText training layout (the whole sequence is scored by the model)."""

    def __init__(self, text: LlmText):
        self.text = text

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return self.text.training_batch([i["prompt"] for i in items], [i["target"] for i in items])


def corpus(cfg: LmConfig) -> list[dict[str, str]]:
    """The texts: captions (pre_caption'd as the image stages see them) and training questions/answers."""
    items: list[dict[str, str]] = []
    if cfg.corpus.captions:
        if cfg.data.train is None:
            raise ConfigError(f"{cfg.source}: corpus.captions needs data.train (caption shards)")
        for shard in expand_shards(cfg.data.train):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(".txt"):
                        text = pre_caption(tar.extractfile(member).read().decode("utf-8"), MAX_WORDS)
                        if text:
                            items.append({"prompt": "", "target": text})
    if cfg.corpus.vqa_root:
        split = load_split(cfg.corpus.vqa_root, cfg.corpus.vqa_split)
        items += [{"prompt": cfg.model.prompt.format(r.question), "target": r.answer} for r in split.train]
    if not items:
        raise ConfigError(f"{cfg.source}: corpus: no texts (enable corpus.captions or set corpus.vqa_root)")
    say(f"language-model corpus: {len(items)} texts")
    return items


def build(cfg: LmConfig, env: RunEnv) -> Task:
    """Config -> Task: the causal LM on the corpus texts (a map-style dataset)."""
    enabled(cfg, ("lm",))
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg, llm_tokenizer(cfg.model.llm_tokenizer))
    return Task(model=model, collate=TextCollate(model.text), train_dataset=corpus(cfg))


RECIPE = Recipe(config=LmConfig, objectives=LM_OBJECTIVES, build=build)
