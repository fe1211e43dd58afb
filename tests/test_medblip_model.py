"""MedBLIP pretraining model: BLIP's ITC / ITM / LM behaviour pinned on a tiny model against hand computations."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from framework.progress import Progress
from recipes.common.tokenizer import TokenizerNotFound, load_tokenizer
from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.config import ModelConfig
from recipes.medblip.model.losses import (
    OBJECTIVES,
    itc_loss,
    itc_targets,
    itm_labels,
    lm_loss,
    lm_targets,
    sample_itm_negatives,
)
from recipes.medblip.model.towers import (
    build_text_decoder,
    build_text_encoder,
    build_vit,
    lm_head_is_tied,
    tie_text_towers,
)
from recipes.medblip.pretrain.momentum import MomentumUpdate
from tests.conftest import ROOT

CAPTIONS = ["a chest x ray with a small nodule", "ct of the head", "mri of the brain showing a lesion on the left",
            "abdominal ultrasound"]
CLS, SEP, PAD, DEC, ENC = 101, 102, 0, 30522, 30523


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(preset="tiny", queue_size=8, embed_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(objectives=("itc", "itm", "lm"), seed: int = 0, **kw) -> MedBlipPretrain:
    torch.manual_seed(seed)
    return MedBlipPretrain(tiny_cfg(**kw), objectives, seed=seed)


def tiny_batch(model: MedBlipPretrain, n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.vit.image_size
    return {"image": torch.randn(n, 3, size, size, generator=g), **model.tokenize(CAPTIONS[:n])}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_blips():
    tok = load_tokenizer()
    assert len(tok) == 30524
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == DEC
    assert tok.enc_token_id == ENC and tok.pad_token_id == PAD
    ids = tok(["ct [ENC] scan"])["input_ids"][0]
    assert ids[0] == CLS and ids[-1] == SEP and ENC in ids  # [ENC] is one special token
    assert tok.convert_ids_to_tokens(tok("Chest X-Ray")["input_ids"]) == ["[CLS]", "chest", "x", "-", "ray", "[SEP]"]


def test_tokenizer_saved_dir_round_trip_and_missing(tmp_path):
    load_tokenizer().save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert len(again) == 30524 and again.enc_token_id == ENC and again.bos_token_id == DEC
    with pytest.raises(TokenizerNotFound, match="bundled"):
        load_tokenizer(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- towers


def test_vit_has_blip_key_names_and_eps():
    vit = build_vit(tiny_cfg())
    keys = set(vit.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "norm.weight"} <= keys
    assert not any(k.startswith(("head", "fc_norm")) for k in keys)
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
    assert vit.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 32)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_cross_attention_mask_fix(which):
    """Padded image/question states + their mask give exactly the unpadded result (transformers drops the mask)."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = (build_text_encoder if which == "encoder" else build_text_decoder)(cfg, 30524).eval()
    ids = torch.tensor([[CLS, 2000, 2001, 2002, SEP]])
    states = torch.randn(1, 3, cfg.vit.width)
    padded = torch.cat([states, 100 * torch.randn(1, 4, cfg.vit.width)], dim=1)  # junk in the padding
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]])

    def run(s, m):
        out = model(ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=s, encoder_attention_mask=m,
                    **({} if which == "encoder" else {"use_cache": False}))
        return out.last_hidden_state if which == "encoder" else out.logits

    torch.testing.assert_close(run(padded, mask), run(states, torch.ones(1, 3, dtype=torch.long)),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("lm_head", [True, False])
def test_decoder_shares_all_but_self_attention(lm_head):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    enc, dec = build_text_encoder(cfg, 30524), build_text_decoder(cfg, 30524)
    enc_before = {n: p for n, p in enc.named_parameters()}
    dec_before = {n: p for n, p in dec.bert.named_parameters()}
    head_before = dec.cls.predictions.decoder.weight
    tie_text_towers(enc, dec, lm_head=lm_head)
    enc_params = {n: p for n, p in enc.named_parameters()}
    for name, p in dec.bert.named_parameters():
        shared = p is enc_params[name]
        is_self_attention = ".attention." in name
        assert shared != is_self_attention, name
        if shared:  # BLIP HEAD: the encoder takes the decoder's tensors; its first commit: the other way round
            assert p is (dec_before[name] if lm_head else enc_before[name]), name
    assert enc_params["encoder.layer.0.crossattention.self.key.weight"] is \
        dec.bert.encoder.layer[0].crossattention.self.key.weight
    head, emb = dec.cls.predictions.decoder.weight, enc.embeddings.word_embeddings.weight
    assert head is head_before  # the LM head keeps the decoder's tensor either way
    if lm_head:  # BLIP HEAD: encoder embeddings = decoder embeddings = LM head, one Parameter
        assert head is emb and dec.bert.embeddings.word_embeddings.weight is emb and lm_head_is_tied(dec)
    else:  # BLIP's first commit: the decoder's embeddings are replaced by the encoder's; the head stays its own
        assert head is not emb and dec.bert.embeddings.word_embeddings.weight is emb and not lm_head_is_tied(dec)
    assert dec.cls.predictions.decoder.bias is dec.cls.predictions.bias
    assert dec.config.label_smoothing == 0.1 and dec.config.layer_norm_eps == 1e-12
    assert dec.config.hidden_dropout_prob == 0.1 and dec.config.attention_probs_dropout_prob == 0.1


# ----------------------------------------------------------------------------- objectives (pure functions)


def test_itm_labels():
    assert itm_labels(3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_itm_negatives_never_positive_and_follow_blip_weights():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[9.0, 1.0, 0.0, 2.0], [0.5, 9.0, 0.5, 0.0], [3.0, 0.0, 9.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    counts_img, counts_txt = torch.zeros(4, 4), torch.zeros(4, 4)
    n = 4000
    for _ in range(n):
        neg_img, neg_txt = sample_itm_negatives(sim, sim.t(), g)
        counts_img[torch.arange(4), neg_img] += 1
        counts_txt[torch.arange(4), neg_txt] += 1
    assert counts_img.diagonal().sum() == 0 and counts_txt.diagonal().sum() == 0  # never the positive
    for sims, counts in ((sim.t(), counts_img), (sim, counts_txt)):  # BLIP: softmax + 1e-4, diagonal zeroed
        w = F.softmax(sims, dim=1) + 1e-4
        w.fill_diagonal_(0)
        expected = w / w.sum(1, keepdim=True)
        assert (counts / n - expected).abs().max() < 0.03
    with pytest.raises(ValueError, match="at least 2"):
        sample_itm_negatives(sim[:1, :1], sim[:1, :1], g)


def test_itc_targets_alpha_zero_and_positive():
    sim_m = torch.randn(3, 3 + 5)
    hard, hard2 = itc_targets(sim_m, sim_m, 0.0)
    expected = torch.zeros(3, 8)
    expected[torch.arange(3), torch.arange(3)] = 1
    assert torch.equal(hard, expected) and torch.equal(hard2, expected)
    soft, _ = itc_targets(sim_m, sim_m, 0.4)
    torch.testing.assert_close(soft, 0.4 * sim_m.softmax(1) + 0.6 * expected)
    assert torch.allclose(soft.sum(1), torch.ones(3))
    # with one-hot targets the loss is the mean of the two cross-entropies against the diagonal
    s1, s2 = torch.randn(3, 8), torch.randn(3, 8)
    ref = (F.cross_entropy(s1, torch.arange(3)) + F.cross_entropy(s2, torch.arange(3))) / 2
    torch.testing.assert_close(itc_loss(s1, s2, hard, hard2), ref)


def test_lm_loss_ignores_padding_and_smooths_labels():
    v, eps = 7, 0.1
    logits = torch.randn(2, 4, v)
    labels = torch.tensor([[DEC % v, 3, 5, 1], [0, 2, -100, -100]])
    loss = lm_loss(logits, labels, eps)
    # by hand: positions t predict labels[:, t+1]; each CE = (1-eps)*nll + eps*mean_j(-log p_j)
    terms = []
    for b, t in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        logp = logits[b, t].log_softmax(-1)
        y = labels[b, t + 1]
        terms.append((1 - eps) * -logp[y] + eps * -logp.mean())
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    changed = logits.clone()
    changed[1, 1:] = 1e3 * torch.randn(3, v)  # positions whose targets are padding
    torch.testing.assert_close(lm_loss(changed, labels, eps), loss)
    assert lm_targets(torch.tensor([[DEC, 5, PAD]]), PAD).tolist() == [[DEC, 5, -100]]


def test_lm_loss_equals_transformers_decoder_loss():
    torch.manual_seed(0)
    dec = build_text_decoder(tiny_cfg(), 30524).eval()
    ids = torch.tensor([[DEC, 2000, 2001, SEP, PAD], [DEC, 2002, SEP, PAD, PAD]])
    att = (ids != PAD).long()
    states = torch.randn(2, 5, 32)
    labels = lm_targets(ids, PAD)
    out = dec(ids, attention_mask=att, encoder_hidden_states=states, labels=labels, use_cache=False)
    torch.testing.assert_close(lm_loss(out.logits, labels, 0.1), out.loss, rtol=0, atol=1e-6)


def test_objective_names():
    """The pretraining recipe declares its objectives; another name fails when the recipe is read, listing them."""
    from framework.config import ConfigError, load_config

    assert set(OBJECTIVES) == {"itc", "itm", "lm"}
    with pytest.raises(ConfigError, match=r"objectives.mlm: unknown objective \(known: itc, itm, lm\)"):
        load_config(ROOT / "recipes" / "medblip" / "dapt.yaml", ["objectives.mlm.weight=1"])


# ----------------------------------------------------------------------------- the model


def blip_reference(model: MedBlipPretrain, batch: dict, neg_image, neg_text) -> dict:
    """BLIP_Pretrain.forward written out as in salesforce/BLIP (row loops, no enqueue), eval mode."""
    image, ids, att = batch["image"], batch["input_ids"], batch["attention_mask"]
    bs, temp, alpha = ids.shape[0], model.temp.clamp(0.001, 0.5), model.cfg.alpha
    image_embeds = model.visual_encoder.forward_features(image)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_out = model.text_encoder(ids, attention_mask=att)
    text_feat = F.normalize(model.text_proj(text_out.last_hidden_state[:, 0, :]), dim=-1)
    image_feat_m = F.normalize(model.vision_proj_m(model.visual_encoder_m.forward_features(image)[:, 0, :]), dim=-1)
    image_feat_all = torch.cat([image_feat_m.t(), model.image_queue.clone()], dim=1)
    text_feat_m = F.normalize(model.text_proj_m(model.text_encoder_m(ids, attention_mask=att)
                                                .last_hidden_state[:, 0, :]), dim=-1)
    text_feat_all = torch.cat([text_feat_m.t(), model.text_queue.clone()], dim=1)
    sim_i2t_m, sim_t2i_m = image_feat_m @ text_feat_all / temp, text_feat_m @ image_feat_all / temp
    sim_targets = torch.zeros(sim_i2t_m.size())
    sim_targets.fill_diagonal_(1)
    t_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
    t_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t, sim_t2i = image_feat @ text_feat_all / temp, text_feat @ image_feat_all / temp
    loss_ita = (-torch.sum(F.log_softmax(sim_i2t, dim=1) * t_i2t, dim=1).mean()
                - torch.sum(F.log_softmax(sim_t2i, dim=1) * t_t2i, dim=1).mean()) / 2
    enc_ids = ids.clone()
    enc_ids[:, 0] = model.enc_token_id
    out_pos = model.text_encoder(enc_ids, attention_mask=att, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long))
    image_embeds_neg = torch.stack([image_embeds[neg_image[b]] for b in range(bs)])
    text_ids_neg = torch.stack([enc_ids[neg_text[b]] for b in range(bs)])
    text_atts_neg = torch.stack([att[neg_text[b]] for b in range(bs)])
    out_neg = model.text_encoder(torch.cat([enc_ids, text_ids_neg]), attention_mask=torch.cat([att, text_atts_neg]),
                                 encoder_hidden_states=torch.cat([image_embeds_neg, image_embeds]))
    vl = model.itm_head(torch.cat([out_pos.last_hidden_state[:, 0, :], out_neg.last_hidden_state[:, 0, :]]))
    loss_itm = F.cross_entropy(vl, torch.cat([torch.ones(bs), torch.zeros(2 * bs)]).long())
    dec_ids = ids.clone()
    dec_ids[:, 0] = model.bos_token_id
    targets = dec_ids.masked_fill(dec_ids == model.pad_token_id, -100)
    loss_lm = model.text_decoder(dec_ids, attention_mask=att, encoder_hidden_states=image_embeds, labels=targets,
                                 use_cache=False).loss
    return {"itc": loss_ita, "itm": loss_itm, "lm": loss_lm}


def test_forward_matches_blip_reference():
    model = tiny_model(alpha=0.4).eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        first = model(batch)
        neg = first["reuse"]
        ref = blip_reference(model, batch, neg["itm_neg_image"], neg["itm_neg_text"])
        again = model(batch, reuse=neg)
    for name in ("itc", "itm", "lm"):
        torch.testing.assert_close(first["losses"][name], ref[name], rtol=0, atol=2e-6)
        assert torch.equal(again["losses"][name], first["losses"][name])
    ni, nt = neg["itm_neg_image"], neg["itm_neg_text"]
    assert (ni != torch.arange(4)).all() and (nt != torch.arange(4)).all()


def test_token_placement():
    """Unimodal passes start with [CLS], ITM passes with [ENC], the decoder with [DEC]; the rest is unchanged."""
    model = tiny_model().train()
    batch = tiny_batch(model)
    seen = {"text_encoder": [], "text_encoder_m": [], "text_decoder": []}
    for name in seen:
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen[name].append(args[0].clone()), with_kwargs=True)
    out = model(batch)
    ids = batch["input_ids"]
    unimodal, itm_pos, itm_neg = seen["text_encoder"]
    assert torch.equal(unimodal, ids) and (ids[:, 0] == CLS).all()
    assert torch.equal(seen["text_encoder_m"][0], ids)
    assert (itm_pos[:, 0] == ENC).all() and torch.equal(itm_pos[:, 1:], ids[:, 1:])
    assert itm_neg.shape[0] == 8 and (itm_neg[:, 0] == ENC).all()
    assert torch.equal(itm_neg[4:, 1:], ids[out["reuse"]["itm_neg_text"], 1:])  # negative texts, drawn per image
    (dec,) = seen["text_decoder"]
    assert (dec[:, 0] == DEC).all() and torch.equal(dec[:, 1:], ids[:, 1:])


def test_queue_pointer_wraps_and_eval_leaves_queue():
    model = tiny_model(queue_size=8).train()
    batch = tiny_batch(model)
    ptrs = []
    for _ in range(3):
        out = model(batch, return_logits=True)
        ptrs.append(int(model.queue_ptr))
    assert ptrs == [4, 0, 4]
    with torch.no_grad():
        image_feat_m, text_feat_m = model._momentum_features(batch["image"], batch["input_ids"],
                                                             batch["attention_mask"])
    assert out["logits"]["itc"]["i2t"].shape == (4, 4 + 8)
    model.eval()
    before = model.image_queue.clone()
    model(batch)
    assert torch.equal(model.image_queue, before) and int(model.queue_ptr) == 4
    # the last write (train mode, dropout on) put 4 unit-norm columns at [0, 4)
    assert torch.allclose(model.image_queue[:, :4].norm(dim=0), torch.ones(4), atol=1e-5)
    assert image_feat_m.shape == (4, 16) and text_feat_m.shape == (4, 16)


def test_queue_must_take_whole_batches():
    model = tiny_model(queue_size=6).train()
    with pytest.raises(ValueError, match="queue_size=6 is not a multiple of the global batch 4"):
        model(tiny_batch(model))


def test_itc_uses_alpha_zero_hard_targets():
    model = tiny_model(alpha=0.0).eval()
    with torch.no_grad():
        out = model(tiny_batch(model), return_logits=True)
    i2t, t2i = out["logits"]["itc"]["i2t"], out["logits"]["itc"]["t2i"]
    ref = (F.cross_entropy(i2t, torch.arange(4)) + F.cross_entropy(t2i, torch.arange(4))) / 2
    torch.testing.assert_close(out["losses"]["itc"], ref)


def test_alpha_ramp():
    model = tiny_model(alpha=0.4, alpha_ramp_steps=10)
    assert model.alpha == 0.0
    model.progress.step = 5
    assert model.alpha == pytest.approx(0.2)
    model.progress.step = 50
    assert model.alpha == pytest.approx(0.4)


@pytest.mark.parametrize("value,clamped", [(1.0, 0.5), (1e-5, 0.001), (0.2, 0.2)])
def test_temp_clamping(value, clamped):
    model = tiny_model(alpha=0.0).eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        model.temp.fill_(value)
        out = model(batch, return_logits=True)
        assert model.temp.item() == pytest.approx(clamped)
        image_feat = model.image_features(batch["image"])
        text_all = torch.cat([model._momentum_features(batch["image"], batch["input_ids"],
                                                       batch["attention_mask"])[1].t(), model.text_queue], 1)
    torch.testing.assert_close(out["logits"]["itc"]["i2t"], image_feat @ text_all / clamped)


def _moved_online(model: MedBlipPretrain) -> None:
    with torch.no_grad():  # online weights away from the momentum copies, so that an update shows
        for p in model.visual_encoder.parameters():
            p.add_(1.0)


def test_momentum_update_once_per_step_at_its_first_training_forward():
    """BLIP's forward starts with _momentum_update(): the momentum features of a step already use that step's update,
    made with the weights the step starts from; later micro-batches of the step and eval forwards do not update."""
    model = tiny_model(momentum=0.9).train()
    _moved_online(model)
    p = model.visual_encoder.blocks[0].mlp.fc1.weight
    p_m = model.visual_encoder_m.blocks[0].mlp.fc1.weight
    plugin, progress = MomentumUpdate(model, seed=3), Progress()
    plugin.setup(model, torch.float32, torch.device("cpu"), progress)
    seen = []  # the momentum weight as the momentum ViT runs
    model.visual_encoder_m.patch_embed.register_forward_pre_hook(lambda *a: seen.append(p_m.detach().clone()))
    batch = tiny_batch(model)

    expected = 0.9 * p_m.detach() + 0.1 * p.detach()
    out = model(batch)  # step 1, micro-batch 1
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=1e-7)
    assert not torch.equal(seen[-1], p.detach()) and model.momentum_updated_at == 0
    model(batch)  # step 1, micro-batch 2 (gradient accumulation): no second update
    assert torch.equal(seen[-1], seen[-2])
    progress.step = 1  # the Trainer's optimizer step; the update waits for step 2's first forward
    logs = plugin.after_optimizer_step(1)
    assert model.progress is progress and torch.equal(p_m, seen[-1]) and logs["medblip/alpha"] == pytest.approx(0.4)
    with torch.no_grad():
        p.add_(0.5)  # what the optimizer step did
    model.eval()
    model(batch)  # held-out evaluation between steps: no update
    assert torch.equal(seen[-1], seen[-2])
    model.train()
    expected = 0.9 * p_m.detach() + 0.1 * p.detach()
    model(batch)
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=1e-7)
    assert model.momentum_updated_at == 1 and set(out["losses"]) == {"itc", "itm", "lm"}
    # text_proj_m moves too; itm_head and the decoder have no momentum copy
    assert {id(m) for m in model.fp32_modules()} == {id(model.visual_encoder_m), id(model.vision_proj_m),
                                                     id(model.text_encoder_m), id(model.text_proj_m)}


@pytest.mark.parametrize("saved_by", ["now", "counted", "oldest"])
def test_momentum_plugin_state_resumes_without_a_double_update(saved_by):
    """Saved after step k (the update of step k+1 pending), a resumed run updates once at its first forward. Older
    states load too: one that counted the updates ("momentum_updates", with its own "step") the same way; one saved
    before the update moved into the forward (no count) already holds that update: none then."""
    model = tiny_model(momentum=0.9).train()
    plugin, progress = MomentumUpdate(model, seed=3), Progress()
    plugin.setup(model, torch.float32, torch.device("cpu"), progress)
    batch = tiny_batch(model)
    for step in (1, 2):
        model(batch)
        progress.step = step  # the Trainer's optimizer step
        plugin.after_optimizer_step(step)
    state = copy.deepcopy(plugin.state_dict())
    assert state["momentum_updated_at"] == 1 and "step" not in state  # the updates of steps 1 and 2 (at 0 and 1)
    if saved_by != "now":  # the state as the plugin wrote it when it kept its own count
        state = {"step": 2, "itm_rng": state["itm_rng"], "itm_rng_device": state["itm_rng_device"]}
        state |= {"momentum_updates": 2} if saved_by == "counted" else {}
    w = torch.randn(4, 4)
    draws = sample_itm_negatives(w, w.t(), model.itm_generator)

    other = tiny_model(seed=1, momentum=0.9).train()
    _moved_online(other)
    restored, resumed = MomentumUpdate(other), Progress(step=2)  # the run's Progress, restored first
    restored.setup(other, torch.float32, torch.device("cpu"), resumed)
    restored.load_state_dict(state)
    assert other.progress is resumed and other.momentum_updated_at == (2 if saved_by == "oldest" else 1)
    again = sample_itm_negatives(w, w.t(), other.itm_generator)  # a resumed run draws the very same ITM negatives
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    p, p_m = other.vision_proj.weight, other.vision_proj_m.weight
    before = p_m.detach().clone()
    other(tiny_batch(other))
    if saved_by == "oldest":
        assert torch.equal(p_m, before)  # step 3's update is in the old checkpoint already
    else:
        torch.testing.assert_close(p_m, 0.9 * before + 0.1 * p.detach(), rtol=0, atol=1e-7)
    resumed.step = 3
    restored.after_optimizer_step(3)
    updated = p_m.detach().clone()
    other(tiny_batch(other))
    assert not torch.equal(p_m, updated)  # and from then on, one update per step again


def test_chance_levels_by_hand():
    """output["chance"]: the loss of a model that learned nothing, per enabled objective, as plain floats."""
    model = tiny_model(queue_size=8).train()
    batch = tiny_batch(model)
    out = model(batch)
    chance = out["chance"]
    assert set(chance) == {"itc", "itm", "lm"} and all(type(v) is float for v in chance.values())
    prior = torch.tensor([1 / 3, 2 / 3])  # ITM: 1 positive for 2 negatives
    assert chance["itm"] == pytest.approx(float(-(prior * prior.log()).sum()), abs=1e-7)
    assert chance["itm"] == pytest.approx(0.6365141682948128, abs=1e-12)  # ln 3 - (2/3) ln 2
    assert chance["itc"] == pytest.approx(math.log(4 + 8))  # B in-batch texts + Q queued ones per image
    assert chance["lm"] == pytest.approx(math.log(30524))
    # ... and they are the losses of predictions that ignore the inputs, computed with our loss functions
    itm_prior = prior.flip(0).log().expand(12, 2)  # logit index 1 = match, predicted with probability 1/3
    assert float(F.cross_entropy(itm_prior, itm_labels(4))) == pytest.approx(chance["itm"], abs=1e-6)
    flat = torch.zeros(4, 12)  # equal similarities; soft targets (alpha 0.4) sum to one like hard ones
    soft_i2t, soft_t2i = itc_targets(torch.randn(4, 12), torch.randn(4, 12), alpha=0.4)
    assert float(itc_loss(flat, flat, soft_i2t, soft_t2i)) == pytest.approx(chance["itc"], abs=1e-6)
    labels = lm_targets(batch["input_ids"], PAD)
    uniform = torch.zeros(*labels.shape, 30524)
    assert float(lm_loss(uniform, labels, label_smoothing=0.1)) == pytest.approx(chance["lm"], abs=1e-5)
    assert float(lm_loss(uniform, labels, label_smoothing=0.0)) == pytest.approx(chance["lm"], abs=1e-5)
    only = tiny_model(objectives=("itm", "lm"), queue_size=8)
    assert set(only(tiny_batch(only, n=2))["chance"]) == {"itm", "lm"}
    assert tiny_model(objectives=("itc",), queue_size=8)(tiny_batch(model, n=2))["chance"] == \
        {"itc": pytest.approx(math.log(2 + 8))}


def test_gradients_reach_trainable_weights_never_momentum():
    model = tiny_model().train()
    out = model(tiny_batch(model))
    sum(out["losses"].values()).backward()
    momentum = {id(p) for m in model.fp32_modules() for p in m.parameters()}
    online = [(n, p) for n, p in model.named_parameters() if id(p) not in momentum]
    assert len(online) > 100
    for name, p in online:
        assert p.requires_grad and p.grad is not None, name  # every online weight is used by some objective
    for m in model.fp32_modules():
        for p in m.parameters():
            assert not p.requires_grad and p.grad is None
    dec_self = model.text_decoder.bert.encoder.layer[0].attention.self.query.weight
    enc_self = model.text_encoder.encoder.layer[0].attention.self.query.weight
    assert dec_self.grad.abs().sum() > 0 and enc_self.grad.abs().sum() > 0 and model.temp.grad.abs() > 0
    assert not model.image_queue.requires_grad


def test_disabled_objectives_are_not_computed():
    model = tiny_model(objectives=("itc",)).train()
    calls = []
    model.text_decoder.register_forward_pre_hook(lambda *a: calls.append("decoder"))
    model.itm_head.register_forward_pre_hook(lambda *a: calls.append("itm"))
    out = model(tiny_batch(model))
    assert set(out["losses"]) == {"itc"} and calls == [] and "reuse" not in out
    out["losses"]["itc"].backward()
    assert model.itm_head.weight.grad is None
    assert model.text_decoder.bert.encoder.layer[0].attention.self.query.weight.grad is None

    itm_only = tiny_model(objectives=("itm",)).train()
    ptr = int(itm_only.queue_ptr)
    out = itm_only(tiny_batch(itm_only))
    assert set(out["losses"]) == {"itm"} and int(itm_only.queue_ptr) == ptr  # no momentum path, no enqueue
    with pytest.raises(ValueError, match="unknown objective 'mlm'"):
        tiny_model(objectives=("mlm",))


def test_bf16_weights_fp32_momentum_and_queue():
    model = tiny_model().train().bfloat16()
    assert model.visual_encoder.cls_token.dtype == torch.bfloat16
    assert model.image_queue.dtype == torch.float32  # queues never leave fp32
    for m in model.fp32_modules():
        m.float()
    out = model(tiny_batch(model))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["losses"].values())
    p = model.text_proj.weight
    p_m = model.text_proj_m.weight
    old = p_m.detach().clone()
    with torch.no_grad():
        p.add_(0.5)
    model.momentum_update()
    assert p_m.dtype == torch.float32
    torch.testing.assert_close(p_m, old * 0.995 + p.detach().float() * (1 - 0.995), rtol=0, atol=1e-7)
    assert (p_m - old).abs().max() > 1e-3  # a bf16 copy would round most of these updates away


def test_python_api_features_and_itm_scores():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        img = model.image_features(batch["image"])
        txt = model.text_features(batch["input_ids"], batch["attention_mask"])
        scores = model.itm_scores(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.slow
def test_base_parameter_counts_are_blip_pretrains():
    """BLIP_Pretrain (ViT-B/16 + BERT-base, BLIP HEAD's tying): 252,441,919 trainable, 475,892,799 in all."""
    torch.manual_seed(0)
    model = MedBlipPretrain(ModelConfig(preset="base", queue_size=256))
    momentum = {id(p) for m in model.fp32_modules() for p in m.parameters()}
    params = list(model.parameters())  # each shared tensor once
    assert sum(p.numel() for p in params if id(p) not in momentum and p.requires_grad) == 252_441_919
    assert sum(p.numel() for p in params if id(p) in momentum) == 223_450_880
    assert sum(p.numel() for p in params) == 475_892_799
