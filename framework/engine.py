"""The training engine: DeepSpeed set-up and one readable `fit()` loop."""
from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from . import checkpoint
from .config import Config, config_to_dict, parse_duration, parse_every, save_resolved
from .data import SKIPPED, MapStream, ShardStream, batch_size_of, expand_shards, make_loader, verify_checksums
from .distributed import DistInfo, any_true, init_distributed
from .loss_weights import StaticLossWeights
from .gpu import GpuFacts, gpu_facts, set_extension_arch
from .preflight import GIB, MemoryEstimate, check_fits, check_gpu_arch, estimate_for_config
from .build import build_deepspeed, resolve_precision
from .task import Task
from .tracking import RunLogger, peak_memory


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason the user must see (non-finite losses, loss-scale collapse)."""


@dataclass
class FitResult:
    step: int
    epoch: int
    reason: str  # finished | preempted | time_budget | nonfinite
    last_checkpoint: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed


class Engine:
    """Builds DeepSpeed around a recipe's Task and trains it; see `fit()`."""

    def __init__(self, cfg: Config, task: Task, dist: Optional[DistInfo] = None):
        self.cfg, self.dist = cfg, dist or init_distributed()
        # Python/NumPy streams from the config (a resume then restores them): saved RNG states are reproducible
        checkpoint.seed_host_rngs(cfg.train.seed, self.dist.rank)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.gpu = self._check_gpu()
        self.precision = resolve_precision(cfg.train.precision, self.dist.device, self.gpu)
        self.stream = self._build_stream(task)
        self.accum = cfg.train.grad_accum
        self.steps_per_epoch = len(self.stream) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {len(self.stream)} batches per rank, fewer than train.grad_accum="
                             f"{self.accum}: use more data, a smaller batch or less accumulation")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        if cfg.distill.enabled:
            from .distill import with_self_distillation

            task = with_self_distillation(task, cfg, self.total_steps)
        self.task = task
        self.memory = self._preflight_memory()
        self.combine = task.combine_losses or StaticLossWeights(cfg.objectives, self.total_steps)
        self.ds = build_deepspeed(cfg, task, self.precision, self.total_steps, self.dist.world_size)
        for module in getattr(task.model, "fp32_modules", lambda: [])():
            module.float()  # DeepSpeed cast everything to half; momentum/EMA copies must stay fp32 to move
        for plugin in task.plugins:
            plugin.setup(self.ds.module, self.precision.dtype, self.dist.device)
        self.pos = Position()
        self.log = RunLogger(self.run_dir, self.dist.rank, self.total_steps, cfg.run.log_every)
        self.stop_signal: Optional[str] = None
        self.nonfinite_run = 0
        self.skipped_samples = 0
        self.started = time.time()
        self.budget = parse_duration(cfg.run.time_budget) if cfg.run.time_budget else None
        self.last_save_s = 0.0
        if self.dist.rank == 0:
            save_resolved(cfg, self.run_dir)
        self._resume()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train until the configured length, a stop signal, the time budget, or a failure; returns where it ended."""
        previous = self._install_signal_handlers()
        try:
            return self._fit()
        finally:  # in a notebook or test process, Ctrl-C must interrupt again once training is over
            for sig, handler in previous.items():
                if handler is not None:  # None: installed outside Python, cannot be put back
                    signal.signal(sig, handler)

    def _fit(self) -> FitResult:
        reason = "running"
        tick = time.time()
        window = _new_window()
        try:
            while self.pos.step < self.total_steps and reason == "running":
                for batch in self._epoch_batches():
                    window["data"] += time.time() - tick
                    t0 = time.time()
                    self.skipped_samples += int(batch.pop(SKIPPED, 0))
                    output = self.ds(batch)  # forward: {"losses": ..., "metrics": ...}
                    loss, logs = self.combine(output, self.pos.step)
                    self.pos.batch_in_epoch += 1
                    t1 = self._clock()
                    if self._nonfinite(loss, output):
                        continue  # skip this micro-batch: no backward, no step
                    self.ds.backward(loss)
                    t2 = self._clock()
                    boundary = self.ds.is_gradient_accumulation_boundary()  # ask before step()
                    window["lr"] = self.ds.get_lr()[0]  # the rate this step uses
                    self.ds.step()
                    t3 = self._clock()
                    window["compute"] += t3 - t0
                    window["forward"] += t1 - t0
                    window["backward"] += t2 - t1
                    window["optimizer"] += t3 - t2
                    window["samples"] += batch_size_of(batch) * self.dist.world_size
                    window["micro"] += 1
                    for k, v in logs.items():  # mean over the step's micro-batches
                        window["logs"][k] = window["logs"].get(k, 0.0) + v
                    if boundary:
                        self.pos.step += 1
                        self._after_optimizer_step(output, window)
                        window = _new_window()
                        reason = self._maybe_checkpoint_and_stop(end_of_epoch=False)
                        if reason != "running":
                            break
                    tick = time.time()
                else:  # the epoch ran out
                    self.pos.epoch, self.pos.batch_in_epoch = self.pos.epoch + 1, 0
                    reason = self._maybe_checkpoint_and_stop(end_of_epoch=True)
        except TrainingStopped as e:
            self._save()
            self.log.message(f"stopped: {e}; last good state saved in {self.ckpt_dir}")
            self.log.close()
            raise
        reason = "finished" if reason == "running" else reason
        if reason == "finished" and self._saved_step != self.pos.step:
            self._save()
        evaluated = getattr(self, "_evaluated_step", -1) == self.pos.step
        metrics = {}
        if reason == "finished" and self.task.evaluate:
            metrics = self._last_eval if evaluated else self._evaluate()
        self.log.close()
        return FitResult(self.pos.step, self.pos.epoch, reason, self._saved_tag, metrics)

    # ------------------------------------------------------------------ pieces of the loop

    def _after_optimizer_step(self, output: dict, window: dict) -> None:
        """Plugins run; the step's scalars are collected for TensorBoard and the console line."""
        logs = {k: float(v) / window["micro"] for k, v in window["logs"].items()}
        for plugin in self.task.plugins:
            logs |= plugin.after_optimizer_step(self.pos.step)
        logs |= {f"metrics/{k}": float(v) for k, v in output.get("metrics", {}).items()}
        elapsed = window["data"] + window["compute"]
        logs |= {"train/lr": window["lr"], "train/epoch": self.pos.epoch,
                 "perf/samples_per_s": window["samples"] / max(elapsed, 1e-9),
                 "perf/data_wait_frac": window["data"] / max(elapsed, 1e-9),
                 "perf/data_s": window["data"], "perf/forward_s": window["forward"],
                 "perf/backward_s": window["backward"], "perf/optimizer_s": window["optimizer"],
                 "data/skipped_samples": self.skipped_samples}
        if self.precision.name == "fp16":
            logs |= {"fp16/loss_scale": float(self.ds.optimizer.cur_scale),
                     "fp16/skipped_steps": float(self.ds.skipped_steps)}
            self._check_loss_scale(logs["fp16/loss_scale"])
        logs |= peak_memory(self.dist.device) or {}
        logs["mem/estimate_gib"] = self.memory.total / GIB  # the pre-flight figure, beside the measured peaks
        self._pending_logs = logs

    def _epoch_batches(self) -> Iterator[dict]:
        """Micro-batches of the current epoch from the current position (a whole number of optimizer steps)."""
        usable = self.steps_per_epoch * self.accum
        if self.pos.batch_in_epoch >= usable:
            return
        self.stream.set_epoch(self.pos.epoch, skip_batches=self.pos.batch_in_epoch)
        loader = make_loader(self.stream, self.cfg.data.num_workers)
        loader.generator = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + self.pos.epoch)
        for i, batch in enumerate(loader, start=self.pos.batch_in_epoch):
            if i >= usable:
                break
            yield _to_device(batch, self.dist.device)

    def _maybe_checkpoint_and_stop(self, end_of_epoch: bool) -> str:
        step, pos = self.pos.step, self.pos
        if not end_of_epoch:
            self.log.scalars(step, self._pending_logs)
            self.log.progress(step, pos.epoch, self._pending_logs)
        if self._due(self.cfg.run.eval_every, end_of_epoch) and self.task.evaluate:
            self._evaluate()
        if self.cfg.run.stop_at_step is not None and step >= self.cfg.run.stop_at_step and not end_of_epoch:
            self.stop_signal = self.stop_signal or f"run.stop_at_step={self.cfg.run.stop_at_step}"
        stop = any_true(self.stop_signal is not None)
        budget = self.budget is not None and self._budget_spent()
        if self._due(self.cfg.run.save_every, end_of_epoch) or stop or budget or step >= self.total_steps:
            if self._saved_step != step:
                self._save()
        if stop:
            self.log.message(f"received {self.stop_signal or 'a stop signal'}: saved {self._saved_tag}; "
                             f"resume with run.resume=auto")
            return "preempted"
        if budget:
            self.log.message(f"time budget {self.cfg.run.time_budget} nearly spent: saved {self._saved_tag}")
            return "time_budget"
        return "running" if step < self.total_steps else "finished"

    def _due(self, every: str, end_of_epoch: bool) -> bool:
        n, unit = _parse_every_cached(every)
        if n <= 0:
            return False
        if unit == "epoch":
            return end_of_epoch and self.pos.epoch % n == 0
        return not end_of_epoch and self.pos.step % n == 0

    def _clock(self) -> float:
        """Wall time; with run.sync_timing the GPU's queued work is waited for first, so the split is real."""
        if self.cfg.run.sync_timing and self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        return time.time()

    def _budget_spent(self) -> bool:
        elapsed = time.time() - self.started
        per_step = elapsed / max(1, self.pos.step - self._start_step)
        return elapsed + 2 * per_step + 2 * self.last_save_s > self.budget

    def _nonfinite(self, loss: torch.Tensor, output: dict) -> bool:
        if torch.isfinite(loss):  # a non-finite objective makes the total non-finite (even at weight 0)
            self.nonfinite_run = 0
            return False
        bad = [k for k, v in output["losses"].items() if not torch.isfinite(v.detach()).all()] or ["total"]
        self.nonfinite_run += 1
        self.nonfinite_total = getattr(self, "nonfinite_total", 0) + 1
        self.log.scalars(self.pos.step, {"train/nonfinite_losses": self.nonfinite_total})
        self.log.message(f"step {self.pos.step}: non-finite loss in {', '.join(bad)}; micro-batch skipped")
        if self.nonfinite_run > self.cfg.run.max_nonfinite:
            raise TrainingStopped(f"{self.nonfinite_run} non-finite losses in a row (objective: {', '.join(bad)})"
                                  f" > run.max_nonfinite={self.cfg.run.max_nonfinite}; lower the learning rate "
                                  "or check the data")
        return True

    def _check_loss_scale(self, scale: float) -> None:
        min_scale = float(self.ds.config.get("fp16", {}).get("min_loss_scale", 1.0)) \
            if isinstance(self.ds.config, dict) else 1.0
        self._low_scale = getattr(self, "_low_scale", 0) + 1 if scale <= min_scale else 0
        if self._low_scale > self.cfg.run.max_nonfinite:
            raise TrainingStopped(f"fp16 loss scale collapsed to {scale} for {self._low_scale} steps: gradients "
                                  "overflow even at the minimum scale; lower the learning rate or use fp32/bf16")

    # ------------------------------------------------------------------ checkpoints and evaluation

    _saved_step, _saved_tag, _start_step = -1, None, 0

    def _save(self) -> None:
        t0 = time.time()
        client = {"position": vars(self.pos).copy(), "config": config_to_dict(self.cfg),
                  "plugins": {p.name: p.state_dict() for p in self.task.plugins
                              if not getattr(p, "per_rank_state", False)},
                  "skipped_samples": self.skipped_samples}
        rank_state = {"rng": checkpoint.rng_state(),
                      "plugins": {p.name: p.state_dict() for p in self.task.plugins
                                  if getattr(p, "per_rank_state", False)}}
        self._saved_tag = checkpoint.save(self.ds, self.ckpt_dir, self.pos.step, client, rank_state,
                                          self.dist.rank, self.cfg.run.keep_last)
        self._saved_step = self.pos.step
        self.last_save_s = time.time() - t0
        self.log.message(f"checkpoint {self.ckpt_dir / self._saved_tag} ({self.last_save_s:.1f}s)")

    def _resume(self) -> None:
        mode = self.cfg.run.resume
        if mode == "none":
            return
        if mode == "auto":
            tag, ckpt_dir = checkpoint.find_resume_tag(self.ckpt_dir), self.ckpt_dir
            if tag is None:
                return
        else:
            path = Path(mode)
            if not (path / checkpoint.COMPLETE).is_file():
                raise FileNotFoundError(f"run.resume: {mode} is not a complete checkpoint directory")
            tag, ckpt_dir = path.name, path.parent
        client, rank_state = checkpoint.load(self.ds, ckpt_dir, tag, self.dist.rank)
        self.pos = Position(**client["position"])
        self.skipped_samples = client.get("skipped_samples", 0)
        states = {**client.get("plugins", {}), **rank_state.get("plugins", {})}
        for plugin in self.task.plugins:
            if plugin.name in states:
                plugin.load_state_dict(states[plugin.name])
        if "rng" in rank_state:
            checkpoint.set_rng_state(rank_state["rng"])
        self._saved_step, self._saved_tag, self._start_step = self.pos.step, tag, self.pos.step
        self.log.message(f"resumed from {ckpt_dir / tag}: step {self.pos.step}, epoch {self.pos.epoch}, "
                         f"batch {self.pos.batch_in_epoch}")

    def _evaluate(self) -> dict[str, float]:
        was_training = self.ds.module.training
        self.ds.module.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.ds.module, self.pos.step) or {}
        self.ds.module.train(was_training)
        self._evaluated_step, self._last_eval = self.pos.step, metrics
        self.log.scalars(self.pos.step, {f"eval/{k}": v for k, v in metrics.items()
                                         if isinstance(v, (int, float))})
        for k, v in metrics.items():  # sample predictions: text (Markdown) or an image tensor [3,H,W]
            if isinstance(v, str):
                self.log.text(self.pos.step, f"eval/{k}", v)
            elif isinstance(v, torch.Tensor) and v.dim() == 3:
                self.log.image(self.pos.step, f"eval/{k}", v)
        self.log.flush()
        if metrics:
            self.log.message("eval step {}: {}".format(self.pos.step, ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))))
        return metrics

    def _preflight_memory(self) -> MemoryEstimate:
        """Print the per-GPU memory estimate before anything is allocated; refuse a run that cannot fit."""
        est = estimate_for_config(self.cfg, self.task.model, self.precision.name, self.dist.world_size,
                                  cuda=self.dist.device.type == "cuda")
        if self.dist.rank == 0:
            print(f"precision {self.precision.name}, {self.dist.world_size} rank(s)\n{est.table()}", flush=True)
        cap = self.cfg.run.memory_cap_gib
        check_fits(est, self.gpu, cap_bytes=int(cap * GIB) if cap else None)
        return est

    def _check_gpu(self) -> Optional[GpuFacts]:
        """Before any kernel runs: the build has kernels for this GPU; extensions target it; the memory cap applies."""
        if self.dist.device.type != "cuda":
            return None
        gpu = gpu_facts(self.dist.device)
        check_gpu_arch(gpu)
        set_extension_arch(gpu)
        cap = self.cfg.run.memory_cap_gib
        if cap:  # behave like a smaller GPU (e.g. a 16 GB P100 on an 80 GB card): the allocator refuses beyond it
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / gpu.total_memory), self.dist.device)
        return gpu

    def _build_stream(self, task: Task):
        cfg, d = self.cfg, self.dist
        if task.train_dataset is not None:
            return MapStream(task.train_dataset, task.collate, cfg.data.batch_size, seed=cfg.train.seed,
                             rank=d.rank, world_size=d.world_size)
        if cfg.data.train is None:
            raise ValueError(f"{cfg.source}: data.train is not set (a shard directory, pattern or list)")
        urls = expand_shards(cfg.data.train)
        if cfg.data.verify_checksums:
            verify_checksums(urls)
        return ShardStream(urls, task.decode, task.collate, cfg.data.batch_size, seed=cfg.train.seed,
                           shuffle_buffer=cfg.data.shuffle_buffer, rank=d.rank, world_size=d.world_size,
                           samples_per_epoch=cfg.data.samples_per_epoch)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT request a save-and-stop at the next step boundary; returns the handlers they replaced."""
        def handler(signum: int, _frame: Any) -> None:
            self.stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return previous


@functools.lru_cache(maxsize=None)
def _parse_every_cached(every: str) -> tuple[int, str]:
    return parse_every(every)


def _new_window() -> dict:
    return {"data": 0.0, "compute": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "samples": 0,
            "micro": 0, "logs": {}}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
