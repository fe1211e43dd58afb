"""Our engine trains MedBLIP step for step as salesforce/BLIP's pretraining loop does (train_pretrain + BLIP_Pretrain).

BLIP's training step is written out below as its blip_pretrain.py / pretrain.py have it: `_momentum_update()` first,
momentum features, ITC against the queues with soft targets, the enqueue, ITM with hard negatives drawn row by row,
LM, `loss_ita + loss_itm + loss_lm`, AdamW over model.parameters(). It runs beside framework.engine.fit (real
DeepSpeed on the CPU, fp32, grad_accum 1, dropout off) from the same initial weights, on the batches the engine
drew, with the ITM-negative stream of the engine's generator; after every optimizer step every parameter, momentum
parameter, queue and the queue pointer must agree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from corpora.phantoms import PhantomSpec, write_caption_shards
from framework.build import build_run
from framework.config import load_config
from framework.distributed import init_distributed
from framework.engine import fit
from framework.run_env import run_env
from recipes.medblip import pretrain
from recipes.medblip.model.blip_reference import blip_forward
from recipes.medblip.model.weights import save_weights
from tests.conftest import ROOT

STEPS, BATCH, QUEUE = 3, 4, 8  # the queue wraps within the run (8 columns, 4 per step)
LR, WEIGHT_DECAY, ALPHA, ALPHA_RAMP, MOMENTUM = 2e-3, 0.05, 0.4, 2, 0.995


def config(run_dir: Path, shards: Path, grad_accum: int = 1, init_from: Path | None = None):
    return load_config(ROOT / "recipes" / "medblip" / "dapt.yaml", [
        f"run.dir={run_dir}", f"data.train={shards}", "data.val=null", f"run.init_from={init_from or 'null'}",
        "run.save_every=0",
        "model.preset=tiny", "image.size=32", "image.augment=false", f"model.queue_size={QUEUE}",
        "model.embed_dim=16", "model.grad_checkpointing_vit=false", "model.text.dropout=0",
        "model.text.attention_dropout=0", "model.vit.drop_path=0", f"model.alpha={ALPHA}",
        f"model.alpha_ramp_steps={ALPHA_RAMP}", f"model.momentum={MOMENTUM}",
        f"data.batch_size={BATCH}", "data.num_workers=0", "data.shuffle_buffer=8",
        f"train.grad_accum={grad_accum}", "train.precision=fp32", f"train.lr={LR}", f"train.min_lr={LR}",
        "train.warmup_steps=0", f"train.weight_decay={WEIGHT_DECAY}", "train.clip_grad=0", "train.epochs=null",
        f"train.max_steps={STEPS}", "run.log_every=1"])


def pretrained_file(cfg, path: Path) -> Path:
    """Weights to start from as DAPT starts from BLIP's model_base.pth: momentum encoders that are not copies of the
    online ones (from a fresh init they are, and BLIP's first update, with the initial weights, changes nothing)."""
    model = pretrain.build_model(cfg, load_weights=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.fp32_modules():
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_weights(model, path)


def zero_key_bias_gradients(model: torch.nn.Module) -> list[float]:
    """Make the gradients of the attention key biases exactly zero, as they are in exact arithmetic; returns the
    largest |gradient| each call zeroed.

    softmax(q.(k_j + b)) = softmax(q.k_j + q.b): the shift q.b is the same for every key j, so it cancels. AdamW's
    first step is lr * g / (|g| + eps): it turns the rounding noise of such a gradient into a step of up to lr,
    different in any two implementations. Zeroed in both runs, what is left to compare is the training itself.
    """
    zeroed: list[float] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the momentum copies
            continue
        if name.endswith("attn.qkv.bias"):  # timm ViT: [query | key | value]
            key = slice(p.shape[0] // 3, 2 * p.shape[0] // 3)
        elif name.endswith("self.key.bias"):  # BERT self- and cross-attention
            key = slice(None)
        else:
            continue

        def hook(g: torch.Tensor, key: slice = key) -> torch.Tensor:
            zeroed.append(float(g[key].abs().max()))
            g = g.clone()
            g[key] = 0
            return g

        p.register_hook(hook)
    return zeroed


class Snapshots:
    """A plugin that keeps a copy of the model's state after every optimizer step."""

    name = "test_snapshots"
    per_rank_state = False

    def __init__(self, model: torch.nn.Module):
        self.model, self.states = model, []

    def setup(self, *args: Any) -> None:
        pass

    def after_optimizer_step(self, step: int) -> dict:
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_with_engine(cfg) -> tuple[dict, torch.Tensor, list[dict], Snapshots]:
    """Our run: (initial state, ITM generator state at the start, per-forward records, per-step snapshots)."""
    env = run_env(cfg, init_distributed())
    task = pretrain.build(cfg, env)
    model = task.model
    snapshots = Snapshots(model)
    task.plugins.append(snapshots)
    forwards: list[dict] = []

    def record(module, args, output):
        batch = args[0]
        forwards.append({"batch": {k: batch[k].clone() for k in ("image", "input_ids", "attention_mask")},
                         "losses": {k: v.detach().clone() for k, v in output["losses"].items()},
                         "reuse": {k: v.clone() for k, v in output["reuse"].items()}})

    model.register_forward_hook(record)
    zero_key_bias_gradients(model)
    run = build_run(cfg, task, env)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = model.itm_generator.get_state()
    result = fit(run)
    assert result.step == STEPS and len(snapshots.states) == STEPS
    return initial, generator, forwards, snapshots


# ----------------------------------------------------------------------------- BLIP's code, written out


# ----------------------------------------------------------------------------- the comparison


def test_engine_follows_blips_training_step_for_step(one_rank, tmp_path):  # noqa: F811
    write_caption_shards(tmp_path / "shards", PhantomSpec(image_size=32, samples_per_shard=8), "train", 16)
    start = pretrained_file(config(tmp_path / "run", tmp_path / "shards"), tmp_path / "start.pth")
    cfg = config(tmp_path / "run", tmp_path / "shards", init_from=start)
    initial, generator_state, forwards, snapshots = train_with_engine(cfg)
    assert len(forwards) == STEPS  # grad_accum 1: one forward per optimizer step

    model = pretrain.build_model(cfg)  # the same initial weights and queues (seeded by train.seed)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    model.train()
    zeroed = zero_key_bias_gradients(model)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)  # pretrain.py's
    generator = torch.Generator()
    generator.set_state(generator_state)
    momentum_names = [k for k in initial if k.split(".")[0].endswith("_m")]
    assert len(momentum_names) > 40

    for i, (record, ours) in enumerate(zip(forwards, snapshots.states)):
        alpha = ALPHA * min(1, i / ALPHA_RAMP)  # train_pretrain's ramp, by iteration
        losses, (neg_images, neg_texts) = blip_forward(model, record["batch"], alpha, MOMENTUM, generator)
        assert torch.equal(neg_images, record["reuse"]["itm_neg_image"]), i  # the very same hard negatives
        assert torch.equal(neg_texts, record["reuse"]["itm_neg_text"]), i
        for name, loss in losses.items():
            torch.testing.assert_close(record["losses"][name], loss.detach(), rtol=0, atol=2e-6,
                                       msg=lambda m: f"step {i + 1}, loss {name}: {m}")
        loss = losses["itc"] + losses["itm"] + losses["lm"]
        optimizer.zero_grad()
        loss.backward()
        largest = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
        assert len(zeroed) == 2 + 3 * 2 and max(zeroed) < 1e-6 * largest, f"step {i + 1}: not rounding noise"
        zeroed.clear()
        optimizer.step()

        theirs = model.state_dict()
        assert ours.keys() == theirs.keys()
        assert int(ours["queue_ptr"]) == int(theirs["queue_ptr"]) == (i + 1) * BATCH % QUEUE
        for k, v in theirs.items():  # parameters, momentum parameters, queues
            torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"after step {i + 1}, {k}: {m}")
        moved = max(float((ours[k] - initial[k]).abs().max()) for k in momentum_names)
        assert moved > 1e-6, "the momentum encoders did not move"


@pytest.mark.slow
def test_one_momentum_update_per_step_at_its_first_micro_batch(one_rank, tmp_path):  # noqa: F811
    """Under gradient accumulation the update runs once per optimizer step, in the step's first forward."""
    write_caption_shards(tmp_path / "shards", PhantomSpec(image_size=32, samples_per_shard=8), "train", 32)
    cfg = config(tmp_path / "run", tmp_path / "shards", grad_accum=2)
    env = run_env(cfg, init_distributed())
    task = pretrain.build(cfg, env)
    model = task.model
    events: list[str] = []
    update = model.momentum_update
    model.momentum_update = lambda *a, **k: (events.append("update"), update(*a, **k))[1]
    model.register_forward_pre_hook(lambda *a: events.append("forward"))
    model.register_forward_hook(lambda *a: events.append("end"))
    steps = Snapshots(model)
    steps.after_optimizer_step = lambda step: events.append(f"step {step}") or {}
    task.plugins.append(steps)
    fit(build_run(cfg, task, env))
    per_step = ["forward", "update", "end", "forward", "end"]
    assert events == [*per_step, "step 1", *per_step, "step 2", *per_step, "step 3"]
