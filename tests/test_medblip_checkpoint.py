"""MedBLIP weights: BLIP's checkpoint layout, transformers' Blip* layout, our files; reports, refusals, safety."""
from __future__ import annotations

import hashlib
import pathlib

import pytest
import torch

from recipes.medblip.model.towers import interpolate_pos_embed
from recipes.medblip.model.weights import CheckpointError, load_pretrained, save_weights
from tests.conftest import serve_directory
from tests.test_medblip_model import tiny_batch, tiny_model


def blip_keys(vit_depth: int, text_layers: int) -> set[str]:
    """The keys of BLIP_Pretrain.state_dict() as salesforce/BLIP's vit.py / med.py / blip_pretrain.py name them."""
    wb = (".weight", ".bias")

    def vit(p):
        keys = {f"{p}.cls_token", f"{p}.pos_embed"} | {f"{p}.patch_embed.proj{s}" for s in wb}
        for i in range(vit_depth):
            for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                keys |= {f"{p}.blocks.{i}.{m}{s}" for s in wb}
        return keys | {f"{p}.norm{s}" for s in wb}

    def bert(p):
        keys = {f"{p}.embeddings.word_embeddings.weight", f"{p}.embeddings.position_embeddings.weight",
                f"{p}.embeddings.position_ids"} | {f"{p}.embeddings.LayerNorm{s}" for s in wb}
        for i in range(text_layers):
            for att in ("attention", "crossattention"):
                for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                    keys |= {f"{p}.encoder.layer.{i}.{att}.{m}{s}" for s in wb}
            for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
                keys |= {f"{p}.encoder.layer.{i}.{m}{s}" for s in wb}
        return keys

    keys = vit("visual_encoder") | vit("visual_encoder_m") | bert("text_encoder") | bert("text_encoder_m")
    keys |= bert("text_decoder.bert") | {f"text_decoder.cls.predictions.{k}" for k in
                                         ("bias", "decoder.weight", "decoder.bias")}
    keys |= {f"text_decoder.cls.predictions.transform.{m}{s}" for m in ("dense", "LayerNorm") for s in wb}
    for m in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m"):
        keys |= {f"{m}{s}" for s in wb}
    return keys | {"temp", "image_queue", "text_queue", "queue_ptr"}


def blip_checkpoint(model, path: pathlib.Path) -> dict:
    """Write `model` as BLIP's own code saves it: {'model': state_dict}, tied tensors under every name,
    med.py's position_ids buffers, a 0-dim temp."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["temp"] = sd["temp"].reshape([])
    for p in ("text_encoder", "text_encoder_m", "text_decoder.bert"):
        sd[f"{p}.embeddings.position_ids"] = torch.arange(model.cfg.text.max_position).expand(1, -1)
    torch.save({"model": sd}, path)
    return sd


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_model_keys_are_blips():
    model = tiny_model()
    assert set(model.state_dict()) | {f"{p}.embeddings.position_ids" for p in
                                      ("text_encoder", "text_encoder_m", "text_decoder.bert")} == blip_keys(2, 2)


def test_blip_layout_loads_clean_with_ties(tmp_path):
    src = tiny_model(seed=1)
    sd = blip_checkpoint(src, tmp_path / "model_base.pth")
    dst = tiny_model(seed=2)
    report = load_pretrained(dst, tmp_path / "model_base.pth")
    assert report.layout == "blip" and report.missing == [] and report.unexpected == []
    assert len(report.ignored) == 3 and all(k.endswith("position_ids") for k in report.ignored)
    assert not any("different values" in n for n in report.notes)
    assert_same_state(dst, src)
    assert dst.temp.shape == (1,) and dst.temp.item() == sd["temp"].item()
    # weight tying survives loading: the decoder still uses the encoder's tensors
    enc_q = dst.text_encoder.encoder.layer[1].crossattention.self.query.weight
    assert dst.text_decoder.bert.encoder.layer[1].crossattention.self.query.weight is enc_q
    emb = dst.text_encoder.embeddings.word_embeddings.weight
    assert dst.text_decoder.bert.embeddings.word_embeddings.weight is emb
    assert dst.text_decoder.cls.predictions.decoder.weight is emb  # BLIP HEAD: the LM head is the same Parameter
    assert not any("kept apart" in n for n in report.notes)
    assert torch.equal(enc_q, sd["text_decoder.bert.encoder.layer.1.crossattention.self.query.weight"])
    unique = len({id(t) for t in dst.state_dict(keep_vars=True).values()})
    assert report.loaded == unique


LM_HEAD = "text_decoder.cls.predictions.decoder.weight"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lm_head_tied_as_the_file_ties_it(tmp_path, suffix):
    """A file whose LM head differs from its word embeddings (BLIP's first commit, model.tie_lm_head=false, our runs
    before BLIP HEAD's tying) loads with the head kept apart, and says so; a tied file stays one Parameter."""
    untied = tiny_model(seed=1, tie_lm_head=False)
    head = untied.text_decoder.cls.predictions.decoder.weight
    assert not torch.equal(head, untied.text_encoder.embeddings.word_embeddings.weight)
    if suffix == ".pth":
        blip_checkpoint(untied, tmp_path / f"untied{suffix}")
    else:
        save_weights(untied, tmp_path / f"untied{suffix}")
    dst = tiny_model(seed=2)  # tie_lm_head: true (the default)
    trainable_tied = sum(p.numel() for p in dst.parameters() if p.requires_grad)
    report = load_pretrained(dst, tmp_path / f"untied{suffix}")
    assert report.missing == [] and report.unexpected == []
    assert any(LM_HEAD in n and "kept apart" in n for n in report.notes), report.notes
    assert not any("different values" in n for n in report.notes)
    assert_same_state(dst, untied)  # nothing of the file was overwritten by a tie
    dst_head = dst.text_decoder.cls.predictions.decoder.weight
    assert dst_head is not dst.text_encoder.embeddings.word_embeddings.weight and dst_head.requires_grad
    assert dst.text_decoder.cls.predictions.decoder.bias is dst.text_decoder.cls.predictions.bias
    vocab, hidden = dst_head.shape
    assert sum(p.numel() for p in dst.parameters() if p.requires_grad) == trainable_tied + vocab * hidden
    assert dst_head in set(dst.parameters())  # the optimizer (built after loading) sees the separate head

    save_weights(dst, tmp_path / f"again{suffix}")  # and it stays apart through our own files
    again = tiny_model(seed=3)
    report = load_pretrained(again, tmp_path / f"again{suffix}")
    assert any("kept apart" in n for n in report.notes) and report.missing == []
    assert_same_state(again, untied)

    tied_src = tiny_model(seed=4)  # a tied file into a model told not to tie: equal values, separate weights
    save_weights(tied_src, tmp_path / f"tied{suffix}")
    apart = tiny_model(seed=5, tie_lm_head=False)
    report = load_pretrained(apart, tmp_path / f"tied{suffix}")
    assert report.missing == [] and not any("kept apart" in n for n in report.notes)
    assert_same_state(apart, tied_src)
    assert apart.text_decoder.cls.predictions.decoder.weight is not apart.text_encoder.embeddings.word_embeddings.weight


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_is_exact(tmp_path, suffix):
    src = tiny_model(seed=1).train()
    src(tiny_batch(src))  # a queue with content and a moved pointer
    first = tiny_model(seed=2)
    blip_checkpoint(src, tmp_path / "blip.pth")
    load_pretrained(first, tmp_path / "blip.pth")
    save_weights(first, tmp_path / f"ours{suffix}")
    second = tiny_model(seed=3)
    report = load_pretrained(second, tmp_path / f"ours{suffix}")
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert_same_state(second, first)
    assert_same_state(second, src)
    assert int(second.queue_ptr) == 4
    assert second.text_decoder.bert.encoder.layer[0].output.dense.weight is \
        second.text_encoder.encoder.layer[0].output.dense.weight
    assert second.text_decoder.cls.predictions.decoder.weight is second.text_encoder.embeddings.word_embeddings.weight
    if suffix == ".pth":  # readable by BLIP's own loader: {'model': ...} with a 0-dim temp
        raw = torch.load(tmp_path / "ours.pth", weights_only=True)
        assert raw["model"]["temp"].shape == torch.Size([])


def test_pos_embed_interpolated_for_another_image_size(tmp_path):
    src = tiny_model(seed=1)  # 32 px / patch 8: a 4x4 grid
    blip_checkpoint(src, tmp_path / "ck.pth")
    dst = tiny_model(seed=2, vit={"image_size": 64})  # 8x8 grid
    report = load_pretrained(dst, tmp_path / "ck.pth")
    assert report.missing == [] and report.unexpected == []
    assert sum("interpolated from 17 to 65" in n for n in report.notes) == 2  # online and momentum ViT
    expected = interpolate_pos_embed(src.visual_encoder.pos_embed.detach(), dst.visual_encoder)
    assert torch.equal(dst.visual_encoder.pos_embed, expected)
    assert torch.equal(dst.visual_encoder.pos_embed[:, 0], src.visual_encoder.pos_embed[:, 0])  # class token kept
    flat = torch.ones(1, 17, 32)  # bicubic interpolation of a constant grid is that constant
    torch.testing.assert_close(interpolate_pos_embed(flat, dst.visual_encoder), torch.ones(1, 65, 32))
    dst(tiny_batch(dst))  # and the model runs at the new size


def test_queue_of_another_size_is_reinitialised(tmp_path):
    src = tiny_model(seed=1, queue_size=8).train()
    src(tiny_batch(src))
    blip_checkpoint(src, tmp_path / "ck.pth")
    dst = tiny_model(seed=2, queue_size=16)
    queue = dst.image_queue.clone()
    report = load_pretrained(dst, tmp_path / "ck.pth")
    assert any("queue of size 8" in n and "re-initialised" in n for n in report.notes)
    assert report.missing == ["image_queue", "text_queue", "queue_ptr"] and report.unexpected == []
    assert torch.equal(dst.image_queue, queue) and int(dst.queue_ptr) == 0
    assert torch.equal(dst.visual_encoder.pos_embed, src.visual_encoder.pos_embed)


def test_missing_unexpected_and_conflicting_keys_are_reported(tmp_path):
    src = tiny_model(seed=1)
    sd = blip_checkpoint(src, tmp_path / "ck.pth")
    del sd["text_decoder.bert.encoder.layer.0.attention.self.query.weight"]  # decoder self-attention: not tied
    sd["idx_queue"] = torch.zeros(1, 8, dtype=torch.long)  # BLIP retrieval checkpoints carry this
    sd["text_decoder.bert.encoder.layer.0.output.dense.bias"] = torch.randn(32)  # a tied name, another value
    torch.save({"model": sd}, tmp_path / "ck.pth")
    report = load_pretrained(tiny_model(seed=2), tmp_path / "ck.pth")
    assert report.missing == ["text_decoder.bert.encoder.layer.0.attention.self.query.weight"]
    assert report.unexpected == ["idx_queue"]
    # the last name wins, as when BLIP's load_state_dict copies every name into the one shared tensor
    assert any("text_decoder.bert.encoder.layer.0.output.dense.bias used" in n for n in report.notes)
    assert "missing (1, left as initialised)" in report.summary()
    with pytest.raises(CheckpointError, match="strict loading failed"):
        load_pretrained(tiny_model(seed=2), tmp_path / "ck.pth", strict=True)


def test_refuses_checkpoints_that_do_not_fit(tmp_path):
    blip_checkpoint(tiny_model(seed=1, text={"hidden": 64, "heads": 2}), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="does not fit this architecture .*shape mismatches"):
        load_pretrained(tiny_model(seed=2), tmp_path / "wide.pth")
    blip_checkpoint(tiny_model(seed=1, vit={"depth": 3}), tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="does not fit this architecture: .*visual_encoder.blocks.2"):
        load_pretrained(tiny_model(seed=2), tmp_path / "deep.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no key matches"):
        load_pretrained(tiny_model(seed=2), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tiny_model(seed=2), tmp_path / "absent.pth")


class _Evil:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"temp": torch.ones([])}, "payload": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_pretrained(tiny_model(), tmp_path / "evil.pth")
    assert not marker.exists()


def test_sha256_check_and_url(tmp_path, monkeypatch):
    src = tiny_model(seed=1)
    blip_checkpoint(src, tmp_path / "model_base.pth")
    digest = hashlib.sha256((tmp_path / "model_base.pth").read_bytes()).hexdigest()
    load_pretrained(tiny_model(seed=2), tmp_path / "model_base.pth", sha256=digest)
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_pretrained(tiny_model(seed=2), f"{tmp_path / 'model_base.pth'}#sha256={'0' * 64}")
    # a URL is downloaded once into the torch hub cache and checked
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with serve_directory(tmp_path) as base:
        dst = tiny_model(seed=2)
        report = load_pretrained(dst, f"{base}/model_base.pth#sha256={digest}")
    assert report.missing == [] and (tmp_path / "torch_home" / "hub" / "checkpoints" / "model_base.pth").is_file()
    assert_same_state(dst, src)


def _hf_config(layer_norm_eps: float = 1e-6):
    from transformers import BlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, layer_norm_eps=layer_norm_eps)
    text = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                encoder_hidden_size=32, max_position_embeddings=64)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


def test_transformers_layout(tmp_path):
    from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

    torch.manual_seed(0)
    hf = BlipForImageTextRetrieval(_hf_config()).eval()
    hf.save_pretrained(tmp_path / "itm")
    assert list((tmp_path / "itm").glob("*.safetensors"))
    model = tiny_model(seed=1).eval()
    report = load_pretrained(model, tmp_path / "itm")
    assert report.layout == "transformers" and report.unexpected == []
    assert any("visual_encoder_m: not in the checkpoint, copied" in n for n in report.notes)
    # a retrieval model has no decoder: its self-attention and LM-head transform stay as initialised, while the LM
    # head's output weight is the (tied, BLIP HEAD) word embedding the retrieval encoder brings
    assert {"text_decoder.bert.encoder.layer.0.attention.self.query.weight",
            "text_decoder.cls.predictions.transform.dense.weight"} <= set(report.missing)
    assert not any(m.startswith("text_decoder.cls.predictions.decoder") for m in report.missing)
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight,
                       hf.text_encoder.embeddings.word_embeddings.weight)
    assert not any(m.startswith(("visual_encoder", "text_encoder", "vision_proj", "itm_head")) for m in report.missing)
    assert torch.equal(model.visual_encoder.blocks[1].attn.proj.weight,
                       hf.vision_model.encoder.layers[1].self_attn.projection.weight)
    assert torch.equal(model.visual_encoder_m.pos_embed, hf.vision_model.embeddings.position_embedding)
    pixels = tiny_batch(model)["image"]
    with torch.no_grad():
        ours = model.visual_encoder.forward_features(pixels)
        theirs = hf.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        ids = model.tokenize(["ct of the head"])
        torch.testing.assert_close(model.text_features(**ids)[0], torch.nn.functional.normalize(
            hf.text_proj(hf.text_encoder(**ids).last_hidden_state[:, 0]), dim=-1)[0], rtol=0, atol=1e-6)

    torch.manual_seed(0)
    BlipForQuestionAnswering(_hf_config()).save_pretrained(tmp_path / "vqa")
    hf_vqa = BlipForQuestionAnswering.from_pretrained(tmp_path / "vqa")
    model = tiny_model(seed=1)
    report = load_pretrained(model, tmp_path / "vqa")
    assert set(report.missing) == {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
                                   "itm_head.weight", "itm_head.bias", "image_queue", "text_queue", "queue_ptr",
                                   "temp"}
    # transformers saves the tied LM head once: it comes from the decoder's word embeddings
    assert torch.equal(model.text_decoder.cls.predictions.decoder.weight,
                       hf_vqa.text_decoder.bert.embeddings.word_embeddings.weight)
