"""Exact resume of the real MedBLIP recipes: DAPT and PSD stopped at step k (run.stop_at_step) and resumed
(run.resume=auto) end bit-identical to the uninterrupted run, on 1 rank (python launch/train.py) and 2 ranks
(the deepspeed launcher): parameters, momentum encoders, ITC queues and pointer, optimizer and lr-scheduler
state, EMA teacher, adaptive-weight averages, every RNG stream (the ITM-negative generator per rank included)
and every per-step loss read back from TensorBoard. Tolerance 0 (torch.equal / ==), fp32 on the CPU.

The tiny model keeps dropout (text 0.1) and adds ViT stochastic depth; augmentation, 2 data workers per rank,
gradient accumulation 2, an epoch boundary after the resume and held-out evaluation each epoch are all on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from corpora.phantoms import PhantomSpec, write_caption_shards
from framework.checkpoint import find_resume_tag, safe_load
from tests.conftest import ROOT, run_entry

BATCH, ACCUM, QUEUE = 4, 2, 40  # QUEUE: a multiple of the global batch for 1 and 2 ranks (4, 8)
TRAIN_SAMPLES = 32  # 4 shards of 8: 2 shards per rank, one per data worker when 2 ranks run
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")
TIMING_TAGS = ("perf/", "mem/")  # wall-clock figures: the only scalars allowed to differ


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Phantom caption shards (train: 32 samples in 4 shards; val: 8 samples in 2 shards), written once."""
    root = tmp_path_factory.mktemp("phantom_shards")
    write_caption_shards(root / "train", PhantomSpec(image_size=32, samples_per_shard=8), "train", TRAIN_SAMPLES)
    write_caption_shards(root / "val", PhantomSpec(image_size=32, samples_per_shard=4), "val", 8)
    return root / "train", root / "val"


def overrides(run_dir: Path, shards: tuple[Path, Path], max_steps: int) -> list[str]:
    train, val = shards
    return [f"run.dir={run_dir}", f"data.train={train}", f"data.val={val}", "run.init_from=null",
            "model.preset=tiny", "image.size=32", f"model.queue_size={QUEUE}", "model.embed_dim=16",
            "model.grad_checkpointing_vit=false", "model.vit.drop_path=0.1",  # tiny keeps text dropout 0.1
            f"data.batch_size={BATCH}", "data.num_workers=2", "data.shuffle_buffer=16",
            f"train.grad_accum={ACCUM}", "train.precision=fp32", "train.lr=1e-3", "train.warmup_steps=2",
            "train.epochs=null", f"train.max_steps={max_steps}", "run.log_every=1", "run.keep_last=2",
            "validation.captions=1", "validation.caption_beams=1"]


def train(recipe: str, args: list[str], ranks: int) -> str:
    proc = run_entry("train.py", "--recipe", str(ROOT / "recipes" / "medblip" / recipe), *args, ranks=ranks,
                     timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def final_checkpoint(run_dir: Path, ranks: int) -> tuple[dict, list[dict]]:
    """(the model-states file, [rank_00000.pt, rank_00001.pt, ...]) of the run's latest checkpoint, read safely."""
    ckpt = run_dir / "checkpoints"
    tag_dir = ckpt / find_resume_tag(ckpt)
    return safe_load(tag_dir / "mp_rank_00_model_states.pt"), \
        [safe_load(tag_dir / f"rank_{r:05d}.pt") for r in range(max(ranks, 1))]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run (all its event files, i.e. both processes of a resumed run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]
            if not tag.startswith(TIMING_TAGS)}


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Nested dicts/lists/tuples of tensors and plain values are equal, tensors bit for bit (torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max difference {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# (recipe, ranks, max_steps, stop_at). 1 rank: 4 steps per epoch, stopped mid-epoch (batch 6 of 8), the resumed
# run crosses into epoch 1. 2 ranks: 2 steps per epoch, stopped exactly at the epoch boundary. psd.yaml is dapt.yaml
# with the EMA teacher and adaptive weights on: its 2-rank case covers every state DAPT has and those two, on two
# ranks; DAPT's own path (no distillation wrapper) runs on one rank. (All four pairs took 141 s of the suite's
# 1,157; these two, 71 s.)
CASES = [
    pytest.param("dapt.yaml", 0, 6, 3, marks=pytest.mark.slow, id="dapt-1rank"),
    pytest.param("psd.yaml", 2, 4, 2, marks=pytest.mark.slow, id="psd-2ranks"),
]


@pytest.mark.parametrize("recipe,ranks,max_steps,stop_at", CASES)
def test_stopped_and_resumed_run_is_identical(shards, tmp_path, recipe, ranks, max_steps, stop_at):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(recipe, overrides(full, shards, max_steps), ranks)
    first = train(recipe, [*overrides(cut, shards, max_steps), f"run.stop_at_step={stop_at}"], ranks)
    assert f"preempted at step {stop_at}" in first
    assert find_resume_tag(cut / "checkpoints") == f"step_{stop_at:08d}"
    second = train(recipe, overrides(cut, shards, max_steps), ranks)
    assert f"resumed from {cut / 'checkpoints' / f'step_{stop_at:08d}'}: step {stop_at}" in second

    (a, a_ranks), (b, b_ranks) = final_checkpoint(full, ranks), final_checkpoint(cut, ranks)
    world = max(ranks, 1)
    assert a["position"] == b["position"] and a["position"]["step"] == max_steps
    # every parameter and buffer, named groups first so a failure says which state broke
    module = a["module"]
    momentum = [k for k in module if any(p in k for p in MOMENTUM_PREFIXES)]
    queues = [k for k in module if k.rsplit(".", 1)[-1] in QUEUE_KEYS]
    assert len(momentum) > 20 and len(queues) == 3
    for k in momentum + queues:
        assert_identical(module[k], b["module"][k], k)
    assert_identical(module, b["module"], "module")
    # the queue pointer moved by the global batch at every training micro-batch, modulo the queue size
    ptr = next(k for k in queues if k.endswith("queue_ptr"))
    assert int(module[ptr]) == max_steps * ACCUM * BATCH * world % QUEUE != 0
    assert_identical(a["optimizer"], b["optimizer"], "optimizer")
    assert_identical(a["lr_scheduler"], b["lr_scheduler"], "lr_scheduler")
    assert_identical(a["plugins"], b["plugins"], "plugins")  # EMA teacher and adaptive weights (PSD)
    assert a["skipped_samples"] == b["skipped_samples"] == 0

    # per rank: torch/Python/NumPy RNG streams and the ITM-negative generator (with the marker of the last momentum
    # update: taken at the first forward of the last step, when max_steps - 1 steps were done)
    for r in range(world):
        assert_identical(a_ranks[r], b_ranks[r], f"rank_{r}")
        assert a_ranks[r]["plugins"]["medblip_momentum"]["momentum_updated_at"] == max_steps - 1
    if world == 2:  # each rank draws its own negatives: rank 1's generator is not rank 0's
        assert not torch.equal(a_ranks[0]["plugins"]["medblip_momentum"]["itm_rng"],
                               a_ranks[1]["plugins"]["medblip_momentum"]["itm_rng"])

    if recipe == "psd.yaml":  # the distillation state is real, not defaults that would match trivially
        ema, weights = a["plugins"]["ema_teacher"], a["plugins"]["adaptive_loss_weights"]
        assert ema["tau"] == pytest.approx(0.995)  # psd.yaml's tau_end: the last update ran at step max_steps
        student = {k.removeprefix("student."): v for k, v in module.items()}
        key = "text_encoder.encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(ema["teacher"][key], student[key])
        assert set(weights["r_hat"]) == {"itc", "itm", "lm"} and all(v != 1.0 for v in weights["r_hat"].values())

    # every logged scalar of every step: losses, weights, lr, temperature, evaluation
    logged_a, logged_b = scalars(full), scalars(cut)
    assert sorted(logged_a) == sorted(logged_b)
    for name in ("itc", "itm", "lm", "total"):
        assert [s for s, _ in logged_a[f"loss/{name}"]] == list(range(1, max_steps + 1))
    if recipe == "psd.yaml":
        assert "teacher_loss/itm" in logged_a and "distill_weight/lm" in logged_a
    assert "eval/loss_itc" in logged_a
    for tag in logged_a:
        assert logged_a[tag] == logged_b[tag], (tag, logged_a[tag], logged_b[tag])
