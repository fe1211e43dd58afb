"""The study's adaptive loss weighting for self-distillation: softmax over smoothed student/teacher loss ratios.

Per objective t: r_t = L_t^S / (L_t^T + eps), w_t = softmax_t(a * r_hat_t + (1 - a) * r_t),
total = sum_t c_t * L_t^S + sum_t w_t * D_t (c_t: objectives.<t>.weight). r_hat moves once per optimizer step, by the
step's mean ratio over micro-batches and ranks: with train.grad_accum = 1 exactly the study's per-iteration rule.
docs/psd.md has the whole rule and the gradient caveat of D_t = MSE(L^S, L^T).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from .task import ModelOutput


class AdaptiveLossWeighter:
    """Combiner (output, step) -> (total, logs) and plugin owning r_hat (distill.ratio_momentum and eps are checked
    by framework.config.DistillConfig)."""

    name = "adaptive_loss_weights"
    per_rank_state = False  # r_hat is all-reduced: every rank holds the same

    def __init__(self, static_weight: Callable[[str, int], float], *, momentum: float = 0.9, eps: float = 1e-8,
                 detach_weights: bool = True):
        self.static_weight = static_weight
        self.momentum, self.eps, self.detach_weights = momentum, eps, detach_weights
        self._r_hat: dict[str, torch.Tensor] = {}  # smoothed ratios (0-dim, on the device); 1.0 until the first update
        self._sum: dict[str, torch.Tensor] = {}  # this step's ratios, summed over finite micro-batches
        self._count: dict[str, torch.Tensor] = {}

    @property
    def r_hat(self) -> dict[str, float]:
        """The smoothed ratios as numbers (reads the device: for checkpoints and inspection, not per step)."""
        return {n: float(v) for n, v in self._r_hat.items()}

    # ------------------------------------------------------------------ combiner

    def weights(self, ratios: torch.Tensor, names: list[str]) -> torch.Tensor:
        """w = softmax(a*r_hat + (1-a)*ratios) over objectives `names`; ratios [T] -> weights [T]."""
        for n, v in self._r_hat.items():
            if v.device != ratios.device:  # loaded from a checkpoint on the CPU: moved once, not per micro-batch
                self._r_hat[n] = v.to(ratios.device)
        one = torch.ones((), dtype=torch.float32, device=ratios.device)
        r_hat = torch.stack([self._r_hat.get(n, one) for n in names])
        return torch.softmax(self.momentum * r_hat + (1.0 - self.momentum) * ratios, dim=0)

    def __call__(self, output: ModelOutput, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(total loss, logs) for one micro-batch; logged values stay detached tensors (no host sync here)."""
        losses: dict[str, torch.Tensor] = output["losses"]
        if "teacher_losses" not in output or "distill" not in output:
            raise ValueError("the adaptive loss weighter needs the self-distillation wrapper's output "
                             "(teacher_losses, distill): set distill.enabled (framework.distill.setup_distillation)")
        if not losses:
            raise ValueError("the model returned no losses (are all objectives disabled?)")
        names = list(losses)
        student = torch.stack([losses[n].float() for n in names])  # [T]
        teacher = torch.stack([output["teacher_losses"][n].detach().float() for n in names])
        distill = torch.stack([output["distill"][n].float() for n in names])
        ratios = student / (teacher + self.eps)
        w = self.weights(ratios.detach() if self.detach_weights else ratios, names)
        static = [float(self.static_weight(n, step)) for n in names]  # host numbers: no device round trip
        total = sum(c * student[i] for i, c in enumerate(static)) + (w * distill).sum()

        ok = torch.isfinite(total.detach()) & torch.isfinite(ratios.detach())  # the engine skips non-finite steps
        for i, n in enumerate(names):
            r = torch.where(ok[i], ratios[i].detach(), torch.zeros_like(ratios[i]))
            self._sum[n] = self._sum[n] + r if n in self._sum else r
            self._count[n] = self._count[n] + ok[i].float() if n in self._count else ok[i].float()

        logs: dict[str, Any] = {"loss/total": total.detach()}
        for i, n in enumerate(names):
            logs |= {f"loss/{n}": student[i].detach(), f"teacher_loss/{n}": teacher[i],
                     f"distill_loss/{n}": distill[i].detach(), f"distill_weight/{n}": w[i].detach(),
                     f"distill_ratio/{n}": ratios[i].detach(), f"weight/{n}": static[i]}
        return total, logs

    # ------------------------------------------------------------------ plugin contract

    def setup(self, module: Any, dtype: torch.dtype, device: torch.device, progress: Any) -> None:
        pass

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> dict[str, Any]:
        """r_hat <- a*r_hat + (1-a)*(mean ratio of the step over micro-batches and ranks); returns r_hat (tensors:
        computed on the device, read by the engine once per log interval)."""
        names = sorted(self._sum)
        if names:
            sums = torch.stack([self._sum[n].float() for n in names] + [self._count[n].float() for n in names])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sums)  # every rank ends with the same r_hat (its state is saved once)
            a, k = self.momentum, len(names)
            for n, s, c in zip(names, sums[:k], sums[k:]):
                old = self._r_hat.get(n, torch.ones((), dtype=torch.float32, device=sums.device))
                # an objective with no finite micro-batch this step keeps its r_hat (no branch on the value)
                self._r_hat[n] = torch.where(c > 0, a * old + (1.0 - a) * s / c.clamp(min=1), old)
        self._sum.clear()
        self._count.clear()
        return {f"distill_ratio_avg/{n}": v for n, v in self._r_hat.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"r_hat": dict(self.r_hat), "pending_sum": {n: float(v) for n, v in self._sum.items()},
                "pending_count": {n: float(v) for n, v in self._count.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """An older state's count of updates ("updates") is ignored: the run's Progress is the one count."""
        self._r_hat = {n: torch.tensor(float(v), dtype=torch.float32) for n, v in state["r_hat"].items()}
        self._sum = {n: torch.tensor(v) for n, v in state.get("pending_sum", {}).items()}
        self._count = {n: torch.tensor(v) for n, v in state.get("pending_count", {}).items()}
