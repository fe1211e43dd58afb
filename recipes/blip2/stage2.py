"""BLIP-2 stage 2: generative learning with the LLM frozen: query outputs -> language_projection -> OPT / Flan-T5,
next-token loss on the captions of the same shards (no prompt, as LAVIS's stage-2 pretraining).

YAML: `recipe: recipes.blip2.stage2`, sections `model:` and `image:`; objective `lm`; `run.init_from` = a stage-1
run or LAVIS file (ViT + Q-Former) or a whole `Salesforce/blip2-opt-2.7b` directory; model.llm_weights = the
frozen LLM when init_from lacks it (e.g. a local facebook/opt-2.7b directory).
"""
from __future__ import annotations

from framework.run_env import RunEnv
from framework.task import Recipe, Task

from .build import Blip2PretrainConfig, build_model, task_for
from .data import LlmCollate, make_decode
from .objectives import LM_OBJECTIVES
from .stage1 import MAX_WORDS


def build(cfg: Blip2PretrainConfig, env: RunEnv) -> Task:
    """Config -> Task: Blip2LLM (the frozen LLM); forward returns {"lm": caption loss}."""
    model = build_model(cfg, stage="lm", env=env)
    return task_for(model, decode=make_decode(cfg.image, train=True, max_words=MAX_WORDS),
                    collate=LlmCollate(model.text))


RECIPE = Recipe(config=Blip2PretrainConfig, objectives=LM_OBJECTIVES, build=build)
