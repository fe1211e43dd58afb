"""The offline demo: its recipes validate, its verdict is computed right, and end to end it learns in time."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from framework.config import load_config
from tests.conftest import ROOT, run_entry

sys.path.insert(0, str(ROOT / "launch"))
import demo  # noqa: E402

DEMO = ROOT / "recipes" / "medblip" / "demo"


@pytest.mark.parametrize("name", ["dapt.yaml", "psd.yaml", "vqa.yaml"])
def test_demo_recipes_validate_with_cpu_sizes(name: str) -> None:
    cfg = load_config(DEMO / name)
    assert cfg.model.preset == "tiny" and cfg.image.size == 64 and not cfg.image.hflip  # never mirror left/right
    assert cfg.train.precision == "fp32" and cfg.data.num_workers == 0
    assert cfg.model.tokenizer == "data/demo/vocab.txt" and cfg.run.dir.startswith("runs/demo/")
    assert cfg.distill.enabled == (name == "psd.yaml")  # PSD switches distillation on despite its dapt base
    if name != "vqa.yaml":
        assert cfg.model.queue_size % cfg.data.batch_size == 0 and cfg.data.train == "data/demo/shards/train"
    else:
        assert cfg.vqa.freeze_vision and cfg.vqa.root == "data/demo/vqa"  # the study's frozen ViT


def _metrics(tmp_path: Path, acc: float, per_type: float, overall: float) -> Path:
    def scores(a: float) -> dict:
        return {g: {"accuracy": a, "count": 10} for g in ("overall", "closed", "open")}

    doc = {"scores": scores(acc), "evaluated_questions": 10,
           "baselines": {"majority_per_type": {"scores": scores(per_type)},
                         "majority_overall": {"scores": scores(overall)}}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(doc))
    return path


def test_verdict_compares_with_the_stronger_majority_baseline(tmp_path: Path) -> None:
    v = demo.check(_metrics(tmp_path, 0.45, 0.41, 0.33))
    assert v["beats_majority"] and v["majority"] == 0.41 and v["accuracy"] == 0.45
    v = demo.check(_metrics(tmp_path, 0.40, 0.41, 0.33))
    assert not v["beats_majority"] and "NOT above" in v["message"]


@pytest.mark.slow
def test_demo_end_to_end_learns_in_under_five_minutes(tmp_path: Path) -> None:
    started = time.time()
    res = run_entry("demo.py", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), timeout=600)
    took = time.time() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "demo.json").read_text())
    assert result["accuracy"] > result["majority"] + 0.15, result  # clearly above, not by a hair
    assert took < 300, f"demo took {took:.0f} s"
    table = (tmp_path / "runs" / "table1.md").read_text()
    assert "DAPT + PSD" in table and "Majority" in table
    for stage in ("dapt", "psd", "vqa-psd"):  # TensorBoard events for every stage
        assert list((tmp_path / "runs" / stage / "tb").glob("events.out.tfevents.*")), stage
    assert "tensorboard --logdir" in res.stdout
