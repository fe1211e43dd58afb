"""SLAKE through the whole chain (train on validation-selected evaluation, evaluate.py on test, the blank-image
baseline, make_table), and the blank-image split itself."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_entry
from test_vqa_datasets import write_slake

from recipes.common.image_text import ImageConfig
from recipes.common.slake import load_slake
from recipes.common.vqa_eval import blank_image_split
from recipes.common.vqa_rad import VqaDataset

RECIPE = str(ROOT / "recipes" / "medblip" / "vqa_slake.yaml")


def test_blank_image_split_gives_every_question_one_constant_image(tmp_path):
    write_slake(tmp_path / "slake")
    split = load_slake(tmp_path / "slake")
    blank = blank_image_split(split, tmp_path / "blank")
    assert [r.qid for r in blank.test] == [r.qid for r in split.test] and blank.image_dir == tmp_path / "blank"
    cfg = ImageConfig(size=16, augment=False)
    real = [VqaDataset(split.train, split.image_dir, cfg, train=False)[i]["image"] for i in range(2)]
    blanks = [VqaDataset(split.train + split.test, blank.image_dir, cfg, train=False)[i]["image"] for i in range(4)]
    assert not torch.equal(real[0], real[1])  # the miniature's own images differ (two colours)
    assert all(torch.equal(blanks[0], b) for b in blanks[1:])  # one constant image for every question
    assert float(blanks[0].flatten(1).std(dim=1).max()) == pytest.approx(0.0, abs=1e-6)  # constant per channel


@pytest.mark.slow
def test_slake_through_train_evaluate_blank_and_table(tmp_path):
    write_slake(tmp_path / "slake")
    run = tmp_path / "run"
    over = [f"run.dir={run}", "run.init_from=null", f"vqa.root={tmp_path / 'slake'}", "model.preset=tiny",
            "image.size=32", "train.max_steps=2", "train.warmup_steps=0", "data.batch_size=2", "data.num_workers=0",
            "train.precision=fp32", "deepspeed={}", "run.save_every=0", "run.eval_every=0", "vqa.k_test=2"]
    train = run_entry("train.py", "--recipe", RECIPE, *over)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "SLAKE split 'official'" in train.stdout
    assert "evaluation during training: the 1 validation questions" in train.stdout
    during = json.loads((run / "eval" / "step_00000002" / "metrics.json").read_text())
    assert during["split"]["evaluated"] == "validation" and during["evaluated_questions"] == 1
    assert not (run / "metrics.json").exists()  # a validation score never stands in for the test result

    ev = run_entry("evaluate.py", "--recipe", RECIPE, *over)
    assert ev.returncode == 0, ev.stderr[-3000:]
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["split"]["dataset"] == "slake" and doc["split"]["evaluated"] == "test"
    assert doc["evaluated_questions"] == 2 and doc["by_type"]["field"] == "content_type"
    assert set(doc["by_type"]["groups"]) == {"ORGAN", "POSITION"} and doc["intervals"]["groups"]["overall"]
    assert "95% interval (overall, 2 questions on 1 images" in ev.stdout

    blank = run_entry("evaluate.py", "--recipe", RECIPE, *over, "--blank-image")
    assert blank.returncode == 0, blank.stderr[-3000:]
    bdoc = json.loads((run / "blank_image" / "metrics.json").read_text())
    assert bdoc["blank_image"] is True and json.loads((run / "metrics.json").read_text()) == doc  # not replaced

    table = run_entry("make_table.py", f"{run}=psd", str(run / "blank_image"))
    assert table.returncode == 0, table.stderr
    assert "| DAPT + PSD | SLAKE test | 2 |" in table.stdout and "| Blank image" in table.stdout
