"""Image-token key/value projections shared across the ITM and LM passes: identical losses and gradients, less work."""
from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.config import ModelConfig
from recipes.medblip.model.shared_kv import SharedKVLinear

CAPTIONS = ["a chest x ray with a small nodule", "ct of the head", "mri of the brain showing a lesion on the left",
            "abdominal ultrasound"]


def pair() -> tuple[MedBlipPretrain, MedBlipPretrain]:
    torch.manual_seed(0)
    shared = MedBlipPretrain(ModelConfig(preset="tiny", queue_size=8, embed_dim=16), seed=0).train()
    plain = copy.deepcopy(shared)
    plain.share_image_kv = False
    assert shared.share_image_kv
    return shared, plain


def step(model: MedBlipPretrain, batch: dict) -> tuple[dict, dict]:
    torch.manual_seed(1)  # the same dropout masks in both models
    out = model(batch)
    sum(out["losses"].values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out["losses"].items()}, grads


def test_shared_projections_give_the_same_losses_and_gradients():
    shared, plain = pair()
    n_kv = sum(isinstance(m, SharedKVLinear) for m in shared.modules())
    assert n_kv == 2 * 2 * 2  # key + value, 2 layers, encoder and decoder (its own modules, shared weights)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             **shared.tokenize(CAPTIONS)}
    losses_s, grads_s = step(shared, batch)
    losses_p, grads_p = step(plain, batch)
    assert losses_s.keys() == losses_p.keys() == {"itc", "itm", "lm"}
    for k in losses_s:
        torch.testing.assert_close(losses_s[k], losses_p[k], rtol=0, atol=1e-6)
    assert grads_s.keys() == grads_p.keys()
    for n in grads_s:
        torch.testing.assert_close(grads_s[n], grads_p[n], rtol=1e-5, atol=1e-6, msg=n)
    # the state dict is untouched: checkpoints and BLIP's key names do not see the change
    assert shared.state_dict().keys() == plain.state_dict().keys()


def test_sharing_removes_three_of_four_image_projections():
    shared, plain = pair()
    b = 4
    batch = {"image": torch.randn(b, 3, 32, 32), **shared.tokenize(CAPTIONS)}
    flops = {}
    for name, model in (("shared", shared), ("plain", plain)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
        flops[name] = counter.get_total_flops()
    cfg = shared.cfg
    tokens = (cfg.vit.image_size // cfg.vit.patch_size) ** 2 + 1
    per_row = 2 * tokens * cfg.vit.width * cfg.text.hidden  # one image's key (or value) projection, one layer
    # the ITM positive (b), negative (2b) and decoder (b) passes project 4b images; shared: b
    saved = (4 * b - b) * per_row * 2 * cfg.text.layers
    assert flops["plain"] - flops["shared"] == saved
