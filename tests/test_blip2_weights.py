"""Published BLIP-2 layouts load offline: transformers' save_pretrained directories (logits equal to transformers'
own Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval) and LAVIS's stage-1 keys + EVA's ViT file."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from recipes.blip2.objectives import itc_similarities
from recipes.blip2.weights import CheckpointError, load_pretrained
from tests.blip2_tiny import captions, images, stage1, with_llm

IMAGE_TOKEN = 4  # [MASK] of the tiny vocabulary stands in for transformers' <image> placeholder


@pytest.mark.parametrize("t5", [False, True], ids=["opt", "t5"])
def test_transformers_save_pretrained_directory_gives_transformers_logits(tmp_path, t5: bool):
    ours = with_llm(seed=0, t5=t5)
    config = copy.deepcopy(ours.config)
    config.image_token_index = IMAGE_TOKEN
    torch.manual_seed(1)
    reference = Blip2ForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    # transformers' port builds ln_vision with the ViT's eps 1e-6; ours is LAVIS's 1e-5 (the weights are the same)
    reference.vision_model.post_layernorm.eps = 1e-5
    q = ours.mc.num_query_tokens
    pix = images(2)
    ids, mask = captions(ours.llm_tokenizer, ["is there a lesion ?", "what organ is shown with the ct scan ?"])
    dec = torch.tensor([[0, 7, 8], [0, 9, 10]]) if t5 else None
    ref_ids = torch.cat([torch.full((2, q), IMAGE_TOKEN), ids], 1)
    ref_mask = torch.cat([torch.ones(2, q, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        expected = reference(pixel_values=pix, input_ids=ref_ids, attention_mask=ref_mask,
                             decoder_input_ids=dec).logits
        before = ours.llm_logits(pix, ids, mask, dec)
    assert (before - expected).abs().max() > 1e-2  # different weights before loading
    report = load_pretrained(ours, str(tmp_path))
    assert report.missing == [] and report.unexpected == [], report.summary()
    with torch.no_grad():
        got = ours.llm_logits(pix, ids, mask, dec)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_old_transformers_vit_bias_keys_are_folded(tmp_path):
    """Checkpoints written before transformers folded the ViT biases hold self_attn.q_bias / v_bias."""
    ours = with_llm(seed=0)
    sd = {k: v.clone() for k, v in with_llm(seed=5).state_dict().items()}
    for i in range(2):
        qkv = sd.pop(f"vision_model.encoder.layers.{i}.self_attn.qkv.bias")
        d = qkv.shape[0] // 3
        sd[f"vision_model.encoder.layers.{i}.self_attn.q_bias"] = qkv[:d]
        sd[f"vision_model.encoder.layers.{i}.self_attn.v_bias"] = qkv[2 * d:] + 1.0
    torch.save(sd, tmp_path / "old.pth")
    report = load_pretrained(ours, str(tmp_path / "old.pth"))
    assert report.missing == [] and report.unexpected == []
    bias = ours.vision_model.encoder.layers[1].self_attn.qkv.bias
    d = bias.shape[0] // 3
    assert torch.equal(bias[d:2 * d], torch.zeros(d))  # the key part has no bias
    assert torch.equal(bias[2 * d:], sd["vision_model.encoder.layers.1.self_attn.v_bias"])


def test_blip2_image_text_retrieval_directory_gives_its_itm_and_itc_scores(tmp_path):
    ours = stage1(seed=0)
    torch.manual_seed(2)
    reference = Blip2ForImageTextRetrieval(copy.deepcopy(ours.config)).eval()
    reference.save_pretrained(tmp_path)
    reference.vision_model.post_layernorm.eps = 1e-5  # LAVIS's ln_vision, as ours (transformers' port: 1e-6)
    report = load_pretrained(ours, str(tmp_path))
    # transformers has no ITG head and no temperature: exactly those are reported missing
    assert report.unexpected == []
    assert sorted(m.split(" ")[0] for m in report.missing) == [
        "itg_head.predictions.bias", "itg_head.predictions.transform.LayerNorm.bias",
        "itg_head.predictions.transform.LayerNorm.weight", "itg_head.predictions.transform.dense.bias",
        "itg_head.predictions.transform.dense.weight", "temp"]
    pix = images(2)
    ids, mask = captions(ours.tokenizer, ["ct of the head", "mri of the abdomen shows a lesion"])
    with torch.no_grad():
        itm_ref = reference(pixel_values=pix, input_ids=ids, attention_mask=mask,
                            use_image_text_matching_head=True).logits_per_image
        itc_ref = reference(pixel_values=pix, input_ids=ids, attention_mask=mask,
                            use_image_text_matching_head=False).logits_per_image
        emb = ours.image_embeds(pix)
        itm = ours.itm_logits(emb, ids, mask)
        feats = ours.itc_features(ours.query_output(emb), ours.text_output(ids, mask))
        sim_i2t, _ = itc_similarities(*feats, torch.ones(1))  # temperature 1: the raw max cosine similarity
    assert (itm - itm_ref).abs().max().item() < 1e-5
    assert (sim_i2t - itc_ref).abs().max().item() < 1e-5


def _lavis_stage1(model, vision: bool) -> dict[str, torch.Tensor]:
    """A LAVIS blip2 state dict for the tiny sizes, keys written from LAVIS's module names (Qformer.py, eva_vit.py)."""
    g = torch.Generator().manual_seed(7)
    q = model.config.qformer_config
    h, inter, vocab, pos = q.hidden_size, q.intermediate_size, q.vocab_size, q.max_position_embeddings
    dv = model.config.vision_config.hidden_size
    shapes = {"query_tokens": (1, model.mc.num_query_tokens, h), "temp": (), "vision_proj.weight": (256, h),
              "vision_proj.bias": (256,), "text_proj.weight": (256, h), "text_proj.bias": (256,),
              "itm_head.weight": (2, h), "itm_head.bias": (2,), "ln_vision.weight": (dv,), "ln_vision.bias": (dv,),
              "Qformer.bert.embeddings.word_embeddings.weight": (vocab, h),
              "Qformer.bert.embeddings.position_embeddings.weight": (pos, h),
              "Qformer.bert.embeddings.LayerNorm.weight": (h,), "Qformer.bert.embeddings.LayerNorm.bias": (h,),
              "Qformer.cls.predictions.bias": (vocab,), "Qformer.cls.predictions.transform.dense.weight": (h, h),
              "Qformer.cls.predictions.transform.dense.bias": (h,),
              "Qformer.cls.predictions.transform.LayerNorm.weight": (h,),
              "Qformer.cls.predictions.transform.LayerNorm.bias": (h,)}
    for i in range(q.num_hidden_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        for part, kv_in in (("attention", h), ("crossattention", dv)):
            shapes |= {f"{p}{part}.self.query.weight": (h, h), f"{p}{part}.self.query.bias": (h,),
                       f"{p}{part}.self.key.weight": (h, kv_in), f"{p}{part}.self.key.bias": (h,),
                       f"{p}{part}.self.value.weight": (h, kv_in), f"{p}{part}.self.value.bias": (h,),
                       f"{p}{part}.output.dense.weight": (h, h), f"{p}{part}.output.dense.bias": (h,),
                       f"{p}{part}.output.LayerNorm.weight": (h,), f"{p}{part}.output.LayerNorm.bias": (h,)}
        for suffix in ("", "_query"):
            shapes |= {f"{p}intermediate{suffix}.dense.weight": (inter, h), f"{p}intermediate{suffix}.dense.bias":
                       (inter,), f"{p}output{suffix}.dense.weight": (h, inter), f"{p}output{suffix}.dense.bias": (h,),
                       f"{p}output{suffix}.LayerNorm.weight": (h,), f"{p}output{suffix}.LayerNorm.bias": (h,)}
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["temp"] = torch.tensor(0.05)
    sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]  # tied
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(pos)[None]  # an old persistent buffer
    return sd


def _eva_vit(model) -> dict[str, torch.Tensor]:
    """EVA ViT-g's eva_vit_g.pth layout (no prefix), for the tiny sizes."""
    g = torch.Generator().manual_seed(8)
    v = model.config.vision_config
    d, inter, patch = v.hidden_size, v.intermediate_size, v.patch_size
    n = (v.image_size // patch) ** 2 + 1
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, n, d), "patch_embed.proj.weight": (d, 3, patch, patch),
              "patch_embed.proj.bias": (d,)}
    for i in range(v.num_hidden_layers):
        p = f"blocks.{i}."
        shapes |= {f"{p}norm1.weight": (d,), f"{p}norm1.bias": (d,), f"{p}attn.qkv.weight": (3 * d, d),
                   f"{p}attn.q_bias": (d,), f"{p}attn.v_bias": (d,), f"{p}attn.proj.weight": (d, d),
                   f"{p}attn.proj.bias": (d,), f"{p}norm2.weight": (d,), f"{p}norm2.bias": (d,),
                   f"{p}mlp.fc1.weight": (inter, d), f"{p}mlp.fc1.bias": (inter,), f"{p}mlp.fc2.weight": (d, inter),
                   f"{p}mlp.fc2.bias": (d,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_lavis_stage1_checkpoint_and_eva_vit_load_with_no_missing_or_unexpected_key(tmp_path):
    model = stage1(seed=0)
    lavis, eva = _lavis_stage1(model, vision=False), _eva_vit(model)
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")  # LAVIS's {'model': state_dict}
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    report = load_pretrained(model, [str(tmp_path / "blip2_pretrained.pth"), str(tmp_path / "eva_vit_g.pth")])
    assert report.missing == [] and report.unexpected == [], report.summary()
    assert report.ignored == ["embeddings.position_ids"] and report.layout == "lavis+vit"
    q = model.qformer.encoder.layer[1]
    assert torch.equal(q.attention.attention.query.weight, lavis["Qformer.bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(q.crossattention.attention.value.weight,
                       lavis["Qformer.bert.encoder.layer.1.crossattention.self.value.weight"])
    assert torch.equal(q.output_query.LayerNorm.bias, lavis["Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"])
    assert torch.equal(model.qformer.layernorm.weight, lavis["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(model.vision_model.post_layernorm.weight, lavis["ln_vision.weight"])
    assert torch.equal(model.itg_head.predictions.decoder.weight, lavis["Qformer.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.itg_head.predictions.transform.dense.weight,
                       lavis["Qformer.cls.predictions.transform.dense.weight"])
    assert torch.equal(model.vision_projection.bias, lavis["vision_proj.bias"]) and float(model.temp) == pytest.approx(0.05)
    attn = model.vision_model.encoder.layers[0].self_attn
    d = attn.projection.weight.shape[0]
    assert torch.equal(attn.qkv.bias, torch.cat([eva["blocks.0.attn.q_bias"], torch.zeros(d), eva["blocks.0.attn.v_bias"]]))
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight, eva["patch_embed.proj.weight"])
    assert torch.equal(model.vision_model.embeddings.class_embedding, eva["cls_token"])


def test_stage2_from_the_stage1_file_ignores_the_stage1_heads_and_reports_the_missing_llm(tmp_path):
    model = with_llm(seed=0)
    lavis = _lavis_stage1(stage1(seed=0), vision=False)
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    report = load_pretrained(model, str(tmp_path / "blip2_pretrained.pth"))
    assert report.unexpected == []
    assert any(k.startswith("itg_head.") for k in report.ignored) and "temp" in report.ignored
    assert any("stage-1 heads" in n for n in report.notes)
    missing = {m.split(".")[0] for m in report.missing}
    assert missing == {"vision_model", "language_projection", "language_model"}  # from the other files
    assert torch.equal(model.query_tokens, lavis["query_tokens"])


def test_a_checkpoint_of_another_size_fails_in_one_line(tmp_path):
    model = stage1(seed=0)
    other = stage1(seed=0, image_size=64)  # more patches: another position-embedding shape
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"position_embedding .* set image.size") as e:
        load_pretrained(model, str(tmp_path / "other.pth"))
    assert "\n" not in str(e.value)
