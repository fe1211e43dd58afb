"""MedBLIP sample decoding: shard sample -> normalised image tensor + pre_caption'd text; batches with tokens.

Training images follow BLIP's pretraining transform (RandomResizedCrop bicubic, horizontal flip,
RandomAugment(2, 5) over BLIP's ten ops, normalisation); evaluation images are a bicubic resize to
size x size from the full decode, exactly as BLIP's test transform (reduced-size JPEG decoding, `image.draft`,
speeds up training only). All randomness comes from torch's global generator, which framework.streams.ShardStream seeds
per (seed, epoch, rank, worker), so augmented batches are reproducible and resumable.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from framework.streams import DecodeError
from recipes.common.text import pre_caption

MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP (CLIP) normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SAMPLE_KEYS = ("|".join(IMAGE_KEYS), "txt")  # what decode needs in a shard sample

# BLIP's RandomAugment (transform/randaugment.py): N ops drawn with replacement from this list, each
# applied with probability 0.5 at level M of 10; geometric ops fill with grey 128, as BLIP's cv2 code does.
RANDAUGMENT_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                   "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


RANDAUGMENT_N, RANDAUGMENT_M = 2, 5  # BLIP's RandomAugment(2, 5, ...) in every one of its configs: ops, level
RETIRED_IMAGE_KEYS = ("image.randaugment_n", "image.randaugment_m")  # settings once; BLIP's constants now


@dataclass
class ImageConfig:
    size: int = 224  # output side (square)
    augment: bool = True  # training-time augmentation; evaluation decoding never augments
    scale_min: float = 0.5  # RandomResizedCrop area range (scale_min, 1); BLIP: 0.5 fine-tuning, 0.2 pretrain.py
    hflip: bool = True  # random horizontal flip (BLIP does it; note radiology captions often say left/right)
    randaugment: bool = True  # BLIP's RandomAugment(RANDAUGMENT_N ops per image, level RANDAUGMENT_M of 10)
    draft: bool = True  # training: reduced-size JPEG decode (DCT scaling), never below what the crop needs


def _rand_sign(value: float) -> float:
    return -value if torch.rand(()) < 0.5 else value


def _affine(img: Image.Image, a: float, b: float, c: float, d: float, e: float, f: float) -> Image.Image:
    """PIL affine with output->input coefficients, bilinear, grey fill (BLIP's cv2.warpAffine equivalent)."""
    return img.transform(img.size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR,
                         fillcolor=_FILL)


def apply_op(img: Image.Image, name: str, level: float) -> Image.Image:
    """One of BLIP's RandomAugment ops at `level` (0..10) on an RGB PIL image (signs drawn at random)."""
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name in ("Brightness", "Sharpness"):  # BLIP: factor = level/10 * 1.8 + 0.1 (M=5 gives 1.0: a no-op)
        factor = level / _MAX_LEVEL * 1.8 + 0.1
        enhancer = ImageEnhance.Brightness if name == "Brightness" else ImageEnhance.Sharpness
        return enhancer(img).enhance(factor)
    if name in ("ShearX", "ShearY"):  # BLIP: shear factor level/10 * 0.3 about the top-left corner
        s = _rand_sign(level / _MAX_LEVEL * 0.3)
        return _affine(img, 1, -s, 0, 0, 1, 0) if name == "ShearX" else _affine(img, 1, 0, 0, -s, 1, 0)
    if name in ("TranslateX", "TranslateY"):  # BLIP: level/10 * 10 pixels (absolute, not a fraction)
        t = _rand_sign(level / _MAX_LEVEL * 10.0)
        return _affine(img, 1, 0, t, 0, 1, 0) if name == "TranslateX" else _affine(img, 1, 0, 0, 0, 1, t)
    if name == "Rotate":  # BLIP: level/10 * 30 degrees about the centre
        return img.rotate(_rand_sign(level / _MAX_LEVEL * 30.0), resample=Image.BILINEAR, fillcolor=_FILL)
    raise ValueError(f"unknown RandomAugment op {name!r} (known: {', '.join(RANDAUGMENT_OPS)})")


def rand_augment(img: Image.Image, n: int, m: int) -> Image.Image:
    """BLIP's RandomAugment(n, m): n ops drawn with replacement, each applied with probability 0.5."""
    ops = torch.randint(len(RANDAUGMENT_OPS), (n,)).tolist()
    for i in ops:
        if torch.rand(()) > 0.5:
            continue
        img = apply_op(img, RANDAUGMENT_OPS[i], float(m))
    return img


def open_image(data: bytes, min_side: int = 0) -> Image.Image:
    """Image bytes -> RGB PIL image; with min_side, JPEGs decode at the smallest DCT scale keeping both
    sides >= min_side (4-5x faster for large images). Raises for undecodable bytes."""
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit greyscale: scale by its maximum, not clip
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        img = Image.fromarray((arr * (255.0 / top) if top > 255 else arr).clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB") if img.mode != "RGB" else img


def image_transform(cfg: ImageConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float Tensor[3, size, size] (BLIP's train or test transform)."""
    normalize = transforms.Normalize(MEAN, STD)
    if train and cfg.augment:
        crop = transforms.RandomResizedCrop(cfg.size, scale=(cfg.scale_min, 1.0),
                                            interpolation=InterpolationMode.BICUBIC)

        def train_tf(img: Image.Image) -> torch.Tensor:
            img = crop(img)
            if cfg.hflip and torch.rand(()) < 0.5:
                img = TF.hflip(img)
            if cfg.randaugment:
                img = rand_augment(img, RANDAUGMENT_N, RANDAUGMENT_M)
            return normalize(TF.to_tensor(img))

        return train_tf

    def test_tf(img: Image.Image) -> torch.Tensor:
        img = img.resize((cfg.size, cfg.size), Image.BICUBIC)
        return normalize(TF.to_tensor(img))

    return test_tf


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value or "")


def draft_side(cfg: ImageConfig, train: bool) -> int:
    """Smallest side a JPEG may be decoded at (0: full size). Training with image.draft decodes no smaller than the
    largest region the transform may take (a crop of area scale_min spans ~sqrt(scale_min) of each side);
    evaluation always decodes at full size, so its pixels are BLIP's (full decode + bicubic resize)."""
    if not (train and cfg.draft):
        return 0
    return math.ceil(cfg.size / math.sqrt(cfg.scale_min)) if cfg.augment else cfg.size


def make_decode(cfg: ImageConfig, train: bool, max_words: int = 30) -> Callable[[dict], Optional[dict]]:
    """Raw WebDataset sample -> {"image": Tensor[3,size,size], "caption": pre_caption'd str, "key": str}.

    Captions go through pre_caption(max_words) (BLIP pretraining: 30). Returns None for an empty caption
    (skipped and counted by the stream); raises DecodeError (naming SAMPLE_KEYS) for a sample without an image
    or a txt key, and PIL's error for an undecodable image.
    """
    tf = image_transform(cfg, train)
    min_side = draft_side(cfg, train)

    def decode(sample: dict) -> Optional[dict]:
        key = next((k for k in IMAGE_KEYS if sample.get(k) is not None), None)
        if key is None or "txt" not in sample:  # shards of another kind: the stream reports the keys it needs
            raise DecodeError(f"sample {sample.get('__key__')!r} has no {'caption' if key else 'image'}",
                              expected=SAMPLE_KEYS)
        caption = pre_caption(_text(sample.get("txt")), max_words)
        if not caption:
            return None
        img = open_image(sample[key], min_side)
        return {"image": tf(img), "caption": caption, "key": str(sample.get("__key__", ""))}

    return decode


def make_collate(tokenizer: Any, max_len: int, padding: str = "longest") -> Callable[[list[dict]], dict]:
    """Samples -> {"image": [B,3,H,W], "input_ids": [B,L], "attention_mask": [B,L], "keys", "captions"}
    (L = longest caption in the batch, at most max_len tokens; padding="max_length": L = max_len)."""

    def collate(samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        tok = tokenizer(captions, padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": tok["input_ids"],
                "attention_mask": tok["attention_mask"], "keys": [s["key"] for s in samples],
                "captions": captions}

    return collate
