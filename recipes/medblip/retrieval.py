"""BLIP's retrieval evaluation of a DAPT/PSD model on held-out image-caption pairs (data.val shards).

`python launch/evaluate.py --recipe recipes/medblip/retrieval.yaml --checkpoint RUN` reads the pairs of `data.val`
(all of them, or a seeded sample of `retrieval.max_pairs`, as PMC-CLIP and M3AE sample 2,000 ROCO pairs), ranks by
ITC, re-scores the top `retrieval.k_test` by ITM (recipes/common/retrieval.py) and writes retrieval.json with
image->text and text->image R@1/5/10 for both ITC alone and ITC + ITM.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from framework.config import ConfigError
from framework.distributed import say
from framework.files import atomic_write_text
from framework.loader import make_loader
from framework.run_env import RunEnv
from framework.shards import count_samples, expand_shards
from framework.streams import SKIPPED, ShardStream
from framework.task import Recipe, Task
from recipes.common.image_text import make_collate, make_decode
from recipes.common.retrieval import itm_rerank, recalls
from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.weights import load_pretrained
from recipes.medblip.pretrain import PretrainConfig, build_model
from recipes.medblip.pretrain.validation import caption_ids


@dataclass
class RetrievalConfig:
    """The `retrieval:` section."""

    k_test: int = 128  # candidates re-scored by ITM per query (BLIP: 256 on COCO, 128 on Flickr30k)
    max_pairs: Optional[int] = 2000  # a seeded sample of the held-out pairs; None = all of data.val
    seed: int = 0  # which pairs the sample holds
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 32  # images per forward, and (query, candidate) pairs per ITM call x 8

    def check(self) -> None:
        if self.k_test < 1 or self.batch_size < 1:
            raise ConfigError("retrieval.k_test and retrieval.batch_size must be >= 1")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ConfigError(f"retrieval.max_pairs must be >= 2 or null, got {self.max_pairs}")
        if not self.recall_k or min(self.recall_k) < 1:
            raise ConfigError(f"retrieval.recall_k must list integers >= 1, got {self.recall_k}")


@dataclass
class RetrievalRecipeConfig(PretrainConfig):
    """retrieval.yaml: the pretraining sections (model shape, image, data.val) + retrieval:."""

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


def _sample_rank(key: str, seed: int) -> float:
    """A seeded, order-free position in [0, 1) per pair: the sample is the same whatever order shards are read."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big") / 2 ** 64


@torch.no_grad()
def held_out_features(model: MedBlipPretrain, cfg: RetrievalRecipeConfig) -> dict[str, Any]:
    """ITC features, ViT tokens (CPU) and tokenised captions of the sampled data.val pairs."""
    if not cfg.data.val:
        raise ConfigError(f"{cfg.source}: data.val is not set: retrieval needs held-out image-caption shards")
    r = cfg.retrieval
    urls = expand_shards(cfg.data.val)
    total = count_samples(urls)
    keep = 1.0 if r.max_pairs is None else min(1.0, 1.25 * r.max_pairs / max(total, 1))  # oversample, trim below
    stream = ShardStream(urls, make_decode(cfg.image, train=False, max_words=30),
                         make_collate(model.tokenizer, cfg.model.max_text_len), r.batch_size, seed=r.seed,
                         shuffle_buffer=0)
    stream.set_epoch(0)
    device = next(model.parameters()).device
    rows: list[tuple[float, str, str, torch.Tensor, torch.Tensor]] = []
    for batch in make_loader(stream, 0):
        batch.pop(SKIPPED, None)
        chosen = [i for i, k in enumerate(batch["keys"]) if _sample_rank(k, r.seed) < keep]
        if not chosen:
            continue
        image = batch["image"][chosen].to(device)
        embeds = model.image_embeddings(image)
        for j, i in enumerate(chosen):
            rows.append((_sample_rank(batch["keys"][i], r.seed), batch["keys"][i], batch["captions"][i],
                         embeds[j].cpu(), image[j].cpu()))
    rows.sort(key=lambda row: row[0])
    rows = rows[: r.max_pairs] if r.max_pairs else rows
    if len(rows) < 2:
        raise ConfigError(f"data.val: {len(rows)} usable pair(s): retrieval needs at least 2")
    captions = [row[2] for row in rows]
    embeds = torch.stack([row[3] for row in rows])
    image_feat = torch.cat([model.image_features(torch.stack([row[4] for row in rows[s:s + r.batch_size]]).to(device))
                            for s in range(0, len(rows), r.batch_size)])
    tok = model.tokenize(captions, device)
    text_feat = torch.cat([model.text_features(tok["input_ids"][s:s + r.batch_size],
                                               tok["attention_mask"][s:s + r.batch_size])
                           for s in range(0, len(rows), r.batch_size)])
    return {"keys": [row[1] for row in rows], "captions": captions, "image_embeds": embeds, "image_feat": image_feat,
            "text_feat": text_feat, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "total": total}


def itm_scorer(model: MedBlipPretrain, feats: dict[str, Any]):
    """(image idx, text idx) -> ITM match logits, BLIP's itm_head(...)[:, 1] on the [ENC] text over image tokens."""
    device = next(model.parameters()).device

    def score(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        embeds = feats["image_embeds"][img.cpu()].to(device)
        return model.itm_logits(embeds, feats["input_ids"][txt.to(device)],
                                feats["attention_mask"][txt.to(device)])[:, 1]
    return score


@torch.no_grad()
def evaluate_retrieval(model: MedBlipPretrain, cfg: RetrievalRecipeConfig) -> dict[str, Any]:
    """ITC-only and ITC + ITM (BLIP's protocol) recall@k on the held-out pairs."""
    model.eval()
    started = time.time()
    feats = held_out_features(model, cfg)
    sims = feats["image_feat"] @ feats["text_feat"].t()
    ids = caption_ids(feats["captions"]).to(sims.device)  # identical captions are each other's positives
    r = cfg.retrieval
    itc = recalls(sims, sims.t(), r.recall_k, ids, ids)
    i2t, t2i = itm_rerank(sims, itm_scorer(model, feats), r.k_test, pairs_per_call=8 * r.batch_size)
    itm = recalls(i2t, t2i, r.recall_k, ids, ids)
    return {"pairs": len(feats["keys"]), "held_out_total": feats["total"], "k_test": min(r.k_test, len(feats["keys"])),
            "sample": {"max_pairs": r.max_pairs, "seed": r.seed}, "itc_itm": itm, "itc": itc,
            "protocol": "salesforce/BLIP train_retrieval.py: ITC top-k re-scored by ITM match logit + ITC "
                        "similarity, others -100", "seconds": round(time.time() - started, 1)}


def run(cfg: RetrievalRecipeConfig, checkpoint: str, out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Load `checkpoint`, evaluate, write out_dir/retrieval.json and print the recalls."""
    model = build_model(cfg, load_weights=False)
    say(load_pretrained(model, checkpoint).summary())
    if "itm" not in model.objectives:
        raise ConfigError(f"{cfg.source}: objectives: itm is disabled: BLIP's protocol re-scores by ITM")
    model.to(device)
    doc = evaluate_retrieval(model, cfg) | {"checkpoint": checkpoint, "data_val": cfg.data.val}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "retrieval.json", json.dumps(doc, indent=2) + "\n")
    ks = cfg.retrieval.recall_k
    print(f"retrieval on {doc['pairs']} held-out pairs (of {doc['held_out_total']}), k_test {doc['k_test']}")
    for name in ("itc", "itc_itm"):
        m = doc[name]
        print(f"{'ITC + ITM' if name == 'itc_itm' else 'ITC only':<10} i2t "
              + " ".join(f"R@{k} {100 * m[f'i2t_r{k}']:.1f}" for k in ks) + "  t2i "
              + " ".join(f"R@{k} {100 * m[f't2i_r{k}']:.1f}" for k in ks))
    print(f"wrote {out_dir / 'retrieval.json'}", flush=True)
    return doc


def config_for(recipe: str, checkpoint: Optional[str], overrides: list[str]) -> RetrievalRecipeConfig:
    """The retrieval config for `checkpoint`: the recipe, with model: and image.size of the checkpoint's own run
    (its config.yaml) when it has one, so a tiny or a base run is evaluated at its own shape."""
    import yaml

    from framework.config import apply_overrides, config_from_dict, config_to_dict, load_config
    from framework.rundir import run_dir_of

    cfg = load_config(recipe, overrides)
    where = checkpoint or cfg.run.dir
    if not Path(where).exists() and not str(where).startswith(("http://", "https://")):
        raise FileNotFoundError(f"checkpoint not found: {where} (give a DAPT/PSD run directory or a weights file)")
    run_dir = run_dir_of(where)
    if run_dir is None:
        return cfg
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    data = config_to_dict(load_config(recipe))
    data["model"] = saved.get("model", data["model"])
    data["image"] = {**data["image"], "size": saved.get("image", {}).get("size", data["image"]["size"])}
    say(f"model: the checkpoint's own shape from {run_dir / 'config.yaml'}")
    return config_from_dict(apply_overrides(data, overrides, recipe), recipe)


def build(cfg: RetrievalRecipeConfig, env: RunEnv) -> Task:
    raise ConfigError(f"{cfg.source}: retrieval.yaml evaluates, it does not train: python launch/evaluate.py "
                      f"--recipe {cfg.source} --checkpoint RUN")


RECIPE = Recipe(config=RetrievalRecipeConfig, objectives=("itc", "itm", "lm"), build=build)
