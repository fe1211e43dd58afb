"""The VQA recipe protocol: what launch/evaluate.py, export_hf.py and ask.py need of a VQA recipe (MedBLIP, BLIP-2),
and the one implementation of what those recipes share: the metrics.json document and the in-training evaluator.

A VQA recipe module declares `RECIPE = MyVqaRecipe(config=..., objectives=..., build=...)`, a `VqaRecipeBase`
subclass that gives only what differs: how trained weights load, how a split is answered, its own document fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

from torch import nn

from framework.distributed import rank, say
from framework.task import Recipe
from recipes.common.vqa_eval import candidate_answers, sample_images, samples_markdown, write_results
from recipes.common.vqa_metrics import flatten, majority_baselines
from recipes.common.vqa_rad import VqaSplit


@runtime_checkable
class VqaRecipe(Protocol):
    """What the launchers use of a VQA recipe: trained weights, the answers to a split, their metrics.json."""

    def load_trained(self, cfg: Any, checkpoint: str) -> nn.Module:
        """The recipe's model with the weights of `checkpoint` (refused when model tensors are missing)."""
        ...

    def evaluate_model(self, model: nn.Module, cfg: Any, split: VqaSplit, candidates: Optional[list[str]] = None,
                       num_workers: int = 0) -> dict[str, Any]:
        """Answer split.test (first vqa.eval_limit) -> {"predictions", "scores", "inference", ...}."""
        ...

    def results_document(self, cfg: Any, split: VqaSplit, result: dict[str, Any], *, step: Optional[int] = None,
                         checkpoint: Optional[str] = None) -> dict[str, Any]:
        """metrics.json for `result`: split, scores, flat metrics, majority baselines and provenance."""
        ...


class NotAVqaRecipe(ValueError):
    """The config's recipe is not a VQA recipe (its RECIPE does not implement VqaRecipe)."""


def vqa_recipe(cfg: Any) -> VqaRecipe:
    """The VQA recipe of `cfg` (its RECIPE); NotAVqaRecipe, in one line, for any other recipe."""
    from framework.config import import_recipe

    recipe = import_recipe(cfg.recipe, cfg.source)
    if not isinstance(recipe, VqaRecipe):
        raise NotAVqaRecipe(f"{cfg.source}: recipe {cfg.recipe!r} is not a VQA recipe (use recipes.medblip.vqa)")
    return recipe


def evaluated_questions(cfg: Any, split: VqaSplit) -> list:
    """split.test, or its first vqa.eval_limit questions."""
    return split.test[: cfg.vqa.eval_limit] if cfg.vqa.eval_limit else split.test


@dataclass(frozen=True)
class VqaRecipeBase(Recipe):
    """A VQA recipe's RECIPE: the shared document and evaluator; subclasses give load_trained, evaluate_model and
    document_fields."""

    def load_trained(self, cfg: Any, checkpoint: str) -> nn.Module:
        raise NotImplementedError

    def evaluate_model(self, model: nn.Module, cfg: Any, split: VqaSplit, candidates: Optional[list[str]] = None,
                       num_workers: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def document_fields(self, cfg: Any, result: dict[str, Any]) -> dict[str, Any]:
        """The recipe's own metrics.json fields (what it freezes, extra inference modes)."""
        return {}

    def results_document(self, cfg: Any, split: VqaSplit, result: dict[str, Any], *, step: Optional[int] = None,
                         checkpoint: Optional[str] = None) -> dict[str, Any]:
        """metrics.json: the split used, the scores, flat metrics, majority baselines, provenance + the recipe's."""
        return {"split": split.summary(), "evaluated_questions": len(result["predictions"]),
                "scores": result["scores"], "metrics": flatten(result["scores"]), "inference": result["inference"],
                "baselines": majority_baselines(split.train, evaluated_questions(cfg, split)), "step": step,
                "checkpoint": checkpoint, "init_from": cfg.run.init_from, "recipe": cfg.source,
                "image_size": cfg.image.size, **self.document_fields(cfg, result), "seed": cfg.train.seed}

    def evaluator(self, cfg: Any, split: VqaSplit) -> "VqaEvaluator":
        """Task.evaluate for this recipe."""
        return VqaEvaluator(self, cfg, split)


class VqaEvaluator:
    """Task.evaluate: scores the validation split when the data set has one (SLAKE, PathVQA: checkpoints are
    selected there, never on test), else the test split; returns flat metrics (+ samples) and writes the files."""

    def __init__(self, recipe: VqaRecipe, cfg: Any, split: VqaSplit):
        self.recipe, self.cfg, self.split = recipe, cfg, split.for_selection()
        if self.split.evaluated == "validation":
            say(f"evaluation during training: the {len(self.split.test)} validation questions (choose the checkpoint "
                "there); the test split is scored only by launch/evaluate.py")
        # the candidates once, not at every evaluation; generate-only needs none (evaluate_model finds its own)
        self.candidates = candidate_answers(cfg, split) if cfg.vqa.inference != "generate" else None

    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        result = self.recipe.evaluate_model(model, self.cfg, self.split, self.candidates)
        if rank() == 0:  # metrics.json + predictions.jsonl at every evaluation
            doc = self.recipe.results_document(self.cfg, self.split, result, step=step,
                                               checkpoint=f"step {step} (in training)")
            run_dir = Path(self.cfg.run.dir)
            write_results(run_dir / "eval" / f"step_{step:08d}", doc, result["predictions"])
            if self.split.evaluated == "test":  # validation scores never stand in for the test result
                write_results(run_dir, doc, result["predictions"])  # the latest result, for make_table
        flat = dict(flatten(result["scores"]))
        by_inference = result.get("by_inference", {})  # a recipe that ran several modes: each one's metrics
        for mode, r in by_inference.items():
            flat |= {f"{mode}/{k}": v for k, v in r["metrics"].items()}
        if by_inference:
            say(" | ".join(f"{m}: acc {r['metrics'].get('accuracy', 0):.3f}" for m, r in by_inference.items()))
        return flat | {"samples": samples_markdown(result["predictions"])} | sample_images(result["predictions"],
                                                                                          self.split.image_dir)
