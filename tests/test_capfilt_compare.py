"""What launch/demo.py --compare runs for CapFilt: every stage of compare_runs is a working command, and make_table
sets the two VQA runs (DAPT on noisy vs on CapFilt-bootstrapped captions) side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corpora.phantoms import PhantomSpec, write_demo_data
from recipes.medblip.capfilt.compare import compare_runs
from tests.conftest import run_entry

SPEC = PhantomSpec(seed=2, train_captions=64, val_captions=40, samples_per_shard=16, vqa_train_images=24,
                   vqa_test_images=8)


@pytest.mark.slow  # nine short subprocess stages (~2 min on 2 cores)
def test_compare_stages_run_and_make_one_table(tmp_path: Path) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_demo_data(data, SPEC)
    common = [f"model.tokenizer={data / 'vocab.txt'}", "run.resume=none", "train.max_steps=2"]
    plan = compare_runs(data, runs, common, threshold=0.0)  # 2-step models: keep every caption
    assert len(plan.noise["swapped"]) == round(0.4 * 64)
    for stage in plan.stages:
        script, *args = stage.args
        r = run_entry(Path(script).name, *args, timeout=300)
        assert r.returncode == 0, f"{stage.title}\n{r.stdout[-1500:]}\n{r.stderr[-2500:]}"
    manifest = json.loads((runs / "capfilt-shards" / "manifest.json").read_text())
    assert manifest["counts"]["original"]["kept"] == 64 and manifest["models"]["filter"]["spec"].endswith("filter")
    r = run_entry("make_table.py", *plan.table)
    assert r.returncode == 0, r.stderr
    assert "DAPT on noisy captions" in r.stdout and "DAPT on CapFilt-bootstrapped captions" in r.stdout
