"""MedBLIP under real DeepSpeed on the CPU (one in-process gloo rank): fp32/bf16, ZeRO 0/2, activation checkpointing."""
from __future__ import annotations

import pytest
import torch

from framework.build import build_deepspeed
from framework.run_env import resolve_precision, run_env
from framework.config import config_from_dict
from framework.distributed import DistInfo
from framework.progress import Progress
from recipes.medblip import pretrain
from recipes.medblip.model.weights import load_pretrained
from tests.test_medblip_model import CAPTIONS

STEPS = 6


def make_cfg(precision: str, zero: int):
    return config_from_dict({
        "recipe": "recipes.medblip.pretrain",
        "train": {"max_steps": STEPS, "lr": 5e-3, "weight_decay": 0.02, "precision": precision, "seed": 0},
        "data": {"batch_size": 4},
        "model": {"preset": "tiny", "queue_size": 4, "embed_dim": 16, "alpha": 0.0, "grad_checkpointing_vit": True,
                  "grad_checkpointing_text": True},
        "image": {"size": 32},
        "deepspeed": {"zero_optimization": {"stage": zero}},
    })


@pytest.mark.parametrize("precision,zero", [
    ("fp32", 0),  # the fast set; both precisions and both stages in the full suite
    pytest.param("bf16", 2, marks=pytest.mark.slow), pytest.param("fp32", 2, marks=pytest.mark.slow),
    pytest.param("bf16", 0, marks=pytest.mark.slow)])
def test_deepspeed_training_steps(one_rank, tmp_path, precision, zero):
    cfg = make_cfg(precision, zero)
    task = pretrain.build(cfg, run_env(cfg, DistInfo(0, 1, 0, torch.device("cpu"))))
    model = task.model
    assert model.visual_encoder.grad_checkpointing
    assert model.text_encoder.encoder.layer[0].gradient_checkpointing
    prec = resolve_precision(precision, torch.device("cpu"))
    engine = build_deepspeed(cfg, task, prec, STEPS, 1)
    for m in model.fp32_modules():  # what framework.engine does after deepspeed.initialize
        m.float()
    (plugin,) = task.plugins
    progress = Progress()
    plugin.setup(engine.module, prec.dtype, torch.device("cpu"), progress)
    assert model.visual_encoder.cls_token.dtype == prec.dtype and model.text_encoder_m.dtype == torch.float32

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), **model.tokenize(CAPTIONS)}
    momentum_before = model.text_encoder_m.encoder.layer[0].crossattention.self.query.weight.clone()
    emb_before = model.text_encoder.embeddings.word_embeddings.weight.detach().float().clone()
    history = []
    for step in range(1, STEPS + 1):
        out = engine(batch)
        assert set(out["losses"]) == {"itc", "itm", "lm"}
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["losses"].values())
        loss = sum(out["losses"].values())
        engine.backward(loss)
        for m in model.fp32_modules():
            assert all(p.grad is None for p in m.parameters())
        engine.step()
        progress.step = step  # what the Trainer does after the optimizer step
        plugin.after_optimizer_step(step)
        history.append({k: float(v) for k, v in out["losses"].items()})

    total = [sum(h.values()) for h in history]
    assert total[-1] < total[0], history
    assert history[-1]["lm"] < history[0]["lm"] - 0.3 and history[-1]["itc"] < history[0]["itc"], history
    # (ITM starts at its prior, -(1/3)log(1/3)-(2/3)log(2/3) = 0.64, and moves little in 6 steps)
    # momentum encoders stayed fp32 and moved; the queue is fp32 and was written
    moved = model.text_encoder_m.encoder.layer[0].crossattention.self.query.weight
    assert moved.dtype == torch.float32 and (moved - momentum_before).abs().max() > 1e-5
    assert model.image_queue.dtype == torch.float32 and int(model.queue_ptr) == 0
    # shared weights are still shared after DeepSpeed's flattening and the optimizer steps
    dec = model.text_decoder.bert.encoder.layer[1]
    assert dec.crossattention.self.value.weight is model.text_encoder.encoder.layer[1].crossattention.self.value.weight
    assert dec.output.dense.weight is model.text_encoder.encoder.layer[1].output.dense.weight
    # BLIP HEAD: one Parameter serves as encoder and decoder word embeddings and LM head, and it trained
    emb = model.text_encoder.embeddings.word_embeddings.weight
    assert model.text_decoder.cls.predictions.decoder.weight is emb
    assert model.text_decoder.bert.embeddings.word_embeddings.weight is emb
    assert not torch.equal(emb.detach().float(), emb_before)

    if (precision, zero) == ("bf16", 2):  # a DeepSpeed checkpoint of ours loads back (the DAPT -> PSD/VQA path)
        engine.save_checkpoint(str(tmp_path / "checkpoints"), tag="step_00000006")
        (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").write_text("6\n")
        (tmp_path / "checkpoints" / "latest").write_text("step_00000006")
        fresh = pretrain.build_model(make_cfg("fp32", 0))
        report = load_pretrained(fresh, tmp_path)  # a run directory: checkpoints/ is looked up
        assert report.layout == "deepspeed" and report.missing == [] and report.unexpected == []
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v.to(fresh.state_dict()[k].dtype)), k
