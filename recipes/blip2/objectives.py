"""BLIP-2's losses as pure functions (fp32 math) and the objective registries of the BLIP-2 recipes.

Stage 1 (Q-Former against a frozen image encoder, BLIP-2 paper section 3.2, LAVIS blip2_qformer.py):
- ITC: each of the Q learned queries gives an image feature; the image-text similarity is the MAX over queries of
  query-text cosine similarity, divided by a learnable temperature; symmetric CE with label smoothing 0.1.
- ITM: one hard negative image per text and one hard negative text per image, drawn from the softmax of the
  in-batch ITC similarities with the positive masked out; queries and text attend to each other (bidirectional);
  the itm_head logits averaged over the query outputs; labels [1]*B + [0]*2B.
- ITG: the text decoder sees all queries and the text causally; the queries never see the text (the
  multimodal causal mask); next-token CE with label smoothing 0.1, [DEC] as the first token.
Stage 2 / VQA: the frozen LLM's next-token CE on the caption/answer tokens (no label smoothing, as LAVIS).

Shapes: B = local batch, Q = queries, E = ITC feature size, L = text length, V = vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recipes.medblip.model.losses import itm_labels, itm_loss, lm_loss

TEMP_MIN, TEMP_MAX = 0.001, 0.5
IGNORE = -100

__all__ = ["itc_similarities", "itc_loss", "hard_negatives", "itm_labels", "itm_loss", "multimodal_causal_mask",
           "itg_targets", "itg_loss", "llm_loss", "STAGE1_OBJECTIVES", "LM_OBJECTIVES", "VQA_OBJECTIVES"]


def itc_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor,
                     image_feats_all: torch.Tensor | None = None,
                     text_feats_all: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-over-queries similarities / temp: (sim_i2t [B, B'], sim_t2i [B, B']), fp32.

    image_feats [B, Q, E] and text_feats [B, E] are L2-normalised; the *_all arguments are the features of the
    whole global batch (B' rows; default: the local ones). sim_i2t[i, j] = max_q <img_i,q, txt_j> / temp.
    """
    image_all = image_feats if image_feats_all is None else image_feats_all
    text_all = text_feats if text_feats_all is None else text_feats_all
    t = temp.float().reshape(())
    sim_i2t = torch.einsum("iqe,je->ijq", image_feats.float(), text_all.float()).amax(-1) / t
    sim_t2i = torch.einsum("je,iqe->jiq", text_feats.float(), image_all.float()).amax(-1) / t
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, offset: int = 0,
             label_smoothing: float = 0.1) -> torch.Tensor:
    """(CE(sim_i2t) + CE(sim_t2i)) / 2 with row i's positive in column offset + i (offset = rank * B)."""
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device) + offset
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, offset: int = 0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative image index per text [B], negative text index per image [B]) into the B' global columns.

    LAVIS's draw: one torch.multinomial sample per row of softmax(sim) with the positive (column offset + i) set to
    -10000 first, so a row never draws its own pair. Needs B' >= 2.
    """
    if sim_i2t.shape[1] < 2:
        raise ValueError("ITM needs at least 2 image-text pairs per (global) batch to draw a negative "
                         "(data.batch_size >= 2)")
    rows = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    masked_t2i, masked_i2t = sim_t2i.float().clone(), sim_i2t.float().clone()
    masked_t2i[rows, rows + offset] = -10000.0
    masked_i2t[rows, rows + offset] = -10000.0
    neg_image = torch.multinomial(F.softmax(masked_t2i, dim=1), 1, generator=generator).squeeze(1)
    neg_text = torch.multinomial(F.softmax(masked_i2t, dim=1), 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ITG's additive attention mask [B, 1, Q+L, Q+L] (0 = attend, dtype's min = blocked).

    Query rows see the Q queries only; text row t sees every query and text positions <= t that are not padding
    (text_mask [B, L], 1 = token). This is LAVIS's UniLM-style mask (Qformer.get_extended_attention_mask).
    """
    b, length = text_mask.shape
    n = num_queries + length
    allowed = torch.zeros(n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :num_queries] = True  # everyone sees the queries
    allowed[num_queries:, num_queries:] = torch.ones(length, length, dtype=torch.bool,
                                                     device=text_mask.device).tril()
    allowed = allowed[None] & torch.cat([torch.ones(b, num_queries, dtype=torch.bool, device=text_mask.device),
                                         text_mask.bool()], dim=1)[:, None, :]  # padding columns are blocked
    mask = torch.zeros(b, 1, n, n, dtype=dtype, device=text_mask.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def itg_targets(input_ids: torch.Tensor, bos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs ([CLS] -> [DEC]) and labels (padding -> -100), as LAVIS: both [B, L]."""
    ids = input_ids.clone()
    ids[:, 0] = bos_token_id
    return ids, ids.masked_fill(ids == pad_token_id, IGNORE)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token CE of the Q-Former's text logits [B, L, V] against labels [B, L] (mean over scored tokens)."""
    return lm_loss(logits, labels, label_smoothing)


def llm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of already-aligned LLM logits [T, V] (one row per scored token) against targets [T], in fp32."""
    return F.cross_entropy(logits.float(), targets)


# What each recipe's `objectives:` section may name (an unknown name lists these).
STAGE1_OBJECTIVES = ("itc", "itm", "itg")  # the names objectives.<name> may use in each recipe
LM_OBJECTIVES = ("lm",)
VQA_OBJECTIVES = ("vqa",)
