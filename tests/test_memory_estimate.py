"""The MedBLIP activation estimate behind the start-up memory check, and the P100 recipes' printed estimate."""
from __future__ import annotations

import pytest
import torch

from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.config import ModelConfig
from tests.conftest import ROOT, load_launch


def small_model(**kw) -> MedBlipPretrain:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", queue_size=64, embed_dim=16, max_text_len=30,
                      vit=dict(image_size=64, width=64, heads=4, depth=4),
                      text=dict(hidden=64, heads=4, layers=4, intermediate=256), **kw)
    return MedBlipPretrain(cfg, seed=0).train()


def saved_for_backward(model: MedBlipPretrain, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward (what activations cost)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    return sum(storages.values())


@pytest.mark.parametrize("ckpt", [{}, {"grad_checkpointing_vit": True},
                                  {"grad_checkpointing_vit": True, "grad_checkpointing_text": True}])
def test_activation_estimate_bounds_what_autograd_saves(ckpt):
    model = small_model(**ckpt)
    b = 8
    captions = [" ".join(["lesion"] * 40)] * b  # cut at max_text_len: the length the estimate assumes
    batch = {"image": torch.randn(b, 3, 64, 64), **model.tokenize(captions)}
    assert batch["input_ids"].shape[1] == 30
    measured, estimate = saved_for_backward(model, batch), model.activation_bytes(b, "fp32")
    # an upper bound (it must not let a config that does not fit through), and not a wildly loose one
    assert measured <= estimate <= 2 * measured, (measured, estimate)


def test_activation_estimate_scales_with_batch_precision_and_objectives():
    model = small_model()
    assert model.activation_bytes(16, "fp32") == 2 * model.activation_bytes(8, "fp32")
    assert model.activation_bytes(8, "fp16") < model.activation_bytes(8, "fp32")
    assert small_model(grad_checkpointing_vit=True).activation_bytes(8, "fp16") < model.activation_bytes(8, "fp16")
    no_lm = small_model()
    no_lm.objectives = frozenset({"itc", "itm"})
    logits = 8 * 30 * len(model.tokenizer) * (2 + 4)  # the decoder's vocabulary logits, half + fp32 copy
    assert model.activation_bytes(8, "fp16") - no_lm.activation_bytes(8, "fp16") > logits


@pytest.mark.slow
def test_p100_dapt_and_psd_estimates_fit_16gb(capsys):
    """Full-size ViT-B/16 + BERT-base, batch 16, 224 px, momentum encoders (+ EMA teacher for PSD), fp16."""
    main = load_launch("bench/benchmark").main
    totals = {}
    for name in ("dapt", "psd"):
        assert main(["--recipe", str(ROOT / "recipes" / "medblip" / f"{name}.yaml"), "--estimate-only", "fp16"]) == 0
        out = capsys.readouterr().out
        assert "activations" in out and "micro-batch 16" in out, out
        line = next(ln for ln in out.splitlines() if ln.startswith("fits a 16 GB P100"))
        assert line.startswith("fits a 16 GB P100: yes"), out
        totals[name] = float(line.split("(")[1].split()[0])
    assert totals["dapt"] < totals["psd"] < 0.95 * 16e9 / 2 ** 30  # the teacher costs memory, still fits
