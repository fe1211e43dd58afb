"""Tiny MedBLIP models and phantom shards for the CapFilt tests (ViT/BERT width 32, a ~60-word vocabulary)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from corpora.phantoms import PhantomSpec, demo_vocab, write_caption_shards
from recipes.medblip.capfilt.bootstrap import CapFiltOptions
from recipes.medblip.capfilt.generation import SamplingOptions
from recipes.medblip.capfilt.writing import FilterSettings
from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.config import ModelConfig
from recipes.medblip.model.weights import save_weights

SPEC = PhantomSpec(seed=5, image_size=32, train_captions=12, val_captions=4, samples_per_shard=5,
                   vqa_train_images=4, vqa_test_images=2)
RECIPE = "recipes/medblip/dapt.yaml"
# The random tiny model's ITM match probabilities sit at 0.354-0.359 (near ITM's 1/3 prior, far below BLIP's 0.5,
# which would remove every caption and leave the tests comparing empty outputs): this keeps some captions and
# removes others; the tests that need both assert that both happen.
THRESHOLD = 0.357


def vocab(folder: Path) -> Path:
    path = folder / "vocab.txt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(demo_vocab(SPEC)) + "\n")
    return path


def overrides(folder: Path) -> list[str]:
    """The tiny shape as dotted overrides of dapt.yaml (for weights outside a run directory)."""
    return ["model.preset=tiny", "image.size=32", "model.queue_size=8", "model.embed_dim=16",
            f"model.tokenizer={vocab(folder)}"]


def model(folder: Path, seed: int = 0) -> MedBlipPretrain:
    torch.manual_seed(seed)
    cfg = ModelConfig(preset="tiny", queue_size=8, embed_dim=16, tokenizer=str(vocab(folder)))
    return MedBlipPretrain(cfg, seed=seed).eval()


def weights(folder: Path, seed: int = 0) -> Path:
    """A random tiny model saved in BLIP's layout ({'model': state_dict})."""
    path = folder / f"tiny{seed}.pth"
    if not path.is_file():
        save_weights(model(folder, seed), path)
    return path


def shards(folder: Path, n: int = 12, split: str = "train") -> Path:
    """n phantom caption samples in shards of 5 (png + txt + json with modality)."""
    out = folder / f"in-{split}-{n}"
    if not out.is_dir():
        write_caption_shards(out, SPEC, split, n)
    return out


def options(folder: Path, out: Path, inputs: Path, *, k: int = 2, threshold: float = THRESHOLD, seed: int = 0,
            batch_size: int = 4, captioner: Any = None, filter_model: Any = None, **kw: Any) -> CapFiltOptions:
    """CapFilt of `inputs` into `out` with the tiny random model (or the given runs), fp32 on the CPU."""
    w = str(weights(folder))
    settings = dict(recipe=RECIPE, overrides=overrides(folder), precision="fp32", device="cpu")
    return CapFiltOptions(shards=[str(inputs)], out=str(out), captioner=str(captioner or w),
                          filter=str(filter_model or captioner or w),
                          settings=FilterSettings(SamplingOptions(k=k), threshold, seed), batch_size=batch_size,
                          **{**settings, **kw})
