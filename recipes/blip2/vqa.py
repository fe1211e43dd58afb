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
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.config import ConfigError
from framework.distributed import DistInfo, rank, say
from framework.task import Recipe, Task
from recipes.common.vqa_eval import (
    candidate_answers,
    check_dataset,
    load_vqa,
    rank_coverage,
    sample_images,
    samples_markdown,
    trained_checkpoint,
    write_results,
)
from recipes.common.vqa_metrics import flatten, majority_baselines, score, score_one
from recipes.common.vqa_rad import SPLITS, VqaDataset, VqaSplit

from .build import Blip2Config, build_model, task_for
from .data import LlmCollate
from .model import Blip2
from .objectives import VQA_OBJECTIVES
from .weights import load_pretrained

MODES = ("generate", "rank")
INFERENCE = ("both",) + MODES


@dataclass
class VqaConfig:
    """The `vqa:` section: data, split, the two inference modes and which one fills metrics.json's scores."""

    dataset: str = "vqa_rad"  # vqa_rad | slake (English) | pathvqa (the parquet copy)
    root: str = "data/vqa_rad"  # 'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/'
    split: str = "official"  # official (451 test) | mevf
    image_cache: Optional[str] = None  # pathvqa: where its parquet images are written once (default root/images)
    inference: str = "both"  # both | generate | rank
    primary: str = "generate"  # the mode whose scores are metrics.json's "scores"/"metrics" (make_table's row)
    answer_list: str = "train"  # rank candidates: the distinct training answers, or a JSON list file
    k_test: int = 128  # rank: candidates kept by first-token log-probability, then scored in full (BLIP's k)
    num_beams: int = 5  # generate: LAVIS's BLIP-2 VQA settings (beams 5, at most 10 new tokens, length penalty 0)
    max_new_tokens: int = 10
    length_penalty: float = 0.0
    max_question_words: int = 35
    eval_batch_size: int = 16
    eval_limit: Optional[int] = None  # evaluate the first N test questions only (quick checks)
    save_predictions: bool = True

    def check(self) -> None:
        check_dataset(self.dataset, self.split)
        if self.split not in SPLITS:
            raise ConfigError(f"vqa.split: unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if self.inference not in INFERENCE:
            raise ConfigError(f"vqa.inference: unknown mode {self.inference!r}; known: {', '.join(INFERENCE)}")
        if self.primary not in MODES or (self.inference != "both" and self.primary != self.inference):
            raise ConfigError(f"vqa.primary must be a mode that runs ({', '.join(self.modes)}), got {self.primary!r}")
        for name in ("k_test", "num_beams", "max_new_tokens", "eval_batch_size", "max_question_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vqa.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"vqa.eval_limit must be >= 1 or null, got {self.eval_limit}")

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.inference == "both" else (self.inference,)


@dataclass
class Blip2VqaConfig(Blip2Config):
    """vqa.yaml: BLIP-2's sections + the vqa: section."""

    vqa: VqaConfig = field(default_factory=VqaConfig)


__all__ = ["RECIPE", "Blip2VqaConfig", "VqaConfig", "build", "load_vqa", "trained_checkpoint", "load_trained",
           "evaluate_model", "results_document", "write_results"]


def load_trained(cfg: Blip2VqaConfig, checkpoint: str) -> Blip2:
    """The recipe's model with the weights of `checkpoint`; refuses weights that leave model tensors missing."""
    model = build_model(cfg, stage="vqa", load_weights=False)
    report = load_pretrained(model, checkpoint)
    print(report.summary(), flush=True)
    if report.missing:
        raise ValueError(f"{checkpoint}: {len(report.missing)} model tensors are not in the checkpoint (e.g. "
                         f"{report.missing[0]}); it does not fit this recipe's model")
    return model


def build(cfg: Blip2VqaConfig, dist: DistInfo) -> Task:
    """Config -> Task: Blip2 + frozen LLM trained on the prompted answers, evaluated on the test split."""
    split = load_vqa(cfg)
    model = build_model(cfg, stage="vqa", dist=dist)
    return task_for(model, collate=LlmCollate(model.text, cfg.model.prompt),
                train_dataset=VqaDataset(split.train, split.image_dir, cfg.image, train=True),
                evaluate=VqaEvaluator(cfg, split))


@torch.no_grad()
def evaluate_model(model: Blip2, cfg: Blip2VqaConfig, split: VqaSplit, candidates: Optional[list[str]] = None,
                   num_workers: int = 0) -> dict[str, Any]:
    """Answer the test questions in every configured mode -> {"predictions", "scores", "by_inference", "inference"}."""
    v: VqaConfig = cfg.vqa
    test = split.test[: v.eval_limit] if v.eval_limit else split.test
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


def results_document(cfg: Blip2VqaConfig, split: VqaSplit, result: dict[str, Any], *, step: Optional[int] = None,
                     checkpoint: Optional[str] = None) -> dict[str, Any]:
    """metrics.json: the MedBLIP VQA document (split, scores, flat metrics, baselines, provenance) + by_inference."""
    test = split.test[: cfg.vqa.eval_limit] if cfg.vqa.eval_limit else split.test
    return {"split": split.summary(), "evaluated_questions": len(result["predictions"]), "model": "blip2",
            "scores": result["scores"], "metrics": flatten(result["scores"]), "inference": result["inference"],
            "by_inference": result["by_inference"], "baselines": majority_baselines(split.train, test),
            "step": step, "checkpoint": checkpoint, "init_from": cfg.run.init_from, "recipe": cfg.source,
            "image_size": cfg.image.size, "freeze_vision": True, "freeze_llm": True, "seed": cfg.train.seed}


class VqaEvaluator:
    """Task.evaluate: scores the test split in both modes, writes metrics.json/predictions.jsonl (rank 0)."""

    def __init__(self, cfg: Blip2VqaConfig, split: VqaSplit):
        self.cfg, self.split = cfg, split.for_selection()  # SLAKE/PathVQA: select on validation, never on test
        if self.split.evaluated == "validation":
            say(f"evaluation during training: the {len(self.split.test)} validation questions (choose the checkpoint "
                "there); the test split is scored only by launch/evaluate.py")
        self.candidates = candidate_answers(cfg, split)

    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        result = evaluate_model(model, self.cfg, self.split, self.candidates)
        if self.cfg.vqa.save_predictions and rank() == 0:
            doc = results_document(self.cfg, self.split, result, step=step, checkpoint=f"step {step} (in training)")
            run_dir = Path(self.cfg.run.dir)
            write_results(run_dir / "eval" / f"step_{step:08d}", doc, result["predictions"])
            if self.split.evaluated == "test":  # validation scores never stand in for the test result
                write_results(run_dir, doc, result["predictions"])  # the latest result, for make_table
        flat = dict(flatten(result["scores"]))
        for mode, r in result["by_inference"].items():
            flat |= {f"{mode}/{k}": v for k, v in r["metrics"].items()}
        say(" | ".join(f"{m}: acc {r['metrics'].get('accuracy', 0):.3f}" for m, r in result["by_inference"].items()))
        return flat | {"samples": samples_markdown(result["predictions"])} | sample_images(result["predictions"],
                                                                                          self.split.image_dir)


RECIPE = Recipe(config=Blip2VqaConfig, objectives=VQA_OBJECTIVES, build=build)
