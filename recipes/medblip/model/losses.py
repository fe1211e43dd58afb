"""BLIP's three pretraining losses as pure functions (fp32), their chance levels, and the objective registry.

Shapes: B = local batch, Q = queue size, L = text length, V = vocabulary.
Chance level = the loss of a model that learned nothing: the best prediction that ignores the inputs where the
label prior is fixed by construction (ITM: 1 positive to 2 negatives; ITC: no candidate preferred), the uniform
prediction otherwise (LM: the token prior depends on the data).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # BLIP clamps the learnable temperature to this range every forward


def itc_targets(sim_i2t_m: torch.Tensor, sim_t2i_m: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets alpha*softmax(sim_m) + (1-alpha)*onehot(diagonal): [B, B+Q] each (momentum similarities)."""
    hard = torch.zeros_like(sim_i2t_m)
    hard.fill_diagonal_(1)  # sample i's positive is column i (its own pair, first in the [batch, queue] columns)
    if alpha == 0:
        return hard, hard.clone()
    return (alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * hard,
            alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * hard)


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor,
             targets_t2i: torch.Tensor) -> torch.Tensor:
    """(CE(sim_i2t, targets_i2t) + CE(sim_t2i, targets_t2i)) / 2 with soft targets; sims [B, B+Q] (already /temp)."""
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def draw_one_per_row(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of non-negative `weights` [N, K] with probability proportional to the weights: [N].

    torch.multinomial(weights, 1, generator=generator) without its input checks, which read the tensor on the host
    (`.item()`, a stall on a GPU): argmax(weights / q), q ~ Exp(1), the very algorithm multinomial runs for one draw,
    drawing q from `generator` as it does, so on the CPU the indices equal multinomial's for the same state.
    """
    q = torch.empty_like(weights).exponential_(1, generator=generator)
    return (weights / q).argmax(dim=-1)


@torch.no_grad()
def sample_itm_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives from the in-batch similarities [B, B]: (image index per text [B], text index per image [B]).

    As BLIP: weights softmax(sim) + 1e-4 with the diagonal (the positive) set to 0, one draw per row. Drawn on the
    similarities' device with the model's own generator (on that device), so a resume can restore the stream exactly
    and no value travels to the host.
    """
    b = sim_i2t.shape[0]
    if b < 2:
        raise ValueError("ITM needs at least 2 samples per rank to draw a negative (data.batch_size >= 2)")
    w_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-4
    w_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4
    w_t2i.fill_diagonal_(0)
    w_i2t.fill_diagonal_(0)
    return draw_one_per_row(w_t2i, generator), draw_one_per_row(w_i2t, generator)


def itm_labels(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """[1]*B (positives) + [0]*2B (text with a negative image, image with a negative text), made on `device`."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1  # a fill on the device: no host-to-device copy
    return labels


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of itm_head logits [3B, 2] against itm_labels(B)."""
    return F.cross_entropy(logits.float(), itm_labels(logits.shape[0] // 3, logits.device))


def lm_targets(decoder_input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Padding -> -100 (ignored), as BLIP: [B, L]."""
    return decoder_input_ids.masked_fill(decoder_input_ids == pad_token_id, -100)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token CE of logits [B, L, V] against labels [B, L] shifted by one, -100 ignored, label smoothing.

    reduction "mean": over all non-ignored tokens of the batch (BLIP's med.py); "none": per-sample sums [B].
    """
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.view(logits.shape[0], -1).sum(1)
    return loss


# ITM predicting the label prior (1/3 match): its entropy, ln 3 - (2/3) ln 2 = 0.6365 (salesforce/BLIP #51's flat loss)
ITM_CHANCE = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)


def itc_chance(candidates: int) -> float:
    """ITC of equal similarities to all B+Q candidates: ln(B+Q), whatever alpha (soft targets also sum to one).

    A collapsed model scores about ln B instead while the queue still holds its random initial columns (the first
    Q / global batch steps of a run from scratch), as its batch columns then stand out from the random ones.
    """
    return math.log(candidates)


def lm_chance(vocab_size: int) -> float:
    """LM of the uniform prediction: ln V, with any label smoothing (the smoothed target also sums to one)."""
    return math.log(vocab_size)


# The objectives a MedBLIP pretraining recipe can switch on, weight and schedule from the YAML (objectives.<name>).
OBJECTIVES = ("itc", "itm", "lm")
