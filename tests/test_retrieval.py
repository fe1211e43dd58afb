"""BLIP's retrieval protocol: our batched re-ranking equals salesforce/BLIP's evaluation loop written out step for
step on a tiny model; recall by hand; launch/evaluate.py --recipe retrieval.yaml on phantom shards."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_entry

from recipes.common.retrieval import itm_rerank, recalls
from recipes.medblip.pretrain import from_recipe

RECIPE = str(ROOT / "recipes" / "medblip" / "retrieval.yaml")
TINY = ["model.preset=tiny", "image.size=32", "run.init_from=null", "train.precision=fp32"]


def _blip_evaluation(model, images, captions, k):
    """salesforce/BLIP train_retrieval.py `evaluation`, one query at a time, as written there (single process)."""
    text_input = model.tokenize(captions)
    text_output = model.text_encoder(text_input["input_ids"], attention_mask=text_input["attention_mask"])
    text_embeds = F.normalize(model.text_proj(text_output.last_hidden_state[:, 0, :]))
    text_ids, text_atts = text_input["input_ids"].clone(), text_input["attention_mask"]
    text_ids[:, 0] = model.enc_token_id
    image_feats = model.visual_encoder.forward_features(images)
    image_embeds = F.normalize(model.vision_proj(image_feats[:, 0, :]), dim=-1)
    sims_matrix = image_embeds @ text_embeds.t()
    score_i2t = torch.full((len(images), len(captions)), -100.0)
    for i, sims in enumerate(sims_matrix):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        encoder_output = image_feats[i].repeat(k, 1, 1)
        encoder_att = torch.ones(encoder_output.size()[:-1], dtype=torch.long)
        output = model.text_encoder(text_ids[topk_idx], attention_mask=text_atts[topk_idx],
                                    encoder_hidden_states=encoder_output, encoder_attention_mask=encoder_att)
        score = model.itm_head(output.last_hidden_state[:, 0, :])[:, 1]
        score_i2t[i, topk_idx] = score + topk_sim
    sims_matrix = sims_matrix.t()
    score_t2i = torch.full((len(captions), len(images)), -100.0)
    for i, sims in enumerate(sims_matrix):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        encoder_output = image_feats[topk_idx]
        encoder_att = torch.ones(encoder_output.size()[:-1], dtype=torch.long)
        output = model.text_encoder(text_ids[i].repeat(k, 1), attention_mask=text_atts[i].repeat(k, 1),
                                    encoder_hidden_states=encoder_output, encoder_attention_mask=encoder_att)
        score = model.itm_head(output.last_hidden_state[:, 0, :])[:, 1]
        score_t2i[i, topk_idx] = score + topk_sim
    return sims_matrix.t(), score_i2t, score_t2i


@torch.no_grad()
def test_rerank_equals_blips_evaluation_step_for_step():
    torch.manual_seed(0)
    model = from_recipe(ROOT / "recipes" / "medblip" / "dapt.yaml", TINY, load_weights=False).eval()
    torch.manual_seed(1)
    images = torch.randn(7, 3, 32, 32)
    captions = ["axial ct of the chest", "mri of the brain", "chest x ray", "ct abdomen with contrast",
                "ultrasound of the liver", "sagittal mri of the knee", "pelvic ct scan shows a mass"]
    sims, ref_i2t, ref_t2i = _blip_evaluation(model, images, captions, k=3)

    embeds = model.image_embeddings(images)
    tok = model.tokenize(captions)
    itc = model.image_features(images) @ model.text_features(tok["input_ids"], tok["attention_mask"]).t()
    assert torch.allclose(itc, sims, atol=1e-6)

    def itm(img, txt):  # our ITM scorer: many (image, text) pairs per call
        return model.itm_logits(embeds[img], tok["input_ids"][txt], tok["attention_mask"][txt])[:, 1]

    i2t, t2i = itm_rerank(itc, itm, k=3, pairs_per_call=5)  # 5: calls that cut across queries
    assert torch.allclose(i2t, ref_i2t, atol=1e-5) and torch.allclose(t2i, ref_t2i, atol=1e-5)
    assert int((i2t == -100).sum()) == 7 * 4  # exactly k per row re-scored
    # BLIP's itm_eval reading of the same matrices: rank of the true pair in the argsort
    ranks = [int((torch.argsort(ref_i2t[i], descending=True) == i).nonzero()) for i in range(7)]
    assert recalls(i2t, t2i, (1, 5))["i2t_r1"] == pytest.approx(sum(r < 1 for r in ranks) / 7)
    assert recalls(i2t, t2i, (1, 5))["i2t_r5"] == pytest.approx(sum(r < 5 for r in ranks) / 7)


def test_recalls_by_hand_and_rerank_only_touches_the_top_k():
    score = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.5], [0.1, 0.3, 0.7]])
    r = recalls(score, score.t(), (1, 2))
    # image 1 ranks its text 3rd (0.8, 0.5, 0.2); text 1 ranks its image 2nd (0.3, 0.2, 0.1)
    assert (r["i2t_r1"], r["i2t_r2"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (r["t2i_r1"], r["t2i_r2"]) == (pytest.approx(2 / 3), pytest.approx(1.0))
    sims = torch.eye(3)
    i2t, t2i = itm_rerank(sims, lambda i, t: torch.full((len(i),), 10.0), k=1)
    assert torch.equal(i2t, torch.tensor([[11.0, -100, -100], [-100, 11.0, -100], [-100, -100, 11.0]]))
    with pytest.raises(ValueError, match="k_test must be >= 1"):
        itm_rerank(sims, lambda i, t: torch.zeros(len(i)), k=0)


@pytest.mark.slow
def test_evaluate_py_runs_the_protocol_on_held_out_shards(tmp_path):
    from corpora.phantoms import PhantomSpec, write_caption_shards

    from recipes.medblip.model.weights import save_weights

    write_caption_shards(tmp_path / "val", PhantomSpec(image_size=32, samples_per_shard=8), "val", 12)
    torch.manual_seed(0)
    weights = save_weights(from_recipe(RECIPE, TINY, load_weights=False), tmp_path / "w.pth")
    res = run_entry("evaluate.py", "--recipe", RECIPE, "--checkpoint", str(weights), "--out", str(tmp_path / "out"),
                    *TINY, f"data.val={tmp_path / 'val'}", "retrieval.max_pairs=10", "retrieval.k_test=4",
                    "retrieval.batch_size=4", "data.num_workers=0", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert doc["pairs"] == 10 and doc["held_out_total"] == 12 and doc["k_test"] == 4
    for name in ("itc", "itc_itm"):
        assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"} <= set(doc[name])
    assert doc["itc_itm"]["i2t_r10"] == 1.0  # 10 pairs: every query's true pair is within 10
    assert "ITC + ITM" in res.stdout and "ITC only" in res.stdout


@torch.no_grad()
def test_dapt_validation_option_equals_blips_evaluation(tmp_path):
    """validation.itm_rerank_k: the DAPT/PSD evaluator's ITC + ITM recall equals BLIP's loop on the same pairs."""
    import webdataset as wds
    from test_validation import CAPTIONS, tiny_cfg, write_shards

    from recipes.common.image_text import make_collate, make_decode
    from recipes.medblip.pretrain import build_model
    from recipes.medblip.pretrain.validation import ValidationConfig, caption_ids, make_pretrain_evaluator

    val = write_shards(tmp_path / "val", CAPTIONS, per_shard=4)
    cfg = tiny_cfg(val, 8)
    model = build_model(cfg)
    opts = ValidationConfig(captions=0, itm_rerank_k=3, itm_rerank_pairs=8, recall_k=[1, 2])
    m = make_pretrain_evaluator(cfg, model.tokenizer, opts)(model, 0)
    decode, collate = make_decode(cfg.image, train=False), make_collate(model.tokenizer, cfg.model.max_text_len)
    batch = collate([decode(s) for s in wds.WebDataset(sorted(str(p) for p in val.glob("*.tar")), shardshuffle=False)])
    model.eval()
    _, ref_i2t, ref_t2i = _blip_evaluation(model, batch["image"], batch["captions"], k=3)
    ids = caption_ids(batch["captions"])
    ref = recalls(ref_i2t, ref_t2i, [1, 2], ids, ids)
    assert m["itm_pairs"] == 8 and {k: m[f"itm_{k}"] for k in ref} == pytest.approx(ref)
    itc = model.image_features(batch["image"]) @ model.text_features(batch["input_ids"], batch["attention_mask"]).t()
    assert m["i2t_r1"] == pytest.approx(recalls(itc, itc.t(), [1], ids, ids)["i2t_r1"])  # ITC-only stays beside it
