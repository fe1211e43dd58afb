"""recipes/common/text.py and data.py: BLIP's text normalisation, image decoding/augmentation, batching."""
from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from PIL import Image

from recipes.common.image_text import (
    MEAN,
    RANDAUGMENT_OPS,
    STD,
    ImageConfig,
    apply_op,
    draft_side,
    make_collate,
    make_decode,
    open_image,
)
from recipes.common.text import pre_caption, pre_question

# ----------------------------------------------------------------------------- text


def blip_pre_caption(caption, max_words=50):  # salesforce/BLIP data/utils.py, verbatim logic (the oracle)
    caption = re.sub(r"([.!\"()*#:;~])", ' ', caption.lower())
    caption = re.sub(r"\s{2,}", ' ', caption)
    caption = caption.rstrip('\n')
    caption = caption.strip(' ')
    caption_words = caption.split(' ')
    if len(caption_words) > max_words:
        caption = ' '.join(caption_words[:max_words])
    return caption


def blip_pre_question(question, max_ques_words=50):
    question = re.sub(r"([.!\"()*#:;~])", '', question.lower())
    question = question.rstrip(' ')
    question_words = question.split(' ')
    if len(question_words) > max_ques_words:
        question = ' '.join(question_words[:max_ques_words])
    return question


@pytest.mark.parametrize("raw,expected", [
    ("A CT scan (axial) shows: a  MASS!!  in the left lung.", "a ct scan axial shows a mass in the left lung"),
    ("X-ray, AP view.", "x-ray, ap view"),  # commas and hyphens survive
    ("Line one.\nLine two", "line one line two"),
    ('T2 "FLAIR"; arrow* #3 ~ note', "t2 flair arrow 3 note"),
    ("   ", ""),
])
def test_pre_caption_hand_computed(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words() -> None:
    words = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(words) == " ".join(f"w{i}" for i in range(30))  # default 30 (BLIP pretraining)
    assert pre_caption("one two three four", max_words=2) == "one two"


@pytest.mark.parametrize("raw,expected", [
    ("Is there a mass in the (left) lung?", "is there a mass in the left lung?"),  # '?' kept
    ("What is this?  ", "what is this?"),
    ("Is this an MRI.", "is this an mri"),
    ("Where: is it", "where is it"),  # deleted, not replaced by a space
])
def test_pre_question_hand_computed(raw: str, expected: str) -> None:
    assert pre_question(raw) == expected


def test_text_matches_blip_reference_on_random_strings() -> None:
    rng = random.Random(0)
    alphabet = "abcXYZ .!\"()*#:;~,-?\n\t'/0123456789"
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        n = rng.randint(1, 12)
        assert pre_caption(s, n) == blip_pre_caption(s, n)
        assert pre_question(s, n) == blip_pre_question(s, n)


# ----------------------------------------------------------------------------- images


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1).astype(np.uint8)
    arr[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = [200, 50, 50]
    return arr


def _unnormalise(t: torch.Tensor) -> torch.Tensor:
    return t * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]


def test_decode_normalises_with_blip_mean_std() -> None:
    colour = (10, 128, 250)
    sample = {"__key__": "k1", "png": _png(Image.new("RGB", (50, 40), colour)), "txt": b"Axial CT."}
    out = make_decode(ImageConfig(size=32, augment=False), train=False)(sample)
    assert out["key"] == "k1" and out["caption"] == "axial ct"
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
    for c in range(3):  # (v/255 - mean) / std, by hand
        assert torch.allclose(out["image"][c], torch.full((32, 32), (colour[c] / 255 - MEAN[c]) / STD[c]), atol=1e-6)


def test_greyscale_and_rgba_become_rgb() -> None:
    grey = Image.fromarray(_smooth(40, 40)[..., 0], "L")
    rgba = Image.new("RGBA", (40, 40), (30, 60, 90, 128))
    decode = make_decode(ImageConfig(size=16, augment=False), train=False)
    g = _unnormalise(decode({"__key__": "g", "png": _png(grey), "txt": "x"})["image"])
    assert torch.allclose(g[0], g[1], atol=1e-6) and torch.allclose(g[1], g[2], atol=1e-6)
    r = _unnormalise(decode({"__key__": "r", "png": _png(rgba), "txt": "x"})["image"])
    assert torch.allclose(r[:, 0, 0], torch.tensor([30, 60, 90]) / 255, atol=1e-6)
    sixteen = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))  # I;16, max 65520
    assert open_image(_png(sixteen)).getextrema()[0] == (0, 255)  # scaled, not clipped to white


def test_eval_decode_is_deterministic_and_train_decode_follows_the_torch_seed() -> None:
    sample = {"__key__": "a", "jpg": _jpeg(_smooth(120, 160)), "txt": b"a chest film"}
    ev = make_decode(ImageConfig(size=48), train=False)
    assert torch.equal(ev(sample)["image"], ev(sample)["image"])
    tr = make_decode(ImageConfig(size=48, hflip=True), train=True)
    torch.manual_seed(3)
    a = tr(sample)["image"]
    torch.manual_seed(3)
    b = tr(sample)["image"]
    torch.manual_seed(4)
    c = tr(sample)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 48, 48)


def _blip_test_transform(data: bytes, size: int) -> torch.Tensor:
    """BLIP's evaluation pixels by hand: the whole JPEG decoded, bicubic resize, BLIP's normalisation."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_evaluation_decodes_whole_jpegs_and_only_training_drafts() -> None:
    data = _jpeg(_smooth(600, 800))
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (64, 64))
    assert img.size == (100, 75)  # a draft decode would be at 1/8 scale, both sides still >= 64
    sample = {"__key__": "d", "jpg": data, "txt": "x"}
    exact = _blip_test_transform(data, 64)
    for draft in (True, False):  # evaluation ignores image.draft: BLIP's pixels (to float rounding)
        ev = make_decode(ImageConfig(size=64, draft=draft), train=False)(sample)["image"]
        torch.testing.assert_close(ev, exact, rtol=0, atol=1e-6)
    fast = make_decode(ImageConfig(size=64, augment=False, draft=True), train=True)(sample)["image"]
    full = make_decode(ImageConfig(size=64, augment=False, draft=False), train=True)(sample)["image"]
    torch.testing.assert_close(full, exact, rtol=0, atol=1e-6)
    assert (fast - exact).abs().max() > 0.05 and (fast - exact).abs().mean() < 0.02  # drafted, and close
    assert draft_side(ImageConfig(size=224, scale_min=0.5), train=True) == 317  # 224 / sqrt(0.5), rounded up
    assert draft_side(ImageConfig(size=224, augment=False), train=True) == 224
    assert draft_side(ImageConfig(size=224), train=False) == 0
    assert draft_side(ImageConfig(size=224, draft=False), train=True) == 0


def test_empty_caption_is_none_and_bad_image_raises() -> None:
    decode = make_decode(ImageConfig(size=16), train=True)
    assert decode({"__key__": "e", "jpg": _jpeg(_smooth(20, 20)), "txt": b" ... !! "}) is None
    with pytest.raises(Exception):
        decode({"__key__": "bad", "jpg": b"not an image", "txt": b"caption"})
    with pytest.raises(ValueError, match="no image"):
        decode({"__key__": "noimg", "txt": b"caption"})


def test_randaugment_ops_match_blip_levels() -> None:
    arr = np.zeros((20, 20, 3), np.uint8)
    arr[:, 10:] = 255  # left half black, right half white
    img = Image.fromarray(arr)
    for name in ("Brightness", "Sharpness"):  # BLIP's level 5: factor 5/10 * 1.8 + 0.1 = 1.0, a no-op
        assert np.array_equal(np.asarray(apply_op(img, name, 5.0)), arr)
    torch.manual_seed(0)
    moved = np.asarray(apply_op(img, "TranslateX", 5.0))  # 5 pixels, grey 128 filling the uncovered side
    shift = 5 if (moved[:, -5:] == 128).all() else -5
    assert (np.roll(arr, -shift, axis=1)[:, 5:-5] == moved[:, 5:-5]).all()
    assert (moved[:, -5:] == 128).all() if shift == 5 else (moved[:, :5] == 128).all()
    rotated = np.asarray(apply_op(img, "Rotate", 5.0))  # 15 degrees: grey corners
    assert (rotated[0, 0] == 128).all() and rotated.shape == arr.shape
    for name in RANDAUGMENT_OPS:
        assert apply_op(img, name, 5.0).size == img.size


# ----------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(ROOT / "recipes" / "medblip" / "assets" / "bert-base-uncased-vocab.txt"))


def test_collate_pads_to_longest_and_truncates(tokenizer) -> None:
    decode = make_decode(ImageConfig(size=16, augment=False), train=False)
    img = _jpeg(_smooth(20, 20))
    captions = ["ct", "axial ct of the chest shows a mass", " ".join(["lung"] * 40)]
    samples = [decode({"__key__": f"k{i}", "jpg": img, "txt": c}) for i, c in enumerate(captions)]
    batch = make_collate(tokenizer, max_len=12)(samples)
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["keys"] == ["k0", "k1", "k2"]
    assert batch["input_ids"].shape == (3, 12)  # longest (the 30-word caption) truncated to 12
    assert batch["attention_mask"].sum(1).tolist() == [3, 10, 12]  # [CLS] ct [SEP]; 8 words + 2; truncated
    assert (batch["input_ids"][0, 3:] == tokenizer.pad_token_id).all()
    short = make_collate(tokenizer, max_len=30)(samples[:2])
    assert short["input_ids"].shape == (2, 10)  # padding="longest": no padding to max_len


def test_dapt_yaml_sections_validate() -> None:
    from framework.config import from_dict

    data = yaml.safe_load((ROOT / "recipes" / "medblip" / "dapt.yaml").read_text())
    image = from_dict(ImageConfig, data["image"], "image")
    assert image.size == 224 and image.augment
    assert data["train"]["lr"] == 4.0e-7 and data["train"]["grad_accum"] == 4 and data["data"]["batch_size"] == 16
    from recipes.medblip.model.config import ModelConfig

    model = from_dict(ModelConfig, data["model"], "model")
    assert model.queue_size == 256 and model.alpha == 0.0 and model.grad_checkpointing_vit
    assert model.queue_size % data["data"]["batch_size"] == 0
    from framework.config import load_config

    cfg = load_config(ROOT / "recipes" / "medblip" / "dapt.yaml")
    assert cfg.image == image and cfg.model.queue_size == 256
