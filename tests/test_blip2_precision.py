"""The P100 policy: under fp16 the trainable BLIP-2 parts stay fp32 (LAVIS #267) while the frozen towers are half.

DeepSpeed casts the whole module to half in initialize(); the engine then casts `fp32_modules()` back. This file
checks that trainable fp32 modules inside DeepSpeed's low-precision optimizer train, and exactly as fp32 AdamW.
fp16 needs a GPU, so the CPU test runs DeepSpeed's bf16 mode: with a torch optimizer (the framework passes
torch.optim.AdamW) both modes build the same FP16_UnfusedOptimizer (fp32 master copies, grads copied from each
model parameter, the update copied back into it), which is the part under test; fp16 only adds loss scaling.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.blip2_tiny import captions, images, stage1, with_llm


def test_fp32_modules_are_the_trainable_modules_only_under_fp16():
    model = stage1()
    assert model.fp32_modules() == []  # fp32 / bf16 training: nothing to cast back
    model.keep_trainable_fp32 = True
    mods = model.fp32_modules()
    in_fp32 = {id(p) for m in mods for p in m.parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if id(p) in in_fp32} == trainable  # query_tokens/temp too
    assert not any(id(p) in in_fp32 for p in model.vision_model.encoder.parameters())  # the frozen ViT stays half
    llm = with_llm()
    llm.keep_trainable_fp32 = True
    assert not any(p.requires_grad for m in llm.fp32_modules() for p in m.parameters() if m is llm.language_model)
    assert llm.language_model not in llm.fp32_modules()


@pytest.fixture
def single_rank():
    """An in-process world of one (gloo), as `python launch/train.py` makes it; yields deepspeed."""
    import deepspeed

    from tests.conftest import world_of_one

    for _ in world_of_one():
        yield deepspeed


def _engine(deepspeed, model, comm: str | None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    if comm:
        config["communication_data_type"] = comm
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer"  # the class fp16 uses with a torch optimizer
    for m in model.fp32_modules():  # what framework.engine does right after deepspeed.initialize
        m.float()
    return engine


def _losses(model, pix, ids, mask):
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([2, 3, 0, 1]))  # fixed, so both runs score the same pairs
    return sum(model.stage1_losses(model.image_embeds(pix), ids, mask, negatives=negatives)["losses"].values())


def _setup():
    model = stage1(seed=0).train()
    model.keep_trainable_fp32 = True
    ids, mask = captions(model.tokenizer, ["ct of the head", "mri of the abdomen shows a lesion", "a small lesion",
                                           "yes"])
    return model, images(4), ids, mask


def test_deepspeed_casts_fp32_gradients_to_its_precision_for_the_all_reduce(single_rank):
    """DeepSpeed all-reduces gradients (on one rank too) in communication_data_type, which defaults to fp16/bf16:
    the fp32 Q-Former's gradients come back rounded (and, under fp16, scaled by the loss scale: they can overflow
    to inf, a skipped step). The BLIP-2 recipes set communication_data_type: fp32."""
    model, pix, ids, mask = _setup()
    engine = _engine(single_rank, model, comm=None)
    reference = copy.deepcopy(model)
    engine.backward(_losses(model, pix, ids, mask))
    engine.allreduce_gradients()
    _losses(reference, pix, ids, mask).backward()
    g, r = model.qformer.layernorm.weight.grad, reference.qformer.layernorm.weight.grad
    assert g.dtype == torch.float32 and not torch.equal(g, r)
    assert torch.equal(g, r.to(torch.bfloat16).float())  # exactly the rounding of the all-reduce's cast


def test_deepspeed_low_precision_optimizer_trains_fp32_modules_as_fp32_adamw(single_rank):
    """With communication_data_type fp32, the fp32 trainable modules inside DeepSpeed's low-precision optimizer
    train exactly as plain fp32 AdamW (from their once-rounded start, after DeepSpeed's zero-gradient initial
    step), and the half frozen tower never moves."""
    model, pix, ids, mask = _setup()
    engine = _engine(single_rank, model, comm="fp32")
    assert model.qformer.layernorm.weight.dtype == torch.float32 and model.query_tokens.dtype == torch.float32
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    reference = copy.deepcopy(model)  # the same start, trained by torch's AdamW on the same (mixed-dtype) graph
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0)
    # DeepSpeed's low-precision optimizers initialise their state with one step on zero gradients
    # (FP16_UnfusedOptimizer.initialize_optimizer_states): Adam's step count is one ahead, so the first real update
    # is sqrt(1 + b2) / (1 + b1) ~ 0.74 of plain AdamW's. (With weight decay that step also decays the fp32 master
    # once, which the model only sees at the first copy-back; so this comparison runs without decay.)
    for p in ref_params:
        p.grad = torch.zeros_like(p)
    ref_opt.step()
    frozen_before = model.vision_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
    start = model.qformer.encoder.layer[0].crossattention.attention.query.weight.detach().clone()
    for _ in range(3):
        loss = _losses(model, pix, ids, mask)
        engine.backward(loss)
        engine.step()
        ref_loss = _losses(reference, pix, ids, mask)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    trained = model.qformer.encoder.layer[0].crossattention.attention.query.weight
    assert trained.dtype == torch.float32 and not torch.equal(trained, start)  # it moved, in fp32
    for (n, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-5, msg=n)
    assert torch.equal(model.vision_model.encoder.layers[0].mlp.fc1.weight, frozen_before)
