"""The fp32 master weights DeepSpeed's half-precision optimizers keep, per module parameter, where this rank holds
them whole: momentum encoders and EMA teachers follow these instead of their fp16/bf16 rounding."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch


def _zero0_fp16(optimizer: Any) -> Optional[Callable[[], dict[int, torch.Tensor]]]:
    """ZeRO 0 fp16/bf16: FP16_UnfusedOptimizer's fp32_groups (one tensor per parameter) or FP16_Optimizer's
    fp32_groups_flat (one flat tensor per group, parameters in fp16_groups order), aligned with fp16_groups."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return None
    if hasattr(optimizer, "fp32_groups"):
        return lambda: {id(p): m for lp, hp in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
                        for p, m in zip(lp, hp, strict=True)}
    if hasattr(optimizer, "fp32_groups_flat"):
        def views() -> dict[int, torch.Tensor]:
            out = {}
            for lp, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True):
                offset = 0
                for p in lp:
                    out[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
                    offset += p.numel()
            return out
        return views
    return None


def _hp_mapping(params: list[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
    """ZeRO 1/2 and BF16_Optimizer: each parameter's `_hp_mapping.hp_fragment` (a view of this rank's flat fp32
    partition), where it is the whole parameter; read anew each time (a checkpoint load relinks the fragments)."""
    out = {}
    for p in params:
        m = getattr(p, "_hp_mapping", None)
        if m is not None and m.hp_fragment is not None and m.lp_fragment_address.numel == p.numel():
            out[id(p)] = m.hp_fragment.view_as(p)
    return out


class MasterWeights:
    """Reads each trainable module parameter's fp32 master from a DeepSpeed engine, or the parameter itself.

    Masters are read at ZeRO 0 (fp16, and bf16: DeepSpeed 0.19.8 builds FP16_UnfusedOptimizer for both, or
    FP16_Optimizer) and at ZeRO 1/2 (DeepSpeedZeroOptimizer, bf16's BF16_Optimizer) on a data-parallel world of
    one. Elsewhere the module parameter is the source: fp32 training (the parameters are the masters), CPU-offloaded
    masters (a host-to-device copy of every weight per step), and ZeRO 1/2 over several ranks (each rank holds a
    slice of the masters: whole ones would cost an all-reduce per parameter per step; every rank then reads the
    same half weights, so their copies stay identical). `source` says which, in one line.
    """

    def __init__(self, engine: Any):
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        optimizer = getattr(engine, "optimizer", None)
        self._read: Optional[Callable[[], dict[int, torch.Tensor]]] = None
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in self.params)
        kind = type(optimizer).__name__
        world = int(getattr(engine, "dp_world_size", 1))
        if not half:
            self.source = "module weights (fp32 training: they are the masters)"
        elif (read := _zero0_fp16(optimizer)) is not None:
            self._read, self.source = read, f"fp32 masters ({kind})"
        elif not any(hasattr(p, "_hp_mapping") for p in self.params):
            self.source = f"module weights ({kind} keeps no fp32 master)"
        elif world > 1:
            self.source = f"module weights ({kind} partitions the fp32 masters over {world} ranks)"
        elif any(m.device != p.device for p in self.params if (m := _hp_mapping([p]).get(id(p))) is not None):
            self.source = f"module weights ({kind} keeps the fp32 masters on another device)"
        else:
            self._read, self.source = (lambda: _hp_mapping(self.params)), f"fp32 masters ({kind}, hp mapping)"

    @property
    def reads_masters(self) -> bool:
        """True where `of` returns fp32 masters (for the trainable parameters)."""
        return self._read is not None

    def of(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's fp32 master (a live view: writing it writes the master), or the parameter itself where
        it has none (frozen parameters, or every parameter where `reads_masters` is False)."""
        if self._read is None:
            return list(params)
        masters = self._read()
        return [masters.get(id(p), p) for p in params]

    def __deepcopy__(self, memo: dict) -> "MasterWeights":
        return self  # a view of the engine's optimizer: a copied model reads the same masters

    @torch.no_grad()
    def clamp_(self, param: torch.Tensor, lo: float, hi: float) -> None:
        """Clamp `param` and its master in place, so that the next optimizer step starts from the clamped value."""
        param.clamp_(lo, hi)
        master = self.of([param])[0]
        if master is not param:
            master.clamp_(lo, hi)


class MasterClamp:
    """Plugin: after each optimizer step, clamp one parameter to [lo, hi] in its fp32 master as well.

    For a parameter the model clamps in its forward (BLIP's `temp`): that clamps the module's copy only, and the
    optimizer would step on from the unclamped master. Holds no state.
    """

    per_rank_state = False

    def __init__(self, name: str, param: torch.nn.Parameter, lo: float, hi: float):
        self.name, self.param, self.lo, self.hi = name, param, lo, hi
        self.masters: Optional[MasterWeights] = None

    def use_master_weights(self, masters: MasterWeights) -> None:
        self.masters = masters

    def setup(self, module: torch.nn.Module, dtype: torch.dtype, device: torch.device, progress: Any) -> None:
        pass

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        if self.masters is not None:
            self.masters.clamp_(self.param, self.lo, self.hi)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
