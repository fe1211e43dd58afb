"""BLIP-2 on VQA-RAD: fine-tune the Q-Former (ViT and LLM frozen) on "Question: {} Answer:" prompts, then answer the
test split by generation AND by ranking candidate answers by the LLM's log-likelihood, side by side.

YAML: `recipe: recipes.blip2.vqa`, sections `model:`, `image:` and `vqa:` (VqaConfig below); objective `vqa`;
`run.init_from` = a stage-2 run or a `Salesforce/blip2-opt-2.7b` directory. Splits, scoring, the majority
baselines and the files (metrics.json + predictions.jsonl under run.dir/eval/step_N/ and run.dir) are the MedBLIP
VQA recipe's, so launch/evaluate.py and launch/make_table.py read BLIP-2 runs unchanged. metrics.json's
"scores"/"metrics" hold `vqa.primary`'s answers; "by_inference" holds every mode that ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch.utils.data import DataLoader

from framework.config import ConfigError, DataConfig
from framework.run_env import RunEnv
from framework.task import Task
from recipes.common.vqa_eval import RETIRED_VQA_KEYS, VqaSectionConfig, candidate_answers, load_vqa, rank_coverage
from recipes.common.vqa_metrics import flatten, score, score_one
from recipes.common.vqa_rad import VqaDataset, VqaSplit
from recipes.common.vqa_recipe import VqaRecipeBase, evaluated_questions

from .build import Blip2Config, build_model, task_for
from .data import LlmCollate
from .llm_model import Blip2LLM
from .objectives import VQA_OBJECTIVES
from .weights import load_pretrained

MODES = ("generate", "rank")
INFERENCE = ("both",) + MODES


@dataclass
class VqaConfig(VqaSectionConfig):
    """The `vqa:` section: the shared keys (data, split, candidates, evaluation) + the two inference modes and which
    one fills metrics.json's scores."""

    INFERENCE: ClassVar[tuple[str, ...]] = INFERENCE

    inference: str = "both"  # both | generate | rank
    primary: str = "generate"  # the mode whose scores are metrics.json's "scores"/"metrics" (make_table's row)
    num_beams: int = 5  # generate: LAVIS's BLIP-2 VQA settings (beams 5, at most 10 new tokens, length penalty 0)
    max_new_tokens: int = 10
    length_penalty: float = 0.0
    eval_batch_size: int = 16

    def check(self) -> None:
        super().check()
        if self.primary not in MODES or (self.inference != "both" and self.primary != self.inference):
            raise ConfigError(f"vqa.primary must be a mode that runs ({', '.join(self.modes)}), got {self.primary!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"vqa.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.inference == "both" else (self.inference,)


@dataclass
class Blip2VqaConfig(Blip2Config):
    """vqa.yaml: BLIP-2's sections + the vqa: section."""

    data: DataConfig = field(default_factory=DataConfig)  # the questions are a map-style dataset: no shard keys
    vqa: VqaConfig = field(default_factory=VqaConfig)
    RETIRED: ClassVar[tuple[str, ...]] = Blip2Config.RETIRED + RETIRED_VQA_KEYS


__all__ = ["RECIPE", "Blip2VqaRecipe", "Blip2VqaConfig", "VqaConfig", "build", "load_trained", "evaluate_model"]


def load_trained(cfg: Blip2VqaConfig, checkpoint: str) -> Blip2LLM:
    """The recipe's model with the weights of `checkpoint`; refuses weights that leave model tensors missing."""
    model = build_model(cfg, stage="vqa", load_weights=False)
    report = load_pretrained(model, checkpoint)
    print(report.summary(), flush=True)
    if report.missing:
        raise ValueError(f"{checkpoint}: {len(report.missing)} model tensors are not in the checkpoint (e.g. "
                         f"{report.missing[0]}); it does not fit this recipe's model")
    return model


def build(cfg: Blip2VqaConfig, env: RunEnv) -> Task:
    """Config -> Task: Blip2LLM (Q-Former + frozen LLM) trained on the prompted answers, evaluated on the test split."""
    split = load_vqa(cfg)
    model = build_model(cfg, stage="vqa", env=env)
    return task_for(model, collate=LlmCollate(model.text, cfg.model.prompt),
                train_dataset=VqaDataset(split.train, split.image_dir, cfg.image, train=True),
                evaluate=RECIPE.evaluator(cfg, split))


@torch.no_grad()
def evaluate_model(model: Blip2LLM, cfg: Blip2VqaConfig, split: VqaSplit, candidates: Optional[list[str]] = None,
                   num_workers: int = 0) -> dict[str, Any]:
    """Answer the test questions in every configured mode -> {"predictions", "scores", "by_inference", "inference"}."""
    v: VqaConfig = cfg.vqa
    test = evaluated_questions(cfg, split)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    candidates = candidates if candidates is not None else candidate_answers(cfg, split)
    cand_ids, cand_mask = model.text.targets(candidates, device)
    loader = DataLoader(VqaDataset(test, split.image_dir, cfg.image, train=False), batch_size=v.eval_batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=LlmCollate(model.text, cfg.model.prompt))
    answers: dict[str, list[str]] = {m: [] for m in v.modes}
    for batch in loader:
        embeds = model.image_embeds(batch["image"].to(device))
        if "generate" in v.modes:
            answers["generate"] += model.generate(embeds, batch["prompts"], num_beams=v.num_beams,
                                                  max_new_tokens=v.max_new_tokens, length_penalty=v.length_penalty)
        if "rank" in v.modes:
            best, _ = model.rank_answers(embeds, batch["prompts"], cand_ids, cand_mask, k=v.k_test)
            answers["rank"] += [candidates[i] for i in best.tolist()]
    model.train(was_training)
    truths, kinds = [r.answer for r in test], [r.answer_type for r in test]
    by_inference = {m: {"scores": score(a, truths, kinds)} for m, a in answers.items()}
    for m in by_inference:
        by_inference[m]["metrics"] = flatten(by_inference[m]["scores"])
    rows = []
    for i, r in enumerate(test):
        primary = score_one(answers[v.primary][i], r.answer)
        row = {"qid": r.qid, "image": r.image, "question": r.question_raw, "answer_type": r.answer_type,
               "question_type": r.question_type, "ground_truth": r.answer, "prediction": primary["prediction"],
               "match": primary["match"], "edit_similarity": round(primary["edit_similarity"], 6)}
        for m in v.modes:
            one = score_one(answers[m][i], r.answer)
            row |= {f"prediction_{m}": one["prediction"], f"match_{m}": one["match"]}
        rows.append(row)
    inference = {"mode": v.primary, "modes": list(v.modes), "prompt": cfg.model.prompt, "num_beams": v.num_beams,
                 "max_length": v.max_new_tokens, "length_penalty": v.length_penalty, "k_test": v.k_test,
                 "answer_list": v.answer_list, "candidates": len(candidates),
                 "coverage": rank_coverage(candidates, test), "rank_score": "sum of answer-token log-probabilities "
                 "(end token included) given image and prompt"}
    return {"predictions": rows, "scores": by_inference[v.primary]["scores"], "by_inference": by_inference,
            "inference": inference}


@dataclass(frozen=True)
class Blip2VqaRecipe(VqaRecipeBase):
    """BLIP-2's VQA recipe: answers in every configured mode; metrics.json adds by_inference and what is frozen."""

    load_trained = staticmethod(load_trained)
    evaluate_model = staticmethod(evaluate_model)

    def document_fields(self, cfg: Blip2VqaConfig, result: dict[str, Any]) -> dict[str, Any]:
        return {"model": "blip2", "by_inference": result["by_inference"], "freeze_vision": True, "freeze_llm": True}


RECIPE = Blip2VqaRecipe(config=Blip2VqaConfig, objectives=VQA_OBJECTIVES, build=build)
