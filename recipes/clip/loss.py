"""The CLIP objective: symmetric InfoNCE over the global batch (features gathered from every rank with gradient).

Pure torch (no model code), so it can be reused by other recipes and tested in light processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: image_feat, text_feat [N, D] L2-normalised, row i matches row i -> scalar (fp32)."""
    logits = logit_scale.float() * image_feat.float() @ text_feat.float().t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world*B, D] in rank order; gradients flow back to every rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
