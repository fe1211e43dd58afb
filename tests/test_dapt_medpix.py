"""Issue 4's must-hold on real data: MedPix image-caption pairs convert to shards, a few DAPT steps with a tiny model
run on the CPU through launch/train.py (TensorBoard itc/itm/lm and eval/ scalars), and run.resume=auto continues."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_entry
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RECIPE = "recipes/medblip/dapt.yaml"


def prepare(csv: Path, split: str, limit: int, out: Path) -> None:
    res = run_entry("prepare_rocov2.py", "--input", str(csv), "--split", split, "--limit", str(limit),
                    "--samples-per-shard", str(limit // 2), "--max-side", "64", "--workers", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(out.glob("*.tar"))) == 2


def scalars(tb: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    out["_text"] = {t: {} for t in acc.Tags()["tensors"]}  # text summaries are stored as tensors
    return out


@pytest.mark.slow  # two training processes (~12-15 s each on 2 cores) + two conversions
def test_medpix_dapt_steps_log_evaluate_and_resume(shared_data: Path, tmp_path: Path) -> None:
    csv = shared_data / "medpix2_sample" / "sample_captions.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} is not present")
    prepare(csv, "train", 48, tmp_path / "train")  # 64 real pairs: 48 to train on, 16 held out (MedPix "dev")
    prepare(csv, "valid", 16, tmp_path / "val")
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
                 "run.init_from=null", "model.preset=tiny", "image.size=32", "model.queue_size=8",
                 "model.embed_dim=16", "model.grad_checkpointing_vit=false", "data.batch_size=4",
                 "data.num_workers=0", "train.grad_accum=1", "train.precision=fp32", "train.lr=1e-4",
                 "train.warmup_steps=0", "run.save_every=2", "run.eval_every=2", "run.log_every=1",
                 "validation.captions=2", "validation.caption_beams=1", "train.max_steps=5"]

    # a chunked run: stopped after step 3 (run.stop_at_step may change on a resume; train.max_steps may not)
    first = run_entry("train.py", "--recipe", RECIPE, *overrides, "run.stop_at_step=3", timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "done: preempted at step 3" in first.stdout
    assert (run / "checkpoints" / "step_00000003").is_dir()
    logged = scalars(run / "tb")
    for name in ("itc", "itm", "lm"):
        steps = logged[f"loss/{name}"]
        assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in steps.values())
        assert math.isfinite(logged[f"eval/loss_{name}"][2])  # held-out loss at the eval step
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert 0.0 <= logged[f"eval/{k}"][2] <= 1.0
    assert logged["eval/samples"][2] == 16  # the whole held-out set: 4 batches of 4
    assert any(t.startswith("eval/captions") for t in logged["_text"])

    second = run_entry("train.py", "--recipe", RECIPE, *overrides, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step 3" in second.stderr
    assert "done: finished at step 5" in second.stdout
    logged = scalars(run / "tb")
    assert {4, 5} <= set(logged["loss/itc"]) and 4 in logged["eval/loss_lm"]
