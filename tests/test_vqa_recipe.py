"""The VQA recipe protocol: both VQA recipes implement it, other recipes are refused in one line, and the shared
metrics.json document carries each recipe's own fields."""
from __future__ import annotations

import pytest
from conftest import ROOT

from framework.config import import_recipe, load_config
from recipes.common.vqa_recipe import NotAVqaRecipe, VqaRecipe, vqa_recipe


@pytest.mark.parametrize("name", ["recipes.medblip.vqa", "recipes.blip2.vqa"])
def test_both_vqa_recipes_implement_the_protocol(name):
    assert isinstance(import_recipe(name), VqaRecipe)


@pytest.mark.parametrize("name", ["recipes.medblip.pretrain", "recipes.medblip.retrieval", "recipes.blip2.stage2"])
def test_other_recipes_are_not_vqa_recipes(name):
    assert not isinstance(import_recipe(name), VqaRecipe)


def test_a_non_vqa_config_is_refused_in_one_line():
    cfg = load_config(ROOT / "recipes" / "medblip" / "dapt.yaml")
    with pytest.raises(NotAVqaRecipe) as e:
        vqa_recipe(cfg)
    assert "'recipes.medblip.pretrain' is not a VQA recipe" in str(e.value) and "\n" not in str(e.value)


class _Split:
    """The two things results_document reads of a split besides its questions."""

    def __init__(self, train, test):
        self.train, self.test = train, test

    def summary(self):
        return {"split": "official"}


@pytest.mark.parametrize("recipe,yaml,own", [
    ("recipes.medblip.vqa", "recipes/medblip/vqa.yaml", {"freeze_vision": True}),
    ("recipes.blip2.vqa", "recipes/blip2/vqa.yaml", {"model": "blip2", "freeze_vision": True, "freeze_llm": True,
                                                     "by_inference": {"generate": {}}}),
])
def test_results_document_is_shared_plus_the_recipe_s_own_fields(recipe, yaml, own):
    from recipes.common.vqa_metrics import score
    from recipes.common.vqa_rad import VqaRecord

    cfg = load_config(ROOT / yaml, ["vqa.eval_limit=1"])
    rows = [VqaRecord(qid=str(i), image=f"{i}.png", question=q, question_raw=q, answer=a, answer_type=t,
                      question_type="PRES") for i, (q, a, t) in enumerate([("is it?", "yes", "closed"),
                                                                            ("what?", "lung", "open")])]
    result = {"predictions": [{"prediction": "yes"}], "scores": score(["yes"], ["yes"], ["closed"]),
              "inference": {"mode": "generate"}, "by_inference": {"generate": {}}}
    doc = import_recipe(recipe).results_document(cfg, _Split(rows, rows), result, step=3, checkpoint="c")
    shared = {"split", "evaluated_questions", "scores", "metrics", "inference", "baselines", "step", "checkpoint",
              "init_from", "recipe", "image_size", "seed"}
    assert set(doc) == shared | set(own)
    assert {k: doc[k] for k in own} == own
    assert doc["step"] == 3 and doc["checkpoint"] == "c" and doc["evaluated_questions"] == 1
    assert doc["baselines"]["majority_overall"]["scores"]["overall"]["count"] == 1  # vqa.eval_limit's questions


def test_make_table_shares_the_document_digest_without_importing_torch():
    """make_table compares metrics.json files by the digest evaluate.py writes, and must load without torch."""
    import subprocess
    import sys

    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('make_table', {str(ROOT / 'launch' / 'make_table.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "from recipes.common.vqa_document import questions_sha256\n"
            "assert m.questions_sha256 is questions_sha256\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr
