"""Validation during DAPT/PSD: held-out ITC/ITM/LM losses, ITC retrieval recall@k and sample captions on data.val.

`make_pretrain_evaluator(cfg, tokenizer)` returns the `Task.evaluate` callable (or None without `data.val`).
Each rank evaluates its share of the validation shards; losses are summed and features gathered across ranks,
so every rank returns the same numbers. The model's training state is left exactly as it was: the forward
runs in eval mode (which never writes the ITC feature queues), the ITM-negative generator is re-seeded for the
evaluation and restored afterwards, and the train/eval mode is restored.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from framework.config import Config, ConfigError
from framework.loader import make_loader
from framework.shards import count_samples, expand_shards
from framework.streams import SKIPPED, ShardStream
from recipes.common.image_text import make_collate, make_decode
from recipes.medblip.model.blip_pretrain import MedBlipPretrain

LOSS_NAMES = ("itc", "itm", "lm")


@dataclass
class ValidationConfig:
    """The `validation:` section of the MedBLIP pretraining recipes (all optional)."""

    max_batches: Optional[int] = None  # per rank; None = the whole of data.val once
    batch_size: Optional[int] = None  # None = data.batch_size (ITC/ITM losses depend on the in-batch negatives)
    recall_k: list[int] = field(default_factory=lambda: [1, 5])
    captions: int = 4  # sample captions shown in TensorBoard (rank 0, first batch); 0 = none
    caption_beams: int = 3  # BLIP's deterministic captioning: beam search with 3 beams
    caption_min_len: int = 5  # tokens, [DEC] included (BLIP's generate: min_length 5)
    itm_seed: int = 0  # ITM negatives are drawn from this seed at every evaluation (comparable across steps)
    num_workers: Optional[int] = None  # None = data.num_workers (capped by the shards each rank reads)
    # BLIP's retrieval protocol (ITC top k re-scored by ITM) on the first itm_rerank_pairs pairs; None = ITC only.
    # Off by default: it runs 2 x k x pairs ITM forwards per evaluation (launch/evaluate.py with retrieval.yaml
    # runs it on a held-out split after training)
    itm_rerank_k: Optional[int] = None
    itm_rerank_pairs: int = 256

    def check(self) -> None:
        if self.itm_rerank_k is not None and (self.itm_rerank_k < 1 or self.itm_rerank_pairs < 2):
            raise ConfigError("validation.itm_rerank_k must be >= 1 (or null) and validation.itm_rerank_pairs >= 2")
        if any(k < 1 for k in self.recall_k) or not self.recall_k:
            raise ConfigError(f"validation.recall_k must list integers >= 1, got {self.recall_k}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"validation.max_batches must be >= 1 (or null for all), got {self.max_batches}")


# ----------------------------------------------------------------------------- pure parts


def recall_at_k(sim: torch.Tensor, ks: Iterable[int], query_ids: Optional[torch.Tensor] = None,
                candidate_ids: Optional[torch.Tensor] = None) -> dict[int, float]:
    """Fraction of queries (rows of sim [Q, C]) with a positive among their k most similar candidates.

    A candidate is a positive when its id equals the query's id (default ids: arange, i.e. the diagonal of a
    square matrix). k larger than C counts every candidate.
    """
    q, c = sim.shape
    if query_ids is None or candidate_ids is None:
        if q != c:
            raise ValueError(f"recall_at_k: a {q}x{c} similarity matrix needs query_ids and candidate_ids")
        query_ids = candidate_ids = torch.arange(q, device=sim.device)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"recall_at_k: k must be >= 1, got {ks}")
    top = sim.float().topk(min(ks[-1], c), dim=1).indices  # [Q, kmax], most similar first
    hit = candidate_ids.to(sim.device)[top] == query_ids.to(sim.device)[:, None]  # [Q, kmax]
    return {k: hit[:, :k].any(1).float().mean().item() if q else 0.0 for k in ks}


def retrieval_recalls(image_feat: torch.Tensor, text_feat: torch.Tensor, ks: Iterable[int],
                      ids: Optional[torch.Tensor] = None, chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@k from ITC features [N, E] (pair i = image i, text i) as BLIP's evaluation.

    ids [N]: pairs with equal ids count as each other's positives (e.g. identical captions); default: only pair i.
    Similarities are computed `chunk` queries at a time, so N x N is never held at once.
    Returns {"i2t_r{k}", "t2i_r{k}"} for each k, and "r_mean" (their mean, as BLIP's r_mean).
    """
    n = image_feat.shape[0]
    if text_feat.shape[0] != n:
        raise ValueError(f"retrieval_recalls: {n} images but {text_feat.shape[0]} texts")
    ids = torch.arange(n, device=image_feat.device) if ids is None else ids.to(image_feat.device)
    ks = sorted(set(int(k) for k in ks))
    out: dict[str, float] = {}
    for name, queries, candidates in (("i2t", image_feat, text_feat), ("t2i", text_feat, image_feat)):
        hits = dict.fromkeys(ks, 0.0)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            sim = queries[rows].float() @ candidates.float().t()
            for k, r in recall_at_k(sim, ks, ids[rows], ids).items():
                hits[k] += r * sim.shape[0]
        out |= {f"{name}_r{k}": hits[k] / max(n, 1) for k in ks}
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def caption_ids(captions: list[str]) -> torch.Tensor:
    """A stable int64 id per caption text (equal texts, equal ids, in every process): [N]."""
    return torch.tensor([int.from_bytes(hashlib.sha1(c.encode("utf-8")).digest()[:8], "little", signed=True)
                         for c in captions], dtype=torch.long)


def captions_markdown(rows: list[tuple[str, str, str]]) -> str:
    """(key, reference, generated) rows -> a Markdown table for TensorBoard's text tab."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ") or " "

    lines = ["| key | reference | generated |", "|---|---|---|"]
    lines += [f"| {cell(k)} | {cell(ref)} | {cell(gen)} |" for k, ref, gen in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- distributed helpers


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _all_cat(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] per rank (same n everywhere) -> [world*n, ...] in rank order; identity in a single process."""
    world = _world()[1]
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def find_pretrain_model(module: nn.Module) -> MedBlipPretrain:
    """The MedBlipPretrain inside whatever the engine hands over (itself, a distillation wrapper...)."""
    for m in module.modules():
        if isinstance(m, MedBlipPretrain):
            return m
    raise TypeError(f"validation: no MedBlipPretrain inside {type(module).__name__}")


# ----------------------------------------------------------------------------- the evaluator


class PretrainEvaluator:
    """evaluate(model, step) -> {"loss_itc", "loss_itm", "loss_lm", "itm_acc", "i2t_r1", ..., "samples", "captions"}."""

    def __init__(self, cfg: Config, tokenizer: Any, options: ValidationConfig, world_size: int = 1):
        self.opts = options
        self.urls = expand_shards(cfg.data.val)  # a missing val set fails at build time, not after an epoch
        self.batch_size = options.batch_size or cfg.data.batch_size
        self.seed = cfg.train.seed
        self.num_workers = cfg.data.num_workers if options.num_workers is None else options.num_workers
        self.max_text_len = cfg.model.max_text_len
        self.decode = make_decode(cfg.image, train=False, max_words=30)  # deterministic: resize, no augmentation
        self.collate = make_collate(tokenizer, cfg.model.max_text_len)
        self.tokenizer = tokenizer
        options.check()  # (the YAML's section is checked when read; options built in Python here)
        world = world_size
        samples = count_samples(self.urls)
        if samples < self.batch_size * world:
            raise ConfigError(f"data.val: {samples} validation samples cannot fill one batch of {self.batch_size} "
                              f"on each of {world} rank(s); use more data or validation.batch_size")
        if self.batch_size < 2:
            raise ConfigError("validation.batch_size (or data.batch_size) must be >= 2: ITM and ITC need "
                              "in-batch negatives")

    # -- data

    def _batches(self, rank: int, world: int) -> Iterator[dict]:
        """This rank's validation batches, the same count on every rank (whole batches only)."""
        kw = dict(seed=self.seed, shuffle_buffer=0)
        if len(self.urls) >= world:
            stream = ShardStream(self.urls, self.decode, self.collate, self.batch_size, rank=rank, world_size=world,
                                 **kw)
            n, stride = len(stream), None
        else:  # fewer shards than ranks: every rank reads all of them and keeps every world-th batch
            stream = ShardStream(self.urls, self.decode, self.collate, self.batch_size, **kw)
            n, stride = len(stream) // world, world
        if self.opts.max_batches is not None:
            n = min(n, self.opts.max_batches)
        stream.set_epoch(0)
        workers = max(0, min(self.num_workers, len(self.urls) // (1 if stride else world), n))
        loader = make_loader(stream, workers)
        loader.generator = torch.Generator().manual_seed(self.seed)  # worker seeds: not from the global RNG
        batches = iter(loader)
        if stride:
            batches = itertools.islice(batches, rank, None, stride)
        return itertools.islice(batches, n)

    # -- evaluation

    def __call__(self, module: nn.Module, step: int) -> dict[str, Any]:
        model = find_pretrain_model(module)
        was_training, rng = model.training, model.rng_state()
        model.eval()  # eval mode: no dropout, and the forward leaves the feature queues alone
        model.seed_negatives(self.opts.itm_seed)
        device = next(model.parameters()).device
        try:  # fork_rng: whatever draws from the global RNGs here leaves training's dropout stream as it was
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                return self._evaluate(model)
        finally:
            model.set_rng_state(rng)
            model.train(was_training)

    def _evaluate(self, model: MedBlipPretrain) -> dict[str, Any]:
        rank, world = _world()
        device = next(model.parameters()).device
        names = [n for n in LOSS_NAMES if n in model.objectives]
        # sums: per loss (weighted by samples, or LM target tokens), samples, LM tokens, ITM correct
        sums = torch.zeros(len(names) + 3, dtype=torch.float64, device=device)
        img_feats, txt_feats, ids, rows = [], [], [], []
        rerank: dict[str, list[torch.Tensor]] = {"embeds": [], "ids": [], "mask": []}
        per_rank = -(-self.opts.itm_rerank_pairs // world)  # every rank keeps the same number: gatherable
        for batch in self._batches(rank, world):
            batch.pop(SKIPPED, None)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            bs = batch["input_ids"].shape[0]
            tokens = (batch["input_ids"][:, 1:] != model.pad_token_id).sum()  # LM targets: all but [DEC], no pads
            out = model(batch)
            for i, name in enumerate(names):
                sums[i] += out["losses"][name].double() * (tokens if name == "lm" else bs)
            sums[-3] += bs
            sums[-2] += tokens
            if "itm_acc" in out["metrics"]:
                sums[-1] += float(out["metrics"]["itm_acc"]) * bs
            img_feats.append(model.image_features(batch["image"]))
            txt_feats.append(model.text_features(batch["input_ids"], batch["attention_mask"]))
            ids.append(caption_ids(batch["captions"]).to(device))
            kept = sum(len(e) for e in rerank["embeds"])
            if self.opts.itm_rerank_k and kept < per_rank and "itm" in model.objectives:
                take = min(per_rank - kept, bs)
                pad = self.max_text_len - batch["input_ids"].shape[1]  # fixed width: ranks' tensors concatenate
                rerank["embeds"].append(model.image_embeddings(batch["image"][:take]))
                rerank["ids"].append(F.pad(batch["input_ids"][:take], (0, pad), value=model.pad_token_id))
                rerank["mask"].append(F.pad(batch["attention_mask"][:take], (0, pad), value=0))
            if rank == 0 and not rows and self.opts.captions > 0 and "lm" in model.objectives:
                rows = self._captions(model, batch)
        sums = _all_sum(sums)
        samples, tokens = float(sums[-3]), float(sums[-2])
        if samples == 0:
            return {}
        metrics: dict[str, Any] = {f"loss_{n}": float(sums[i]) / (tokens if n == "lm" else samples)
                                   for i, n in enumerate(names)}
        if "itm" in names:
            metrics["itm_acc"] = float(sums[-1]) / samples
        image_feat, text_feat = _all_cat(torch.cat(img_feats)), _all_cat(torch.cat(txt_feats))
        all_ids = _all_cat(torch.cat(ids))
        metrics |= retrieval_recalls(image_feat, text_feat, self.opts.recall_k, ids=all_ids)
        if rerank["embeds"]:
            metrics |= self._itm_recalls(model, image_feat, text_feat, all_ids, rerank, per_rank, world)
        metrics["samples"] = int(samples)
        if rows:
            metrics["captions"] = captions_markdown(rows)
        return metrics

    def _itm_recalls(self, model: MedBlipPretrain, image_feat: torch.Tensor, text_feat: torch.Tensor,
                     ids: torch.Tensor, kept: dict[str, list[torch.Tensor]], per_rank: int,
                     world: int) -> dict[str, float]:
        """BLIP's protocol on the kept pairs of every rank: {"itm_i2t_r1", ..., "itm_r_mean"}."""
        from recipes.common.retrieval import itm_rerank, recalls

        embeds, tok, mask = (_all_cat(torch.cat(kept[k])) for k in ("embeds", "ids", "mask"))
        # the kept pairs are the first ones of each rank's share: their rows in the gathered features
        local = embeds.shape[0] // world
        n_rank = image_feat.shape[0] // world
        rows = torch.cat([torch.arange(r * n_rank, r * n_rank + local) for r in range(world)]).to(image_feat.device)
        sims = image_feat[rows] @ text_feat[rows].t()

        def itm(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            return model.itm_logits(embeds[img], tok[txt], mask[txt])[:, 1]

        i2t, t2i = itm_rerank(sims, itm, self.opts.itm_rerank_k, pairs_per_call=8 * self.batch_size)
        r = recalls(i2t, t2i, self.opts.recall_k, ids[rows].cpu(), ids[rows].cpu())
        return {f"itm_{k}": v for k, v in r.items()} | {"itm_pairs": int(sims.shape[0])}

    def _captions(self, model: MedBlipPretrain, batch: dict) -> list[tuple[str, str, str]]:
        """Deterministic captions (beam search, BLIP's generate settings) for the batch's first few images."""
        n = min(self.opts.captions, batch["image"].shape[0])
        embeds = model.image_embeddings(batch["image"][:n])
        generated = model.text_decoder.generate(
            input_ids=torch.full((n, 1), model.bos_token_id, dtype=torch.long, device=embeds.device),
            max_length=self.max_text_len, min_length=self.opts.caption_min_len, num_beams=self.opts.caption_beams,
            do_sample=False, repetition_penalty=1.0, eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=model.pad_token_id, encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return list(zip(batch["keys"][:n], batch["captions"][:n], texts))


def make_pretrain_evaluator(cfg: Config, tokenizer: Any, options: Optional[ValidationConfig] = None,
                            world_size: int = 1) -> Optional[Callable[[nn.Module, int], dict]]:
    """Task.evaluate for the pretraining recipes: validation on cfg.data.val (None when data.val is not set).

    Options come from `options`, else the recipe's `validation:` section, else ValidationConfig()'s defaults.
    """
    if not cfg.data.val:
        return None
    options = options or getattr(cfg, "validation", None) or ValidationConfig()
    return PretrainEvaluator(cfg, tokenizer, options, world_size)

