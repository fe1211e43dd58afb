"""FLOP counting that includes fused attention on the CPU (the FLOPs that MFU is computed from).

torch's FlopCounterMode has formulas for the CUDA SDPA kernels (flash, memory-efficient, cuDNN) but none for the
CPU's fused kernel (aten._scaled_dot_product_flash_attention_for_cpu and its backward): counted on the CPU, every
ViT and text attention adds 0 FLOPs. These formulas are torch's own SDPA ones (forward 4*B*H*L*S*D: Q K^T and
P V; backward 2.5x that, as flash recomputes the scores), registered for the CPU ops.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter as fc

_aten = torch.ops.aten


def _cpu_sdpa_forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return fc.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def cpu_attention_formulas() -> dict[Any, Any]:
    """{op: formula on shapes} for the CPU fused attention ops this torch build has (FlopCounterMode's custom_mapping)."""
    mapping = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward)):
        op = getattr(_aten, name, None)
        if op is not None:
            mapping[op] = formula
    return mapping


def flop_counter(display: bool = False) -> fc.FlopCounterMode:
    """torch's FlopCounterMode with the CPU fused-attention formulas added."""
    return fc.FlopCounterMode(display=display, custom_mapping=cpu_attention_formulas())


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """Forward FLOPs of one attention call by formula: 4*B*H*L*S*D (two matmuls, 2 FLOPs per multiply-add)."""
    return 4 * batch * heads * q_len * kv_len * head_dim
