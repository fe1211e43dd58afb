"""Running a built run: one readable `fit()` loop (framework.build.build_run builds what it runs)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, Optional

import torch

from . import checkpoint
from .build import Run
from .config import config_to_dict, parse_duration, parse_every, save_resolved
from .deepspeed_patches import loss_scale, skip_next_step
from .distributed import any_nonfinite, any_true
from .health import HealthMonitor, StepLosses, TrainingStopped
from .loader import batch_size_of, make_loader
from .preflight import GIB
from .rundir import RunLock, check_shared
from .stop_signals import Interrupt, StopSignals
from .streams import SKIPPED
from .tracking import RunLogger, StepWindow, detached, mean_losses_over_ranks, peak_memory, read_scalars

__all__ = ["FitResult", "StepDone", "StopReason", "Trainer", "TrainingStopped", "fit"]


class StopReason(Enum):
    """Why fit() ended."""

    FINISHED = "finished"  # the configured length
    PREEMPTED = "preempted"  # a signal or run.stop_at_step (on any rank)
    TIME_BUDGET = "time_budget"  # run.time_budget nearly spent
    UNHEALTHY = "unhealthy"  # the health monitor's verdict: fit() saves, then raises TrainingStopped


@dataclass
class StepDone:
    """An optimizer step finished by Trainer.micro_step: its scalars (values may be device tensors) and the recipe's
    chance levels for the health monitor."""

    scalars: dict[str, Any]
    chance: Any = None


@dataclass
class FitResult:
    step: int
    epoch: int
    reason: str  # a StopReason's value: finished | preempted | time_budget
    last_checkpoint: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains a Run: the loop, the step boundary (log -> evaluate -> save -> stop), signals, checkpoints."""

    def __init__(self, run: Run, sync_timing: bool = False):
        """sync_timing: wait for the GPU before each clock reading (a true forward/backward/step split)."""
        self.run, self.cfg, self.ds, self.progress = run, run.cfg, run.ds, run.progress
        self.sync_timing = sync_timing
        self.health = HealthMonitor(run.cfg.run, run.health)  # its counters as at the resumed checkpoint
        self.min_loss_scale = float(run.ds.config.get("fp16", {}).get("min_loss_scale", 1.0))  # DeepSpeed's default
        self.log: Optional[RunLogger] = None  # opened by fit(): a start that failed earlier wrote nothing
        self.pending: list[tuple[int, int, dict[str, Any], Any]] = []  # steps not logged yet: (step, epoch, ...)
        self.signals = StopSignals()  # the stop asked for, and where a signal lands
        self.unhealthy: Optional[str] = None  # the health monitor's reason to stop, acted on at the next boundary
        self.started = time.time()
        self.start_step = self.progress.step
        self.saved_step, self.saved_tag = (self.progress.step, run.resumed_from) if run.resumed_from else (-1, None)
        self.last_save_s = 0.0
        self.last_eval: tuple[int, dict[str, Any]] = (-1, {})
        self.budget = parse_duration(run.cfg.run.time_budget) if run.cfg.run.time_budget else None
        self.save_every, self.eval_every = parse_every(run.cfg.run.save_every), parse_every(run.cfg.run.eval_every)
        self.window, self.losses, self.tick = StepWindow(), StepLosses(), time.time()  # the step being accumulated
        self.last_times = (0.0, 0.0, 0.0)  # the last micro_step's forward, backward, DeepSpeed step (seconds)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train until the configured length, a stop signal, the time budget, or a failure; returns where it ended
        (an unhealthy run raises TrainingStopped instead, its last good state saved)."""
        pos, metrics = self.progress, {}
        with self._run_dir(), self.signals.installed():
            try:
                stop = self._train()
                if stop is None and self.run.task.evaluate:
                    metrics = self.last_eval[1] if self.last_eval[0] == pos.step else self._evaluate()
            except Interrupt as e:  # a signal while waiting for data or evaluating: a boundary may never come
                self._interrupted(e.phase)
                stop = StopReason.PREEMPTED
        return FitResult(pos.step, pos.epoch, (stop or StopReason.FINISHED).value, self.saved_tag, metrics)

    def _train(self) -> Optional[StopReason]:
        """Epochs until the configured length or a stop reason, the last step saved; raises TrainingStopped after
        saving when the health monitor stopped the run."""
        stop = None
        while self.progress.step < self.run.total_steps and stop is None:
            stop = self._train_epoch()
        if stop is None and self.saved_step != self.progress.step:
            self._save()
        if self.unhealthy:  # a verdict of the last save's log flush included
            self.log.message(f"stopped: {self.unhealthy}; last good state saved in {self.run.ckpt_dir}")
            raise TrainingStopped(self.unhealthy)
        return stop

    def _train_epoch(self) -> Optional[StopReason]:
        """The rest of the current epoch, step by step, each followed by its boundary (log -> evaluate -> save);
        returns why training stops, or None to go on (the epoch ran out, or the last step is done)."""
        self.tick = time.time()
        for batch in self._epoch_batches():
            step = self.micro_step(batch)
            if step is None:
                continue  # mid-step: more micro-batches to accumulate
            self.pending.append((self.progress.step, self.progress.epoch, step.scalars, step.chance))
            if self.log.due(self.progress.step):
                self._flush_logs()  # values read once per log interval, losses the mean over ranks
            stop = self._boundary(end_of_epoch=False)
            if stop is not None or self.progress.step >= self.run.total_steps:
                return stop
        self.progress.epoch, self.progress.batch_in_epoch = self.progress.epoch + 1, 0
        return self._boundary(end_of_epoch=True)

    def micro_step(self, batch: dict[str, Any]) -> Optional[StepDone]:
        """One micro-batch: forward, backward and DeepSpeed's step (which updates only at the accumulation boundary);
        at the boundary the optimizer step is finished (finish_step) and returned, else None. The loop and the
        benchmarks call this; timings of the last call are in `last_times` (forward, backward, step seconds)."""
        run, ds, window = self.run, self.ds, self.window
        t0 = time.time()
        window.data_s += t0 - self.tick
        run.skipped_samples += int(batch.pop(SKIPPED, 0))
        output = run.forward(batch)  # {"losses": ..., "metrics": ..., "chance": ...}
        loss, logs = run.combine(output, self.progress.step)
        self.progress.batch_in_epoch += 1
        t1 = self._clock()
        self.losses.add(loss, output["losses"])  # checked once, at the step's end: no host sync here
        ds.backward(loss)
        t2 = self._clock()
        boundary = ds.is_gradient_accumulation_boundary()  # ask before step()
        window.lr = ds.get_lr()[0]  # the rate this step uses
        # the step's one host sync (all-reduced: every rank skips the same steps, staying in step); a non-finite step
        # is skipped as fp16's loss scaler would: no NaN in the weights (under fp16 the scaler does it: no sync here)
        bad = any_nonfinite(self.losses.total) if boundary and not run.loss_scaler_skips else None
        if bad:
            skip_next_step(ds)
        ds.step()
        self.tick = self._clock()
        window.add(logs, batch_size_of(batch) * run.dist.world_size, (t0, t1, t2, self.tick))
        self.last_times = (t1 - t0, t2 - t1, self.tick - t2)
        return self.finish_step(output, bad) if boundary else None

    def finish_step(self, output: dict[str, Any], bad: Optional[bool] = None) -> StepDone:
        """After DeepSpeed's optimizer step: progress.step advances, a non-finite step is reported (and counted
        towards run.max_nonfinite), the plugins run; returns the step's scalars (values may be device tensors)."""
        self.progress.step += 1
        # reported after ds.step(): a stop here saves DeepSpeed's state at progress.step; under fp16 this reads the flag
        # (the loss scaler has skipped the step if a loss was not finite)
        self.unhealthy = self.unhealthy or self.health.nonfinite(
            self.losses.total, {"losses": self.losses.objectives}, self.progress.step, self.log,
            "step skipped by the loss scaler" if self.run.loss_scaler_skips else "step skipped", bad)
        self.losses.clear()
        scalars = self._step_scalars(self.window, output)  # plugins run here, right after the step
        self.window = StepWindow()
        return StepDone(scalars, output.get("chance"))

    # ------------------------------------------------------------------ pieces of the loop

    def _step_scalars(self, window: StepWindow, output: dict) -> dict[str, Any]:
        """The step's scalars for TensorBoard and the console: losses, plugins' logs, metrics, lr, speed, memory.
        Values may be device tensors: _flush_logs reads them all at once (no host sync per step)."""
        scalars = window.scalars()
        for plugin in self.run.plugins:
            scalars |= plugin.after_optimizer_step(self.progress.step)
        scalars |= {f"metrics/{k}": detached(v) for k, v in output.get("metrics", {}).items()}
        scalars |= {"train/epoch": self.progress.epoch, "data/skipped_samples": self.run.skipped_samples}
        norm = self.ds.get_global_grad_norm()
        if norm is not None:
            scalars["train/grad_norm"] = detached(norm)
        if self.run.precision.name == "fp16":
            scalars |= {"fp16/loss_scale": detached(loss_scale(self.ds)),
                        "fp16/skipped_steps": float(self.ds.skipped_steps)}
        scalars |= peak_memory(self.run.dist.device)
        scalars["mem/estimate_gib"] = self.run.memory.total / GIB  # the pre-flight figure, beside the peaks
        return scalars

    def _flush_logs(self, collective: bool = True) -> None:
        """The pending steps' scalars read in one host sync per device, their losses averaged over ranks in one
        all-reduce (collective: every rank calls it at the same steps), then written, printed and health-checked in
        step order (health warnings and stops come at the log interval, with every step's values)."""
        pending, self.pending = self.pending, []
        read_scalars([scalars for _, _, scalars, _ in pending])
        if collective:
            mean_losses_over_ranks([scalars for _, _, scalars, _ in pending], self.run.dist.world_size,
                                   self.run.dist.device)
        for step, epoch, scalars, chance in pending:
            health, stop = self.health.check(step, scalars, {"chance": chance}, self.log, self.min_loss_scale)
            self.unhealthy = self.unhealthy or stop
            self.log.scalars(step, scalars | health)
            self.log.progress(step, epoch, scalars)

    def _epoch_batches(self) -> Iterator[dict]:
        """Micro-batches of the current epoch from the current position (a whole number of optimizer steps)."""
        run, pos = self.run, self.progress
        usable = run.steps_per_epoch * run.accum
        if pos.batch_in_epoch >= usable:
            return
        run.stream.set_epoch(pos.epoch, skip_batches=pos.batch_in_epoch)
        # pinned batches on CUDA: the non_blocking copies below then overlap the previous step's GPU work
        loader = make_loader(run.stream, self.cfg.data.num_workers, pin_memory=run.dist.device.type == "cuda")
        loader.generator = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + pos.epoch)
        batches = iter(loader)
        for i in range(pos.batch_in_epoch, usable):
            self.signals.phase = "data"
            try:
                batch = next(batches)
            except StopIteration:
                break
            self.signals.phase = "step"
            yield {k: v.to(run.dist.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                   for k, v in batch.items()}

    def _boundary(self, end_of_epoch: bool) -> Optional[StopReason]:
        """Evaluate (if due), then save (if due, stopping, or at the last step); returns the stop reason (None: on)."""
        if self._due(self.eval_every, end_of_epoch) and self.run.task.evaluate and not self.unhealthy:
            self._evaluate()
        stop = self._stop_reason(end_of_epoch)
        last = not end_of_epoch and self.progress.step >= self.run.total_steps
        if self._due(self.save_every, end_of_epoch) or stop is not None or last:
            self._save()
        return stop

    def _stop_reason(self, end_of_epoch: bool) -> Optional[StopReason]:
        """None (keep going) | UNHEALTHY | PREEMPTED (a signal or run.stop_at_step, on any rank) | TIME_BUDGET."""
        if self.unhealthy:  # every rank reached the same verdict: its inputs are the same on every rank
            return StopReason.UNHEALTHY
        stop_at = self.cfg.run.stop_at_step
        if stop_at is not None and self.progress.step >= stop_at and not end_of_epoch:
            self.signals.received = self.signals.received or f"run.stop_at_step={stop_at}"
        if any_true(self.signals.received is not None):
            return StopReason.PREEMPTED
        if self.budget is not None and any_true(self._budget_spent()):  # each rank's clock: decide together
            return StopReason.TIME_BUDGET
        return None

    def _due(self, every: tuple[int, str], end_of_epoch: bool) -> bool:
        """Whether `every` (n, "step" | "epoch"; n <= 0: never) falls on this boundary: a step's or an epoch's end."""
        n, unit = every
        if n <= 0 or end_of_epoch != (unit == "epoch"):
            return False
        return (self.progress.epoch if end_of_epoch else self.progress.step) % n == 0

    def _budget_spent(self) -> bool:
        elapsed = time.time() - self.started
        per_step = elapsed / max(1, self.progress.step - self.start_step)
        return elapsed + 2 * per_step + 2 * self.last_save_s > self.budget

    def _clock(self) -> float:
        """Wall time; with sync_timing the GPU's queued work is waited for first, so the split is real."""
        if self.sync_timing and self.run.dist.device.type == "cuda":
            torch.cuda.synchronize(self.run.dist.device)
        return time.time()

    # ------------------------------------------------------------------ checkpoints and evaluation

    def _save(self) -> None:
        """A checkpoint of this step on every rank: DeepSpeed's states, position, config, plugins, RNG streams."""
        self._flush_logs()  # a checkpoint's steps are in TensorBoard before it exists (a resume continues after it)
        t0 = time.time()
        run, plugins = self.run, self.run.plugins
        client = {"position": vars(self.progress).copy(), "config": config_to_dict(self.cfg),
                  "plugins": {p.name: p.state_dict() for p in plugins if not p.per_rank_state},
                  "skipped_samples": run.skipped_samples, "health": self.health.state_dict()}
        rank_state = {"rng": checkpoint.rng_state(),
                      "plugins": {p.name: p.state_dict() for p in plugins if p.per_rank_state}}
        self.saved_tag = checkpoint.save(self.ds, run.ckpt_dir, self.progress.step, client, rank_state, run.dist.rank,
                                         self.cfg.run.keep_last)
        self.saved_step, self.last_save_s = self.progress.step, time.time() - t0
        self.log.message(f"checkpoint {run.ckpt_dir / self.saved_tag} ({self.last_save_s:.1f}s)")
        if self.signals.received:
            self.log.message(f"received {self.signals.received}: saved {self.saved_tag}; resume with run.resume=auto")
        elif self.budget is not None and self._budget_spent():
            self.log.message(f"time budget {self.cfg.run.time_budget} nearly spent: saved {self.saved_tag}")

    def _evaluate(self) -> dict[str, Any]:
        """The recipe's evaluation on every rank (eval mode, no_grad), logged (framework.tracking)."""
        module, step = self.ds.module, self.progress.step
        was_training, self.signals.phase = module.training, "eval"
        module.eval()
        try:
            with torch.no_grad():
                metrics = self.run.task.evaluate(module, step) or {}
        finally:
            module.train(was_training)
            self.signals.phase = "step"
        self.last_eval = (step, metrics)
        self.log.evaluation(step, metrics)
        return metrics

    # ------------------------------------------------------------------ the run directory and signals

    @contextlib.contextmanager
    def _run_dir(self) -> Iterator[None]:
        """Rank 0 locks the run directory and writes the resolved config; the logger opens; all close at the end."""
        run = self.run
        with RunLock(run.run_dir) if run.dist.is_main else contextlib.nullcontext():
            if run.dist.is_main:
                save_resolved(self.cfg, run.run_dir)
            check_shared(run.run_dir)  # before any rank writes a checkpoint that the others would not see
            self.log = RunLogger(run.run_dir, run.dist.rank, run.total_steps, self.cfg.run.log_every)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a failure between log intervals: its steps still logged
                    self._flush_logs(collective=False)  # this rank's own values: the others may not be here
                self.log.close()

    def _interrupted(self, phase: str) -> None:
        """A stop signal outside a step: save unless a step's micro-batches are pending (then the last checkpoint
        stands and they are replayed on resume); fit then ends as preempted, like a stop at a step boundary."""
        pending = self.progress.batch_in_epoch % self.run.accum and phase == "data"
        if not pending and self.saved_step != self.progress.step:
            self._save()
        where = "while waiting for data" if phase == "data" else "during evaluation"
        self.log.message(f"received {self.signals.received} {where}: stopped at step {self.progress.step} "
                         f"(checkpoint: {self.saved_tag or 'none yet'}); resume with run.resume=auto")


def fit(run: Run, sync_timing: bool = False) -> FitResult:
    """Train a built run (framework.build.build_run) to its end; see Trainer.fit."""
    return Trainer(run, sync_timing).fit()
