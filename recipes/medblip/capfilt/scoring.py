"""The filter: BLIP's ITM match probability (softmax(itm_head)[:, 1] of the image-grounded text encoder) of every
caption of an image, and the keep/remove decision against the threshold."""
from __future__ import annotations

from typing import Optional

import torch

from recipes.common.text import pre_caption
from recipes.medblip.model.blip_pretrain import MedBlipPretrain

DECIMALS = 4  # scores are stored, and decided on, rounded: the recorded score always explains the decision
MAX_WORDS = 30  # pre_caption's limit in DAPT (what the filter saw in training)

# What happens to one caption (original or synthetic)
KEPT, REMOVED, EMPTY, DUPLICATE = "kept", "removed", "empty", "duplicate"


@torch.no_grad()
def match_scores(model: MedBlipPretrain, image_embeds: torch.Tensor, captions: list[list[str]]) -> list[list[float]]:
    """Image tokens [B, N, D] + captions per image (pre_caption'ed) -> ITM match probability of each, rounded.

    All captions of all B images go through the text encoder as one batch, each beside its own image's tokens.
    """
    rows = [i for i, caps in enumerate(captions) for _ in caps]
    flat = [c for caps in captions for c in caps]
    if not flat:
        return [[] for _ in captions]
    tok = model.tokenize(flat, device=image_embeds.device)
    index = torch.tensor(rows, device=image_embeds.device)
    probs = model.itm_logits(image_embeds[index], tok["input_ids"], tok["attention_mask"]).softmax(-1)[:, 1]
    values = [round(float(p), DECIMALS) for p in probs.cpu()]
    out, at = [], 0
    for caps in captions:
        out.append(values[at:at + len(caps)])
        at += len(caps)
    return out


def decide(score: Optional[float], threshold: float) -> str:
    """kept when the (rounded) score is >= threshold; a caption with no score (empty text) is never kept."""
    if score is None:
        return EMPTY
    return KEPT if score >= threshold else REMOVED


def normalise(caption: str) -> str:
    """The text the filter scores and DAPT trains on (BLIP's pre_caption, 30 words)."""
    return pre_caption(caption, MAX_WORDS)
