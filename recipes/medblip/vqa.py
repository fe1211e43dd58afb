"""The MedBLIP VQA-RAD recipe: fine-tune BLIP_VQA (vision frozen by default) and evaluate on the test split.

YAML: `recipe: recipes.medblip.vqa`, sections `model:` (TowersConfig: tower sizes, tokenizer, label smoothing),
`image:` (ImageConfig) and `vqa:` (VqaConfig below); objective `vqa`; `run.init_from` = BLIP's model_base.pth, one
of our DAPT/PSD runs, a VQA run or a transformers BlipForQuestionAnswering directory. Every evaluation writes
`metrics.json` and `predictions.jsonl` under `run.dir/eval/step_N/` and, as the latest result, into `run.dir`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch.utils.data import DataLoader

from framework.config import ConfigError, DataConfig
from framework.distributed import say
from framework.run_env import RunEnv
from framework.task import Task
from recipes.common.vqa_eval import RETIRED_VQA_KEYS, VqaSectionConfig, candidate_answers, load_vqa, rank_coverage
from recipes.common.vqa_metrics import score, score_one
from recipes.common.vqa_rad import VqaDataset, VqaSplit
from recipes.common.vqa_recipe import VqaRecipeBase, evaluated_questions
from recipes.medblip.model.blip_vqa import MedBlipVqa, load_vqa_weights
from recipes.medblip.model.weights import fetch_on_rank0
from recipes.medblip.pretrain import BlipConfig, model_config

INFERENCE_MODES = ("rank", "generate")


@dataclass
class VqaConfig(VqaSectionConfig):
    """The `vqa:` section: the shared keys (data, split, candidates, evaluation) + inference and fine-tuning."""

    INFERENCE: ClassVar[tuple[str, ...]] = INFERENCE_MODES

    inference: str = "rank"  # rank (over answer_list, BLIP's default) | generate (beam search)
    rank_label_smoothing: float = 0.0  # rank score = answer log-likelihood; 0.1 = BLIP's smoothed-loss score
    num_beams: int = 3  # generate: beams (BLIP: 3)
    max_generate_len: int = 10  # generate: max tokens including [DEC] (BLIP: 10)
    freeze_vision: bool = True  # the study fine-tunes with the ViT frozen
    max_question_len: int = 35  # question tokens (BLIP: 35)
    max_answer_len: int = 32  # answer tokens for training and candidates (VQA-RAD's longest answer: 32)

    def check(self) -> None:
        super().check()
        if self.max_question_len < 1:
            raise ConfigError(f"vqa.max_question_len must be >= 1, got {self.max_question_len}")
        if self.max_answer_len < 3 or self.max_generate_len < 2:
            raise ConfigError("vqa.max_answer_len must be >= 3 and vqa.max_generate_len >= 2 ([DEC]/[CLS], a "
                              "token, [SEP])")
        if not 0.0 <= self.rank_label_smoothing < 1.0:
            raise ConfigError(f"vqa.rank_label_smoothing must be in [0, 1), got {self.rank_label_smoothing}")


@dataclass
class VqaRecipeConfig(BlipConfig):
    """vqa.yaml / baseline.yaml: BLIP's sections + the vqa: section."""

    data: DataConfig = field(default_factory=DataConfig)  # the questions are a map-style dataset: no shard keys
    vqa: VqaConfig = field(default_factory=VqaConfig)
    RETIRED: ClassVar[tuple[str, ...]] = BlipConfig.RETIRED + RETIRED_VQA_KEYS


__all__ = ["RECIPE", "MedBlipVqaRecipe", "VqaConfig", "VqaRecipeConfig", "build", "build_model", "load_trained",
           "evaluate_model"]


def build_model(cfg: VqaRecipeConfig, *, load_weights: bool = True) -> MedBlipVqa:
    """MedBlipVqa at the configured sizes, identical on every rank, then run.init_from loaded."""
    if cfg.objectives and not any(o.enabled for o in cfg.objectives.values()):
        raise ConfigError(f"{cfg.source}: objectives.vqa is disabled: there is nothing to train")
    v = cfg.vqa
    torch.manual_seed(cfg.train.seed)
    model = MedBlipVqa(model_config(cfg), freeze_vision=v.freeze_vision, max_question_len=v.max_question_len,
                       max_answer_len=v.max_answer_len)
    if load_weights:
        if cfg.run.init_from:
            fetch_on_rank0(cfg.run.init_from)  # every rank builds the model: one download, not one per rank
            say(load_vqa_weights(model, cfg.run.init_from).summary())
        else:
            say("vqa: run.init_from is not set: the model starts from random weights")
    return model


def load_trained(cfg: VqaRecipeConfig, checkpoint: str) -> MedBlipVqa:
    """The recipe's model with the weights of `checkpoint`; refuses weights that leave model tensors missing."""
    model = build_model(cfg, load_weights=False)
    report = load_vqa_weights(model, checkpoint)
    print(report.summary(), flush=True)
    if report.missing:
        raise ValueError(f"{checkpoint}: {len(report.missing)} model tensors are not in the checkpoint (e.g. "
                         f"{report.missing[0]}); it does not fit this recipe's model")
    return model


def build(cfg: VqaRecipeConfig, env: RunEnv) -> Task:
    """Config -> Task: MedBlipVqa, the training questions as a map-style dataset, evaluation on the test split."""
    split = load_vqa(cfg)
    model = build_model(cfg)
    return Task(model=model, collate=model.collate_fn(),
                train_dataset=VqaDataset(split.train, split.image_dir, cfg.image, train=True),
                evaluate=RECIPE.evaluator(cfg, split))


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(model: MedBlipVqa, cfg: VqaRecipeConfig, split: VqaSplit, candidates: Optional[list[str]] = None,
                   num_workers: int = 0) -> dict[str, Any]:
    """Answer the test questions -> {"predictions": [row per question], "scores": {...}, "inference": {...}}."""
    v = cfg.vqa
    test = evaluated_questions(cfg, split)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if v.inference == "rank":
        candidates = candidates if candidates is not None else candidate_answers(cfg, split)
        tokens = model.encode_answers(candidates, device)
    loader = DataLoader(VqaDataset(test, split.image_dir, cfg.image, train=False), batch_size=v.eval_batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=model.collate_fn())
    rows: list[dict[str, Any]] = []
    for batch in loader:
        image = batch["image"].to(device)
        q_ids, q_mask = batch["question_ids"].to(device), batch["question_mask"].to(device)
        if v.inference == "rank":
            answers = model.predict(image, q_ids, q_mask, mode="rank", candidates=candidates,
                                    candidate_tokens=tokens, k=v.k_test, label_smoothing=v.rank_label_smoothing)
        else:
            answers = model.predict(image, q_ids, q_mask, mode="generate", num_beams=v.num_beams,
                                    max_length=v.max_generate_len)
        for answer in answers:
            r = test[len(rows)]
            one = score_one(answer, r.answer)
            rows.append({"qid": r.qid, "image": r.image, "question": r.question_raw, "answer_type": r.answer_type,
                         "question_type": r.question_type, "ground_truth": r.answer, "prediction": one["prediction"],
                         "match": one["match"], "edit_similarity": round(one["edit_similarity"], 6)})
    model.train(was_training)
    scores = score([r["prediction"] for r in rows], [r["ground_truth"] for r in rows], [r["answer_type"] for r in rows])
    inference: dict[str, Any] = {"mode": v.inference}
    if v.inference == "rank":
        inference |= {"k_test": v.k_test, "answer_list": v.answer_list, "candidates": len(candidates),
                      "rank_label_smoothing": v.rank_label_smoothing, "coverage": rank_coverage(candidates, test)}
    else:
        inference |= {"num_beams": v.num_beams, "max_length": v.max_generate_len}
    return {"predictions": rows, "scores": scores, "inference": inference}


@dataclass(frozen=True)
class MedBlipVqaRecipe(VqaRecipeBase):
    """MedBLIP's VQA recipe: BLIP_VQA's weights, answers by rank or generation; metrics.json says freeze_vision."""

    load_trained = staticmethod(load_trained)
    evaluate_model = staticmethod(evaluate_model)

    def document_fields(self, cfg: VqaRecipeConfig, result: dict[str, Any]) -> dict[str, Any]:
        return {"freeze_vision": cfg.vqa.freeze_vision}


RECIPE = MedBlipVqaRecipe(config=VqaRecipeConfig, objectives=("vqa",), build=build)
