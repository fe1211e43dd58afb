"""The text towers' SDPA attention computes what transformers' written-out (eager) attention computes.

Each check runs one set of weights twice, once as model.text_attention=sdpa and once as eager (the same module
objects, only their class switched), and compares outputs and gradients within 1e-6: the bidirectional encoder with
padded captions, ITM cross-attention to padded image/question states (the padding fix must hold), the causal
decoder with padding, decoding with the key/value cache against the full forward, beam-search generation, and the
whole pretraining step with the shared image key/value projections.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.config import ModelConfig
from recipes.medblip.model.towers import (
    TEXT_ATTENTION,
    SdpaSelfAttention,
    build_text_decoder,
    build_text_encoder,
    set_text_attention,
)

CLS, SEP, PAD, DEC = 101, 102, 0, 30522
VOCAB = 30524
ATOL = 1e-6


def cfg(**kw) -> ModelConfig:
    return ModelConfig(preset="tiny", queue_size=8, embed_dim=16, **kw)


def texts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two captions of different lengths, the shorter one padded: ids and mask [2, 6]."""
    ids = torch.tensor([[CLS, 2000, 2001, 2002, 2003, SEP], [CLS, 2004, 2005, SEP, PAD, PAD]])
    return ids, (ids != PAD).long()


def both(model: torch.nn.Module, run, *, grads: bool = False) -> dict[str, tuple]:
    """run(model) as sdpa and as eager on the same weights: {"sdpa": (output, grads), "eager": (...)}."""
    out = {}
    for kind in ("sdpa", "eager"):
        assert set_text_attention(model, kind) > 0
        assert all(type(m) is TEXT_ATTENTION[kind] for m in model.modules() if isinstance(m, BlipTextSelfAttention))
        model.zero_grad(set_to_none=True)
        result = run(model)
        g = {}
        if grads:  # a fixed random projection (LayerNorm makes sum(out^2) constant: no gradient to compare)
            weights = torch.randn(result.shape, generator=torch.Generator().manual_seed(3))
            (result.float() * weights).sum().backward()
            g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            result = result.detach()
        out[kind] = (result, g)
    return out


def assert_grads_close(ga: dict[str, torch.Tensor], gb: dict[str, torch.Tensor]) -> None:
    """Every gradient within 1e-6 of the other's scale (sums over many tokens: elementwise rtol meets rounding)."""
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        scale = max(1.0, float(gb[name].abs().max()))
        assert float((ga[name] - gb[name]).abs().max()) <= ATOL * scale, name


def assert_same(out: dict[str, tuple]) -> None:
    (a, ga), (b, gb) = out["sdpa"], out["eager"]
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    assert_grads_close(ga, gb)


def test_sdpa_is_the_default_and_eager_the_switch():
    encoder = build_text_encoder(cfg(), VOCAB)
    attentions = [m for m in encoder.modules() if isinstance(m, BlipTextSelfAttention)]
    assert len(attentions) == 2 * 2  # self- and cross-attention, 2 layers
    assert all(type(m) is SdpaSelfAttention for m in attentions)
    eager = build_text_decoder(cfg(text_attention="eager"), VOCAB)
    assert not any(isinstance(m, SdpaSelfAttention) for m in eager.modules())
    assert set(encoder.state_dict()) == set(build_text_encoder(cfg(text_attention="eager"), VOCAB).state_dict())
    with pytest.raises(ValueError, match="text_attention"):
        cfg(text_attention="flash")


def test_encoder_with_padded_text():
    torch.manual_seed(0)
    encoder = build_text_encoder(cfg(), VOCAB).eval()
    ids, mask = texts()
    assert_same(both(encoder, lambda m: m(ids, attention_mask=mask).last_hidden_state, grads=True))


def test_itm_cross_attention_with_padded_states():
    """Padded image/question states + their mask: sdpa = eager, and both = the unpadded states (the mask fix)."""
    torch.manual_seed(0)
    c = cfg()
    encoder = build_text_encoder(c, VOCAB).eval()
    ids, mask = texts()
    states = torch.randn(2, 3, c.vit.width)
    padded = torch.cat([states, 100 * torch.randn(2, 4, c.vit.width)], dim=1)  # junk in the padding
    state_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 2)

    def run(s, m):
        return lambda model: model(ids, attention_mask=mask, encoder_hidden_states=s,
                                   encoder_attention_mask=m).last_hidden_state

    padded_out = both(encoder, run(padded, state_mask), grads=True)
    assert_same(padded_out)
    set_text_attention(encoder, "sdpa")
    with torch.no_grad():
        unpadded = run(states, torch.ones(2, 3, dtype=torch.long))(encoder)
    torch.testing.assert_close(padded_out["sdpa"][0], unpadded, rtol=0, atol=2e-6)


def test_causal_decoder_with_padding():
    torch.manual_seed(0)
    c = cfg()
    decoder = build_text_decoder(c, VOCAB).eval()
    ids, mask = texts()
    ids[:, 0] = DEC
    states = torch.randn(2, 5, c.vit.width)
    out = both(decoder, lambda m: m(ids, attention_mask=mask, encoder_hidden_states=states, use_cache=False).logits,
               grads=True)
    assert_same(out)
    # causal: a token's logits do not depend on later tokens
    later = ids.clone()
    later[0, 3:] = 2010
    with torch.no_grad():
        changed = decoder(later, attention_mask=mask, encoder_hidden_states=states, use_cache=False).logits
    torch.testing.assert_close(changed[0, :3], out["sdpa"][0][0, :3], rtol=0, atol=ATOL)
    assert not torch.allclose(changed[0, 3:], out["sdpa"][0][0, 3:])


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_decoding_with_the_cache_equals_the_full_forward(kind):
    """Token by token with the key/value cache (self and cross) = one forward over the whole sequence."""
    torch.manual_seed(0)
    c = cfg(text_attention=kind)
    decoder = build_text_decoder(c, VOCAB).eval()
    ids = torch.tensor([[DEC, 2000, 2001, 2002, 2003]])
    states = torch.randn(1, 7, c.vit.width)
    state_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        full = decoder(ids, encoder_hidden_states=states, encoder_attention_mask=state_mask, use_cache=False).logits
        cache, steps = None, []
        for i in range(ids.shape[1]):
            out = decoder(ids[:, i:i + 1], attention_mask=torch.ones(1, i + 1, dtype=torch.long), cache=cache,
                          encoder_hidden_states=states, encoder_attention_mask=state_mask, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-6)


def test_beam_search_generation_is_the_same():
    from transformers import GenerationConfig

    torch.manual_seed(0)
    c = cfg()
    decoder = build_text_decoder(c, VOCAB).eval()
    states = torch.randn(2, 6, c.vit.width)
    state_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    config = GenerationConfig(max_length=8, min_length=1, num_beams=3, do_sample=False, eos_token_id=SEP,
                              pad_token_id=PAD, bos_token_id=DEC, use_cache=True)
    start = torch.full((2, 1), DEC)
    out = {}
    for kind in ("sdpa", "eager"):
        set_text_attention(decoder, kind)
        with torch.no_grad():
            out[kind] = decoder.generate(input_ids=start, generation_config=config, encoder_hidden_states=states,
                                         encoder_attention_mask=state_mask, output_scores=True,
                                         return_dict_in_generate=True)
    assert torch.equal(out["sdpa"].sequences, out["eager"].sequences)
    assert out["sdpa"].sequences.shape[1] > 2
    torch.testing.assert_close(out["sdpa"].sequences_scores, out["eager"].sequences_scores, rtol=0, atol=ATOL)


def test_pretraining_step_with_shared_image_kv():
    """ITC + ITM + LM losses and every gradient: sdpa with the shared image K/V = eager without it (BLIP's way)."""
    torch.manual_seed(0)
    c = cfg(text={"dropout": 0.0, "attention_dropout": 0.0})
    ours = MedBlipPretrain(c, seed=0).train()
    assert ours.share_image_kv
    blip = copy.deepcopy(ours)
    blip.share_image_kv = False
    set_text_attention(blip, "eager")
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             **ours.tokenize(["a chest x ray with a small nodule", "ct of the head",
                              "mri of the brain showing a lesion on the left", "abdominal ultrasound"])}
    results = []
    for model in (ours, blip):
        out = model(batch)
        sum(out["losses"].values()).backward()
        results.append(({k: v.detach() for k, v in out["losses"].items()},
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert la.keys() == {"itc", "itm", "lm"}
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=0, atol=ATOL, msg=k)
    assert_grads_close(ga, gb)


def test_attention_dropout_applies_in_training_and_is_seeded():
    """Training mode drops attention weights (outputs move with the seed) and the same seed repeats exactly."""
    c = cfg(text={"dropout": 0.0, "attention_dropout": 0.5})
    torch.manual_seed(0)
    encoder = build_text_encoder(c, VOCAB).train()
    ids, mask = texts()

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return encoder(ids, attention_mask=mask).last_hidden_state

    dropped = run(1)
    assert torch.equal(dropped, run(1))
    assert not torch.allclose(dropped, run(2), atol=1e-3)
    encoder.eval()
    with torch.no_grad():
        plain = encoder(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(dropped, plain, atol=1e-3)
