"""DeepSpeed's real fp16 engine through launch/train.py on the CPU (emulated fp16): ZeRO 0/1/2 move the weights as
fp32 does, an overflow halves the scale and skips the step on every rank, clipping acts on the true gradient norm,
and the loss scale and skipped steps reach TensorBoard."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework.checkpoint import find_resume_tag
from tests.conftest import ROOT, run_entry

TOY = str(ROOT / "recipes" / "toy" / "toy.yaml")
# One step from the same seed; a loss weight of 1e-5 makes the gradients small (~1e-6), as a large model's are:
# unscaled they are subnormal in fp16 and below AdamW's epsilon once divided by the scale. 2^8 does not overflow.
ONE_STEP = ("model.dataset_size=64", "train.epochs=null", "train.max_steps=1", "train.grad_accum=1",
            "train.warmup_steps=0", "train.weight_decay=0", "objectives.mse.weight=1e-5", "run.save_every=0",
            "train.clip_grad=1e9")  # clipping on (the norm is reported), never engaged
SCALE_2_8 = "deepspeed.fp16.initial_scale_power=8"


def train(run_dir: Path, *overrides: str, ranks: int = 0) -> str:
    proc = run_entry("train.py", "--recipe", TOY, f"run.dir={run_dir}", *overrides, ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints"
    state = torch.load(ckpt / find_resume_tag(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def read_scalars(run_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def update_ratio(run: dict, reference: dict, start: dict) -> tuple[float, float]:
    """|run - start| / |reference - start| over all weights, and the cosine between the two updates."""
    a = torch.cat([(run[k] - start[k]).flatten() for k in start])
    b = torch.cat([(reference[k] - start[k]).flatten() for k in start])
    return float(a.norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def fp32_step(tmp_path_factory) -> tuple[dict, dict, dict]:
    """The start (lr 0), one fp32 step from it, and that step's TensorBoard scalars."""
    root = tmp_path_factory.mktemp("fp32")
    train(root / "start", *ONE_STEP, "train.precision=fp32", "train.lr=0", "train.warmup_lr=0")
    train(root / "step", *ONE_STEP, "train.precision=fp32")
    return weights(root / "start"), weights(root / "step"), read_scalars(root / "step")


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_one_fp16_step_moves_the_weights_as_fp32_does(tmp_path, fp32_step, zero):
    start, reference, ref_scalars = fp32_step
    out = train(tmp_path, *ONE_STEP, "train.precision=fp16", SCALE_2_8, f"deepspeed.zero_optimization.stage={zero}")
    assert "fp16 on the CPU is emulated" in out
    ratio, cosine = update_ratio(weights(tmp_path), reference, start)
    assert 0.8 < ratio < 1.25 and cosine > 0.95, (zero, ratio, cosine)
    scalars = read_scalars(tmp_path)
    # DeepSpeed's reported norm is the true (unscaled) one, as fp32's
    norm, ref_norm = scalars["train/grad_norm"][0][1], ref_scalars["train/grad_norm"][0][1]
    assert norm == pytest.approx(ref_norm, rel=0.05), (zero, norm, ref_norm)
    assert scalars["fp16/loss_scale"] == [(1, 256.0)] and scalars["fp16/skipped_steps"] == [(1, 0.0)]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_clipping_engages_at_the_true_gradient_norm(tmp_path, fp32_step, zero):
    """clip_grad at a hundredth of the true norm brings the gradients near AdamW's epsilon, so the clipped step is
    shorter: fp16 takes fp32's clipped step (a clip that compared the scaled, or the scale-divided, norm with
    clip_grad would clip far too much, or never)."""
    start, unclipped, ref_scalars = fp32_step
    clip = f"train.clip_grad={ref_scalars['train/grad_norm'][0][1] / 100:.3g}"
    train(tmp_path / "fp32", *ONE_STEP, "train.precision=fp32", clip)
    train(tmp_path / "fp16", *ONE_STEP, "train.precision=fp16", SCALE_2_8, clip,
          f"deepspeed.zero_optimization.stage={zero}")
    clipped = weights(tmp_path / "fp32")
    ratio, cosine = update_ratio(weights(tmp_path / "fp16"), clipped, start)
    assert 0.8 < ratio < 1.25 and cosine > 0.95, (zero, ratio, cosine)
    shorter, _ = update_ratio(clipped, unclipped, start)
    assert shorter < 0.7, shorter  # sanity: the clip changes this step


OVERFLOW_CASES = [(0, 0), (0, 2), pytest.param(2, 0, marks=pytest.mark.slow), pytest.param(2, 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("ranks,zero", OVERFLOW_CASES)
def test_an_overflow_halves_the_scale_and_skips_the_step_on_every_rank(tmp_path, ranks, zero):
    """The second forward's loss is NaN on the last rank only: every rank skips step 2 (with 2 ranks, rank 0's own
    gradients were finite) and halves the scale; TensorBoard (rank 0) shows both. hysteresis=1: ZeRO's scaler
    halves at the first overflow (DeepSpeed's default 2 halves at the second; ZeRO 0's scaler has none)."""
    last = max(ranks, 1) - 1
    overrides = ("model.dataset_size=64", "train.epochs=null", "train.max_steps=3", "train.grad_accum=1",
                 "run.save_every=0", "train.precision=fp16", SCALE_2_8, "deepspeed.fp16.hysteresis=1",
                 f"deepspeed.zero_optimization.stage={zero}", "model.nan_at=2", f"model.nan_rank={last}")
    out = train(tmp_path, *overrides, ranks=ranks)
    assert "step 2: non-finite loss in mse; step skipped by the loss scaler" in out or ranks, out[-2000:]
    scalars = read_scalars(tmp_path)
    assert scalars["fp16/loss_scale"] == [(1, 256.0), (2, 128.0), (3, 128.0)]
    assert scalars["fp16/skipped_steps"] == [(1, 0.0), (2, 1.0), (3, 1.0)]
