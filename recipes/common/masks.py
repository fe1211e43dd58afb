"""Padding masks handed to transformers models already in their final form, so that no host sync decides them.

transformers' mask builders (masking_utils.create_bidirectional_mask) first ask `padding_mask.all()` to see whether
the mask can be dropped: a host sync in every text pass (4 per MedBLIP micro-batch), a pipeline stall on a GPU. A
4D mask is taken as it is, so the hook below turns each 2D padding mask [B, K] into the additive mask transformers
would have built, where(mask, 0, dtype min) of shape [B, 1, 1, K] (it broadcasts over the queries), before the
model's forward sees it. Causal (decoder) masks are left to transformers: their eager builder never syncs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def additive_padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, K] of 1 (attend) / 0 (padding) -> [B, 1, 1, K]: 0 where attended, finfo(dtype).min where not."""
    keep = mask[:, None, None, :].to(torch.bool)
    return torch.where(keep, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


class _PrebuiltMasks:
    """The forward pre-hook of prebuild_padding_masks (a class, not a closure: a model carrying it still pickles,
    e.g. CapFilt's ranks exchanging what they loaded)."""

    def __init__(self, dtype_of: Callable[[nn.Module, dict], torch.dtype]):
        self.dtype_of = dtype_of

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        dtype = self.dtype_of(module, kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not kwargs.get("is_decoder", False):
            kwargs["attention_mask"] = additive_padding_mask(mask, dtype)
        enc = kwargs.get("encoder_attention_mask")
        if isinstance(enc, torch.Tensor) and enc.dim() == 2:
            kwargs["encoder_attention_mask"] = additive_padding_mask(enc, dtype)
        return args, kwargs


def prebuild_padding_masks(model: nn.Module, dtype_of: Callable[[nn.Module, dict], torch.dtype]) -> Any:
    """Install a forward pre-hook on `model` turning its 2D `attention_mask` (unless the call is a decoder's, whose
    mask is causal) and `encoder_attention_mask` keyword arguments into additive 4D masks in the dtype
    `dtype_of(module, kwargs)` gives (transformers builds them in its embeddings' dtype; a module-level function,
    so that the model pickles). Returns the hook handle. The dtype is read from the module called, so a deepcopy
    (an EMA teacher, a momentum encoder) uses its own."""
    return model.register_forward_pre_hook(_PrebuiltMasks(dtype_of), with_kwargs=True)
