"""train.compile (framework.compile) and the FLOP count that MFU is computed from (framework.flops)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from framework.compile import check_can_compile, compile_towers
from framework.config import ConfigError
from framework.flops import attention_flops, flop_counter
from framework.gpu import GpuFacts
from recipes.medblip.model.towers import build_vit
from tests.test_medblip_model import tiny_batch, tiny_cfg, tiny_model

GIB = 1024 ** 3


@pytest.mark.parametrize("name,cap,refused", [("Tesla P100-PCIE-16GB", (6, 0), True), ("Tesla V100-SXM2-16GB", (7, 0), True),
                                              ("Tesla T4", (7, 5), False), ("NVIDIA H100 80GB HBM3", (9, 0), False)])
def test_compile_is_refused_in_one_line_where_triton_has_no_kernels(name, cap, refused):
    gpu = GpuFacts(name, cap, 16 * GIB)
    if not refused:
        check_can_compile(gpu)
        return
    with pytest.raises(ConfigError) as e:
        check_can_compile(gpu)
    assert len(str(e.value).splitlines()) == 1 and "train.compile=false" in str(e.value) and f"sm_{gpu.sm}" in str(e.value)


def test_a_model_without_towers_is_refused():
    with pytest.raises(ConfigError, match="names no towers"):
        compile_towers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_towers_equal_eager_within_fp32_noise():
    """One training forward + backward of a tiny MedBLIP (dropout off), eager and with its towers compiled (CPU,
    inductor's C++ code): the same losses and gradients up to fp32 rounding, and the state-dict keys unchanged."""
    eager = tiny_model(seed=3).train()
    for m in eager.modules():  # dropout off: the two runs must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    assert compile_towers(compiled) == list(eager.towers)
    assert list(compiled.state_dict()) == keys  # checkpoints and DeepSpeed see the same names
    batch = tiny_batch(eager, n=4, seed=1)
    results = []
    for model in (eager, compiled):
        model.seed_negatives(11)
        out = model(batch)
        loss = sum(out["losses"].values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert torch.equal(a["reuse"]["itm_neg_image"], b["reuse"]["itm_neg_image"])  # same negatives: same terms
    for name in a["losses"]:
        torch.testing.assert_close(b["losses"][name], a["losses"][name], rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 50
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fused_attention_flops_are_counted_on_the_cpu():
    """torch's FlopCounterMode counts 0 for the CPU's fused SDPA; framework.flops counts 4*B*H*L*S*D forward."""
    b, h, L, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, L, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    with flop_counter() as ours:
        out = F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0  # the gap this closes (if torch adds the formula, this line tells us)
    assert ours.get_total_flops() == attention_flops(b, h, L, L, d)
    with flop_counter() as backward:
        out.sum().backward()
    assert backward.get_total_flops() == 2.5 * attention_flops(b, h, L, L, d)  # flash recomputes the scores


def test_the_vit_count_now_holds_its_attention():
    cfg = tiny_cfg()
    vit = build_vit(cfg).eval()
    image = torch.randn(2, 3, cfg.vit.image_size, cfg.vit.image_size)
    with FlopCounterMode(display=False) as plain:
        vit.forward_features(image)
    with flop_counter() as ours:
        vit.forward_features(image)
    tokens = (cfg.vit.image_size // cfg.vit.patch_size) ** 2 + 1
    heads = cfg.vit.heads
    expected = cfg.vit.depth * attention_flops(2, heads, tokens, tokens, cfg.vit.width // heads)
    assert ours.get_total_flops() - plain.get_total_flops() == expected
