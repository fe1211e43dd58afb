"""The momentum-encoder bookkeeping as a plugin: hands the run's Progress to the model, which times BLIP's momentum
update by it; owns the ITM-negative generator and the marker of the last update, both saved per rank."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from framework.master_weights import MasterWeights
from framework.progress import Progress
from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.losses import TEMP_MAX, TEMP_MIN


class MomentumUpdate:
    """At setup the model gets the run's Progress: the Trainer advances it, the next training forward applies the
    update of the new step.

    BLIP's forward starts with `_momentum_update()` (p_m <- m*p_m + (1-m)*p, fp32 copies) before computing its
    momentum features; `MedBlipPretrain.momentum_update_for_step` does the same at the first forward of each
    optimizer step, so the sequence is BLIP's at grad_accum 1 and one update per step under accumulation. The plugin
    also owns the ITM-negative generator and the model's `momentum_updated_at` marker, both saved per rank. Under
    DeepSpeed the momentum copies follow the fp32 master weights where the optimizer holds them
    (framework.master_weights), and `temp` is clamped to BLIP's range in its master too after each step, so the next
    step starts in range.
    """

    name = "medblip_momentum"
    per_rank_state = True  # each rank draws its own ITM negatives: its generator state is saved per rank
    # read by framework.build before the engine is built: ZeRO stage 3 is refused then, not after it is built
    needs_whole_parameters = "the MedBLIP momentum encoders need full parameters on every rank"

    def __init__(self, model: MedBlipPretrain, seed: int = 0):
        self.model = model  # the unwrapped model (DeepSpeed wraps this very object)
        self.seed = seed
        self.masters: Optional[MasterWeights] = None

    def use_master_weights(self, masters: MasterWeights) -> None:
        """Before setup: the momentum update reads the online weights' fp32 masters; `temp` is clamped there."""
        self.masters = self.model.master_weights = masters

    def setup(self, module: nn.Module, dtype: torch.dtype, device: torch.device, progress: Progress) -> None:
        """The model reads the run's Progress from now on; refuses ZeRO-3; seeds this rank's ITM negatives."""
        self.model.progress = progress
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):
            raise ValueError(f"{self.needs_whole_parameters}: use DeepSpeed ZeRO stage 0, 1 or 2 "
                             "(deepspeed.zero_optimization.stage), not 3")
        for m in self.model.fp32_modules():  # also when used without the engine (which does this too)
            m.float()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # distinct negative streams per rank, drawn where the model runs (no host round trip per micro-batch)
        self.model.seed_negatives(self.seed + 1_000_003 * rank, device)

    def after_optimizer_step(self, step: int) -> dict[str, Any]:
        """The step's alpha and temperature (a device tensor: the engine reads logged values once per log interval)."""
        if self.masters is not None:  # the forward clamps the module's copy; the optimizer steps from the master
            self.masters.clamp_(self.model.temp, TEMP_MIN, TEMP_MAX)
        return {"medblip/alpha": self.model.alpha, "medblip/temp": self.model.temp.detach()[0].clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"itm_rng": self.model.rng_state(), "itm_rng_device": self.model.itm_generator.device.type,
                "momentum_updated_at": self.model.momentum_updated_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After setup and the run's Progress restored; an older state's own "step" is ignored (= progress.step)."""
        marker = state.get("momentum_updated_at")
        if marker is None:  # older states counted updates: "momentum_updates" = the marker + 1
            # Checkpoints from before the update moved into the forward hold no count: their momentum encoders already
            # took, right after step `step`, the very update the next forward would apply (same weights): not twice.
            marker = int(state.get("momentum_updates", self.model.progress.step + 1)) - 1
        self.model.momentum_updated_at = int(marker)
        self.model.set_rng_state(state["itm_rng"], state.get("itm_rng_device", "cpu"))
