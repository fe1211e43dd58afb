"""BLIP-2 stage-1 losses checked by hand: ITC's max over queries, ITM's hard negatives and rows, the multimodal
causal mask of ITG; the frozen towers; stage 2's LM loss, answer ranking and generation against brute force."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recipes.blip2.objectives import (
    hard_negatives,
    itc_loss,
    itc_similarities,
    itg_targets,
    multimodal_causal_mask,
)
from tests.blip2_tiny import captions, images, stage1, with_llm


def _ce_smoothed(row: list[float], target: int, eps: float = 0.1) -> float:
    """PyTorch's label-smoothed CE written out: (1 - eps) * NLL(target) + eps * mean over classes of NLL."""
    lse = math.log(sum(math.exp(v) for v in row))
    nll = [lse - v for v in row]
    return (1 - eps) * nll[target] + eps * sum(nll) / len(nll)


def test_itc_similarity_is_the_max_over_queries_divided_by_temp():
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],        # image 0: three query features
                          [[-1.0, 0.0], [0.0, -1.0], [0.8, -0.6]]], requires_grad=True)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim_i2t, sim_t2i = itc_similarities(image, text, torch.tensor([0.5]))
    # max_q <img_i,q, txt_j>: (0,0) = max(1, 0, .6) = 1; (0,1) = max(0, 1, .8) = 1; (1,0) = .8; (1,1) = max(0,-1,-.6) = 0
    torch.testing.assert_close(sim_i2t, torch.tensor([[2.0, 2.0], [1.6, 0.0]]))
    torch.testing.assert_close(sim_t2i, sim_i2t.T)  # locally the text side is the transpose
    loss = itc_loss(sim_i2t, sim_t2i, label_smoothing=0.1)
    i2t = (_ce_smoothed([2.0, 2.0], 0) + _ce_smoothed([1.6, 0.0], 1)) / 2
    t2i = (_ce_smoothed([2.0, 1.6], 0) + _ce_smoothed([2.0, 0.0], 1)) / 2
    assert float(loss) == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    loss.backward()
    # only the query that wins the max receives gradient: image 0's third query never does
    assert torch.equal(image.grad[0, 2], torch.zeros(2)) and image.grad[0, 0].abs().sum() > 0
    assert image.grad[0, 1].abs().sum() > 0 and image.grad[1, 2].abs().sum() > 0


def test_itc_with_gathered_features_targets_the_ranks_columns():
    torch.manual_seed(0)
    img_all = F.normalize(torch.randn(6, 3, 4), dim=-1)
    txt_all = F.normalize(torch.randn(6, 4), dim=-1)
    local = slice(2, 4)  # rank 1 of 3 with 2 pairs each
    sim_i2t, sim_t2i = itc_similarities(img_all[local], txt_all[local], torch.tensor([0.1]), img_all, txt_all)
    full_i2t, full_t2i = itc_similarities(img_all, txt_all, torch.tensor([0.1]))
    torch.testing.assert_close(sim_i2t, full_i2t[local])
    torch.testing.assert_close(sim_t2i, full_t2i[local])
    expected = (F.cross_entropy(full_i2t[local], torch.tensor([2, 3]), label_smoothing=0.1)
                + F.cross_entropy(full_t2i[local], torch.tensor([2, 3]), label_smoothing=0.1)) / 2
    torch.testing.assert_close(itc_loss(sim_i2t, sim_t2i, offset=2), expected)


def test_hard_negatives_never_draw_the_positive_and_follow_the_similarities():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[50.0, 0.0], [0.0, 50.0]])  # the positive dominates: still never drawn
    for _ in range(20):
        neg_image, neg_text = hard_negatives(sim, sim, generator=g)
        assert neg_image.tolist() == [1, 0] and neg_text.tolist() == [1, 0]
    # row 0 over columns 1, 2 with logits log 3 and 0: probabilities 3/4 and 1/4
    sim = torch.tensor([[9.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    draws = torch.stack([hard_negatives(sim, sim, generator=g)[0] for _ in range(4000)])
    assert (draws[:, 0] != 0).all() and (draws[:, 1] != 1).all() and (draws[:, 2] != 2).all()
    assert (draws[:, 0] == 1).float().mean().item() == pytest.approx(0.75, abs=0.03)
    # another rank's rows: its positives are at columns offset + i
    wide = torch.zeros(2, 6)
    neg_image, _ = hard_negatives(wide, wide, offset=4, generator=g)
    for _ in range(50):
        neg_image, _ = hard_negatives(wide, wide, offset=4, generator=g)
        assert neg_image[0] != 4 and neg_image[1] != 5


def test_multimodal_causal_mask_exact_pattern():
    mask = multimodal_causal_mask(2, torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.float32)
    allowed = (mask == 0).squeeze(1).int()
    assert mask.shape == (2, 1, 5, 5) and mask.min() == torch.finfo(torch.float32).min
    expected0 = [[1, 1, 0, 0, 0],   # query 0: the queries only
                 [1, 1, 0, 0, 0],   # query 1
                 [1, 1, 1, 0, 0],   # text 0: all queries + itself
                 [1, 1, 1, 1, 0],   # text 1: + text 0
                 [1, 1, 1, 1, 1]]   # text 2
    expected1 = [row[:4] + [0] for row in expected0]  # sample 1's third token is padding: nobody attends to it
    assert allowed.tolist() == [expected0, expected1]


def test_itm_scores_pos_neg_image_neg_text_rows_with_labels_1_0_0():
    model = stage1()
    ids, mask = captions(model.tokenizer, ["ct of the head", "mri of the abdomen shows a lesion", "yes"])
    emb = model.image_embeds(images(3))
    negatives = (torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]))
    out = model.stage1_losses(emb, ids, mask, negatives=negatives, return_logits=True)
    itm = out["logits"]["itm"]
    assert itm.shape == (9, 2)
    for i in range(3):
        pos = model.itm_logits(emb[i:i + 1], ids[i:i + 1], mask[i:i + 1])
        neg_img = model.itm_logits(emb[negatives[0][i]][None], ids[i:i + 1], mask[i:i + 1])
        j = negatives[1][i]
        neg_txt = model.itm_logits(emb[i:i + 1], ids[j:j + 1], mask[j:j + 1])
        torch.testing.assert_close(itm[i], pos[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(itm[3 + i], neg_img[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(itm[6 + i], neg_txt[0], atol=1e-5, rtol=1e-5)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(out["losses"]["itm"], F.cross_entropy(itm, labels))
    assert out["negatives"] is negatives


def test_itm_attention_is_bidirectional_between_queries_and_text():
    model = stage1()
    emb = model.image_embeds(images(1))
    a = model.itm_logits(emb, *captions(model.tokenizer, ["ct of the head"]))
    b = model.itm_logits(emb, *captions(model.tokenizer, ["ct of the abdomen"]))  # a later token differs
    assert not torch.allclose(a, b)  # the (averaged) query outputs saw the text


def test_itg_queries_never_see_the_text_and_the_text_is_causal():
    model = stage1()
    emb = model.image_embeds(images(2))
    ids, mask = captions(model.tokenizer, ["ct of the head with a lesion", "mri of the abdomen"])
    dec, _ = itg_targets(ids, model.tokenizer.bos_token_id, model.tokenizer.pad_token_id)
    logits = model.itg_logits(emb, dec, mask)
    changed = dec.clone()
    changed[:, 4:] = model.tokenizer.convert_tokens_to_ids("lesion")  # change every token from position 4 on
    logits2 = model.itg_logits(emb, changed, mask)
    torch.testing.assert_close(logits[:, :4], logits2[:, :4])  # positions 0-3 cannot see positions >= 4
    assert not torch.allclose(logits[:, 4:], logits2[:, 4:])
    # the query half of the joint pass is the query-only pass: LAVIS's cached-keys form gives the same text states
    q = model.mc.num_query_tokens
    joint = model.qformer(query_embeds=model._text_embeds(dec, True), query_length=q,
                          attention_mask=multimodal_causal_mask(q, mask, torch.float32),
                          encoder_hidden_states=emb).last_hidden_state[:, :q]
    torch.testing.assert_close(joint, model.query_output(emb), atol=1e-6, rtol=1e-5)
    # and the text is image-grounded
    other = model.itg_logits(model.image_embeds(images(2, seed=5)), dec, mask)
    assert not torch.allclose(other, logits)


def test_itg_loss_is_label_smoothed_next_token_ce_from_dec():
    model = stage1()
    tok = model.tokenizer
    ids, mask = captions(tok, ["ct of the head", "mri"])
    dec, labels = itg_targets(ids, tok.bos_token_id, tok.pad_token_id)
    assert (dec[:, 0] == tok.bos_token_id).all() and labels[1, -1] == -100  # [DEC] first, padding ignored
    emb = model.image_embeds(images(2))
    out = model.stage1_losses(emb, ids, mask, negatives=(torch.tensor([1, 0]), torch.tensor([1, 0])))
    logits = model.itg_logits(emb, dec, mask)
    rows = [(b, t) for b in range(2) for t in range(ids.shape[1] - 1) if labels[b, t + 1] != -100]
    expected = sum(_ce_smoothed(logits[b, t].tolist(), int(labels[b, t + 1])) for b, t in rows) / len(rows)
    assert float(out["losses"]["itg"]) == pytest.approx(expected, abs=1e-5)


def test_stage1_trains_the_qformer_and_heads_never_the_vision_tower():
    model = stage1().train()
    ids, mask = captions(model.tokenizer, ["ct of the head", "mri of the abdomen", "a lesion"])
    out = model({"image": images(3), "input_ids": ids, "attention_mask": mask})
    assert set(out["losses"]) == {"itc", "itm", "itg"}
    sum(out["losses"].values()).backward()
    assert not model.vision_model.training
    for name, p in model.vision_model.named_parameters():  # frozen ViT; LAVIS trains its ln_vision (post_layernorm)
        assert (p.grad is not None) == name.startswith("post_layernorm."), name
    for name in ("query_tokens", "temp", "itm_head.weight", "vision_projection.weight", "text_projection.weight",
                 "embeddings.word_embeddings.weight", "qformer.encoder.layer.0.crossattention.attention.query.weight"):
        assert dict(model.named_parameters())[name].grad is not None, name
    assert model.itg_head.predictions.decoder.weight is model.embeddings.word_embeddings.weight  # tied
    model.objectives = ("itm",)
    out = model({"image": images(3), "input_ids": ids, "attention_mask": mask})
    assert set(out["losses"]) == {"itm"}  # negatives still drawn from (gradient-free) ITC similarities


# ----------------------------------------------------------------------------- stage 2 and VQA


@pytest.mark.parametrize("t5", [False, True], ids=["opt", "t5"])
def test_llm_loss_scores_only_the_target_tokens(t5: bool):
    model = with_llm(t5=t5)
    batch = model.text.training_batch(["question: is there a lesion ? answer:", "question: what organ ?"],
                                      ["yes", "the head"])
    pix = images(2)
    out = model.llm_loss(model.image_embeds(pix), batch["llm_input_ids"], batch["llm_attention_mask"],
                         batch["llm_labels"], batch.get("llm_decoder_mask"))
    labels = batch["llm_labels"]
    if t5:
        dec = model.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model.llm_logits(pix, batch["llm_input_ids"], batch["llm_attention_mask"], dec)
        rows = [(logits[b, t], labels[b, t]) for b in range(2) for t in range(labels.shape[1]) if labels[b, t] >= 0]
    else:
        logits = model.llm_logits(pix, batch["llm_input_ids"], batch["llm_attention_mask"])
        q = model.mc.num_query_tokens  # text token t sits at q + t and is predicted from position q + t - 1
        rows = [(logits[b, q + t - 1], labels[b, t]) for b in range(2) for t in range(labels.shape[1])
                if labels[b, t] >= 0]
        assert [model.text.tokenizer.decode([int(labels[0, t])]) for t in range(labels.shape[1])
                if labels[0, t] >= 0] == ["yes", "[SEP]"]  # " yes" + the end token, nothing of the prompt
    expected = F.cross_entropy(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    torch.testing.assert_close(out["losses"]["lm"], expected, atol=1e-5, rtol=1e-5)


def _brute_force_log_likelihood(model, pix, prompt: str, answer: str) -> float:
    """log p(answer tokens | image, prompt) from one unpadded full forward of the whole sequence."""
    text = model.text
    prompt_ids, target = text.prompt_ids(prompt), text.target_ids(answer)
    if model.config.is_encoder_decoder:
        labels = torch.tensor([target])
        dec = model.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model.llm_logits(pix, torch.tensor([prompt_ids]), torch.ones(1, len(prompt_ids), dtype=torch.long),
                                  dec)[0]
        return float(sum(logits[t].log_softmax(-1)[tok] for t, tok in enumerate(target)))
    ids = torch.tensor([prompt_ids + target])
    logits = model.llm_logits(pix, ids, torch.ones_like(ids))[0]
    start = model.mc.num_query_tokens + len(prompt_ids)
    return float(sum(logits[start + t - 1].log_softmax(-1)[tok] for t, tok in enumerate(target)))


@pytest.mark.parametrize("t5", [False, True], ids=["opt", "t5"])
def test_rank_answers_equals_brute_force_log_likelihood(t5: bool):
    model = with_llm(t5=t5, seed=3)
    pix = images(2, seed=1)
    prompts = ["question: is there a lesion ? answer:", "question: what ? answer:"]  # different lengths: padding
    answers = ["yes", "no", "left", "the head", "a small bright lesion"]
    ids, mask = model.text.targets(answers, pix.device)
    best, score = model.rank_answers(model.image_embeds(pix), prompts, ids, mask, k=len(answers))
    for i, prompt in enumerate(prompts):
        brute = [_brute_force_log_likelihood(model, pix[i:i + 1], prompt, a) for a in answers]
        assert int(best[i]) == max(range(len(answers)), key=brute.__getitem__)
        assert float(score[i]) == pytest.approx(max(brute), abs=1e-4)
    # k = 1: the candidate with the likeliest FIRST token is the one kept (BLIP's first-token filter)
    best1, score1 = model.rank_answers(model.image_embeds(pix), prompts, ids, mask, k=1)
    for i, prompt in enumerate(prompts):
        one = [_first_token_logp(model, pix[i:i + 1], prompt, int(t)) for t in ids[:, 0]]
        assert int(best1[i]) == max(range(len(answers)), key=one.__getitem__)
        assert float(score1[i]) == pytest.approx(_brute_force_log_likelihood(model, pix[i:i + 1], prompt,
                                                                             answers[int(best1[i])]), abs=1e-4)


def _first_token_logp(model, pix, prompt: str, token: int) -> float:
    text = model.text
    prompt_ids = text.prompt_ids(prompt)
    if model.config.is_encoder_decoder:
        start = torch.tensor([[model.config.text_config.decoder_start_token_id]])
        logits = model.llm_logits(pix, torch.tensor([prompt_ids]), torch.ones(1, len(prompt_ids), dtype=torch.long),
                                  start)[0, 0]
    else:
        ids = torch.tensor([prompt_ids])
        logits = model.llm_logits(pix, ids, torch.ones_like(ids))[0, -1]
    return float(logits.log_softmax(-1)[token])


def test_greedy_generation_equals_step_by_step_argmax():
    model = with_llm(seed=2)
    pix = images(2)
    prompts = ["question: is there a lesion ? answer:", "question: what organ ?"]
    generated = model.generate(model.image_embeds(pix), prompts, num_beams=1, max_new_tokens=4)
    for i, prompt in enumerate(prompts):
        ids = model.text.prompt_ids(prompt)
        new = []
        for _ in range(4):
            seq = torch.tensor([ids + new])
            nxt = int(model.llm_logits(pix[i:i + 1], seq, torch.ones_like(seq))[0, -1].argmax())
            if nxt == model.text.end_id:
                break
            new.append(nxt)
        assert generated[i] == model.llm_tokenizer.decode(new, skip_special_tokens=True).strip()


def test_stage2_trains_projection_and_qformer_never_the_llm():
    model = with_llm().train()
    batch = model.text.training_batch(["", ""], ["ct of the head", "mri"])
    out = model({"image": images(2), **batch})
    out["losses"]["lm"].backward()
    assert model.language_projection.weight.grad is not None and model.query_tokens.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.language_model.parameters())
    assert all(p.grad is None for n, p in model.vision_model.named_parameters() if not n.startswith("post_layernorm"))
    assert model.vision_model.post_layernorm.weight.grad is not None


@pytest.mark.slow
def test_itm_leaves_the_label_prior_and_learns_to_match():
    """ITM starts on the 1:2 label prior (loss ~0.6365, BLIP #51) and learns to match two distinct pairs.

    Two pairs, so each row's hard negative is the other one: nothing drawn decides the outcome. With 4 pairs of
    noise images some seeds (so some CPUs' kernels) sit in a local minimum (2 of 8 seeds measured); with these two
    pairs all 8 seeds measured reach loss < 0.002 by step 100 of 200 (asserted: < 0.05). Every draw the test makes
    comes from a generator seeded here, and the global RNG (the model's draws) is forked and seeded here.
    """
    with torch.random.fork_rng():
        model = stage1(seed=0).train()  # seeds the (forked) global RNG the ITM negative draw uses
        model.objectives = ("itm",)
        ids, mask = captions(model.tokenizer, ["ct of the head", "mri of the abdomen shows a lesion"])
        colours = torch.tensor([[1.5, -1.5, 0.0], [-1.5, 1.5, 0.0]])  # two images no frozen ViT confuses
        pix = 0.2 * images(2, seed=0) + colours[:, :, None, None]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200)
        losses = []
        for _ in range(200):
            loss = model({"image": pix, "input_ids": ids, "attention_mask": mask})["losses"]["itm"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
        model.eval()
        emb = model.image_embeds(pix)
        with torch.no_grad():
            match = torch.stack([torch.stack([model.itm_logits(emb[i:i + 1], ids[j:j + 1], mask[j:j + 1])[0]
                                              .softmax(-1)[1] for j in range(2)]) for i in range(2)])
    assert losses[0] > 0.5  # untrained: near the label prior (1 match to 2 non-matches: 0.6365) or above it
    assert max(losses[-10:]) < 0.05
    assert (match.diagonal() > 0.9).all() and (match.fliplr().diagonal() < 0.1).all(), match
