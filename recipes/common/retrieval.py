"""BLIP's retrieval protocol (salesforce/BLIP train_retrieval.py `evaluation`), model-agnostic.

ITC similarities rank every text for every image (and every image for every text); the top k of each query are
re-scored by the image-grounded text encoder: score = ITM match logit + ITC similarity; every other candidate
scores -100. Recall@k is read off those score matrices. The ITC-only recall (the similarities alone) is kept beside
it: the gap between the two is what the ITM head adds.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

NOT_RESCORED = -100.0  # BLIP's fill value for candidates outside the top k


ItmScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (image idx [m], text idx [m]) -> match logits [m]


@torch.no_grad()
def itm_rerank(sims: torch.Tensor, itm: ItmScorer, k: int, pairs_per_call: int = 256
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """sims [images, texts] (ITC) -> (score_i2t [images, texts], score_t2i [texts, images]) as BLIP's evaluation:
    each query's top-k candidates by ITC re-scored as ITM match logit + ITC similarity, the rest -100."""
    if k < 1:
        raise ValueError(f"retrieval: k_test must be >= 1, got {k}")
    sims = sims.float()
    n_img, n_txt = sims.shape
    out = []
    for matrix, query_is_image in ((sims, True), (sims.t(), False)):
        kk = min(k, matrix.shape[1])
        top_sim, top_idx = matrix.topk(kk, dim=1)  # [Q, kk]
        queries = torch.arange(matrix.shape[0], device=matrix.device)[:, None].expand(-1, kk).reshape(-1)
        cands = top_idx.reshape(-1)
        img, txt = (queries, cands) if query_is_image else (cands, queries)
        # many (query, candidate) pairs per call: BLIP runs one query's k candidates per forward
        logits = torch.cat([itm(img[s:s + pairs_per_call], txt[s:s + pairs_per_call]).float().to(matrix.device)
                            for s in range(0, len(img), pairs_per_call)])
        score = torch.full_like(matrix, NOT_RESCORED)
        score.scatter_(1, top_idx, logits.view(-1, kk) + top_sim)
        out.append(score)
    return out[0], out[1]


def recalls(score_i2t: torch.Tensor, score_t2i: torch.Tensor, ks: Iterable[int] = (1, 5, 10),
            image_ids: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Image->text and text->image recall@k (in [0, 1]) and their mean: a query hits when a positive (same id;
    default: the same index) is among its k best-scored candidates."""
    from recipes.medblip.pretrain.validation import recall_at_k

    n_img, n_txt = score_i2t.shape
    image_ids = torch.arange(n_img) if image_ids is None else image_ids
    text_ids = torch.arange(n_txt) if text_ids is None else text_ids
    out = {f"i2t_r{k}": v for k, v in recall_at_k(score_i2t, ks, image_ids, text_ids).items()}
    out |= {f"t2i_r{k}": v for k, v in recall_at_k(score_t2i, ks, text_ids, image_ids).items()}
    out["r_mean"] = sum(out.values()) / len(out)
    return out
