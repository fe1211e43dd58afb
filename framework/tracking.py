"""Run logging: a step's figures, TensorBoard scalars/text/images on rank 0, a compact console progress line."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class StepWindow:
    """What the micro-batches of one optimizer step add up to: times, samples, summed logs, the rate used."""

    data_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    samples: int = 0
    micro: int = 0
    lr: float = 0.0
    logs: dict[str, Any] = field(default_factory=dict)

    def add(self, logs: dict[str, Any], samples: int, times: tuple[float, float, float, float]) -> None:
        """One micro-batch: its logs (summed), its samples, and times (start, after forward, backward, step)."""
        for k, v in logs.items():  # tensors stay on their device until the step ends (no host sync here)
            self.logs[k] = self.logs.get(k, 0.0) + v
        self.samples += samples
        self.micro += 1
        self.forward_s += times[1] - times[0]
        self.backward_s += times[2] - times[1]
        self.optimizer_s += times[3] - times[2]

    def scalars(self) -> dict[str, Any]:
        """Per-step means of the logs (device tensors where the logs are) and the step's performance figures."""
        out = {k: v / max(1, self.micro) for k, v in self.logs.items()}  # tensors stay tensors: read once per log
        busy = self.data_s + self.forward_s + self.backward_s + self.optimizer_s
        return out | {"train/lr": self.lr, "perf/samples_per_s": self.samples / max(busy, 1e-9),
                      "perf/data_wait_frac": self.data_s / max(busy, 1e-9), "perf/data_s": self.data_s,
                      "perf/forward_s": self.forward_s, "perf/backward_s": self.backward_s,
                      "perf/optimizer_s": self.optimizer_s}


def is_loss(key: str) -> bool:
    """loss/*, teacher_loss/*, distill_loss/*: the figures that differ between ranks' batches."""
    return key.split("/", 1)[0].endswith("loss")


def mean_losses_over_ranks(steps: list[dict[str, float]], world_size: int, device: torch.device) -> None:
    """Replace each step's losses (is_loss keys, already floats) by their mean over ranks, in place: one all-reduce
    for all the steps of a log interval. Every rank calls it with the same steps (alone: nothing to do)."""
    if world_size == 1 or not steps:
        return
    import torch.distributed as dist

    keys = sorted(k for k in steps[0] if is_loss(k))  # the same objectives on every rank
    table = torch.tensor([[values.get(k, float("nan")) for k in keys] for values in steps],
                         dtype=torch.float64, device=device)
    dist.all_reduce(table)  # the one collective of a log interval
    for values, row in zip(steps, (table / world_size).tolist()):
        values.update({k: x for k, x in zip(keys, row) if k in values})


class RunLogger:
    """Writes every logged scalar to TensorBoard under `run_dir/tb` (rank 0 only) and prints progress lines."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, log_every: int):
        self.rank, self.total_steps, self.log_every = rank, total_steps, max(1, log_every)
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        self.started = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """All of a step's scalars as one event: ~7x cheaper than one add_scalar call per value."""
        if self.writer is None or not values:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self.writer._get_file_writer().add_summary(summary, step)

    def evaluation(self, step: int, metrics: dict[str, Any]) -> None:
        """An evaluation's results under eval/: numbers as scalars (and one console line), str as Markdown text,
        [3,H,W] tensors in [0,1] as images (sample predictions)."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.scalars(step, {f"eval/{k}": v for k, v in numbers.items()})
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, str):
                    self.writer.add_text(f"eval/{k}", v, step)
                elif isinstance(v, torch.Tensor) and v.dim() == 3:
                    self.writer.add_image(f"eval/{k}", v, step)
            self.writer.flush()
        if numbers:
            self.message(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))

    def due(self, step: int) -> bool:
        """Whether `step` gets a console line: every run.log_every steps and the last step."""
        return step % self.log_every == 0 or step == self.total_steps

    def progress(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """The console line, every run.log_every steps and at the last step."""
        if self.rank != 0 or not self.due(step):
            return
        losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in values.items()
                          if k.startswith("loss/") and k != "loss/total")
        rate = values.get("perf/samples_per_s", 0.0)
        elapsed = time.time() - self.started
        eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
        print(f"step {step}/{self.total_steps} ep {epoch} | loss {values.get('loss/total', float('nan')):.4f}"
              f" ({losses}) | lr {values.get('train/lr', 0):.3g} | {rate:.1f} samples/s"
              f" | data {100 * values.get('perf/data_wait_frac', 0):.0f}% | eta {_hms(eta)}", flush=True)

    def message(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory (GiB) allocated and reserved since the last reset; on the CPU the process's peak RSS."""
    gib = 1024 ** 3
    if device.type != "cuda":  # (POSIX only, as the run directory's lock)
        return {"mem/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}  # KiB on Linux
    return {"mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}


def detached(value: Any) -> Any:
    """A tensor detached (read later, with the other logged values), anything else as it is."""
    return value.detach() if isinstance(value, torch.Tensor) else value


def read_scalars(dicts: list[dict[str, Any]]) -> None:
    """Replace every tensor value in `dicts` by its float, in place: one host read per device for all of them."""
    by_device: dict[torch.device, list[tuple[dict, str, torch.Tensor]]] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append((d, k, v))
    for items in by_device.values():
        values = torch.stack([v.detach().reshape(()).float() for _, _, v in items]).tolist()
        for (d, k, _), x in zip(items, values):
            d[k] = x


class QuietLog:
    """Where a step reports outside fit() (benchmarks): everything dropped; TensorBoard writes are not the step's."""

    def scalars(self, *_: Any) -> None:
        pass

    def message(self, *_: Any) -> None:
        pass
