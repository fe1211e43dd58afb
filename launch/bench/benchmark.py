#!/usr/bin/env python
"""Benchmark a recipe: images/s, step-time split, peak memory, MFU, and the engine's overhead vs a minimal loop.

    python launch/bench/benchmark.py --recipe recipes/toy/toy.yaml [--steps 20] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework.cli import run_cli  # noqa: E402
from framework.gpu import PEAK_TFLOPS  # noqa: E402


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_flops(run: Any, batch: dict) -> int:
    """FLOPs of one forward + backward on `batch` (FlopCounterMode, CPU fused attention included: framework.flops;
    gradients are discarded)."""
    from framework.flops import flop_counter

    with flop_counter() as counter:
        loss, _ = run.combine(run.forward(batch), 0)
        run.ds.backward(loss)
    run.ds.module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def timed_split(run: Any, batches: Callable[[], dict], steps: int) -> dict[str, float]:
    """Run `steps` optimizer steps through the engine's own micro-step, timing data / forward / backward / optimizer
    separately (seconds per step; the GPU waited for at each reading)."""
    from framework.engine import Trainer
    from framework.tracking import QuietLog

    trainer = Trainer(run, sync_timing=True)
    trainer.log = QuietLog()  # fit() opens the run's logger; a non-finite step would report to it
    split = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(steps * run.accum):
        t0 = time.perf_counter()
        batch = batches()
        sync(run.dist.device)
        split["data"] += time.perf_counter() - t0
        trainer.tick = time.time()  # the data time is counted here, not in the engine's window
        trainer.micro_step(batch)
        for k, seconds in zip(("forward", "backward", "optimizer"), trainer.last_times):
            split[k] += seconds
    return {k: v / steps for k, v in split.items()}


def minimal_loop(run: Any, batch: dict, steps: int) -> float:
    """Seconds per optimizer step of a bare DeepSpeed loop on the same engine and batch (the yardstick)."""
    ds, dev = run.ds, run.dist.device
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps * run.accum):
        loss = sum(ds(batch)["losses"].values())
        ds.backward(loss)
        ds.step()
    sync(dev)
    return (time.perf_counter() - t0) / steps


class RepeatedBatch(IterableDataset):
    """A stream (framework.streams' interface: len, set_epoch, iteration) yielding one batch `n` times."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        pass

    def __iter__(self):
        return (dict(self.batch) for _ in range(self.n))


def engine_loop(run: Any, batch: dict, steps: int) -> float:
    """Seconds per optimizer step of the engine's own fit() on the same fixed batch (logging, plugins included)."""
    from framework.engine import Trainer

    run.stream = RepeatedBatch(batch, steps * run.accum)
    run.steps_per_epoch = steps
    run.progress.epoch, run.progress.batch_in_epoch = 0, 0
    run.total_steps = run.progress.step + steps
    trainer = Trainer(run)
    trainer.saved_step = run.total_steps  # no final save inside the timed region
    sync(run.dist.device)
    t0 = time.perf_counter()
    trainer.fit()
    sync(run.dist.device)
    return (time.perf_counter() - t0) / steps


def estimate_only(cfg: Any, task: Any, precision: str) -> int:
    """Print the per-GPU memory estimate for the recipe as configured (what a P100 run would print first)."""
    from framework.preflight import GIB, count_params, estimate_for_task

    if cfg.distill.enabled:
        from framework.distill import setup_distillation

        setup_distillation(task, cfg, 1)  # refuses what distillation cannot run (ZeRO-3) before estimating
    est = estimate_for_task(cfg, task, precision, world_size=1, cuda=True)
    trainable, frozen = count_params(task.model)
    print(f"{cfg.source}: {trainable / 1e6:.1f}M trainable, {frozen / 1e6:.1f}M frozen parameters")
    print(est.table())
    print(f"fits a 16 GB P100: {'yes' if est.total < 0.95 * 16e9 else 'NO'} ({est.total / GIB:.2f} GiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per phase")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternating engine/minimal measurements")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (auto on known GPUs)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--estimate-only", metavar="PRECISION", default=None, choices=["fp16", "bf16", "fp32"],
                        help="only build the model and print the memory estimate for fp16|bf16|fp32 (no GPU needed)")
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    def bench() -> int:
        import torch

        from framework.build import build_run
        from framework.config import import_recipe, load_config
        from framework.distributed import init_distributed
        from framework.loader import make_loader
        from framework.run_env import run_env

        tmp = tempfile.mkdtemp(prefix="bench-")
        cfg = load_config(args.recipe, [f"run.dir={tmp}", "run.resume=none", "run.save_every=0",
                                        "run.eval_every=0", "run.log_every=1000000",
                                        # the estimate needs shapes only: no weights to load, no held-out data
                                        *(["run.init_from=null", "data.val=null"] if args.estimate_only else []),
                                        *args.overrides])
        env = run_env(cfg, init_distributed())
        task = import_recipe(cfg.recipe, cfg.source).build(cfg, env)
        if args.estimate_only:
            return estimate_only(cfg, task, args.estimate_only)
        run = build_run(cfg, task, env)
        dev = env.device

        def epochs():
            while True:  # the recipe's own data, epoch after epoch
                run.stream.set_epoch(run.progress.epoch)
                for b in make_loader(run.stream, cfg.data.num_workers):
                    yield {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                run.progress.epoch += 1

        loader = epochs()
        first = next(loader)
        first.pop("_skipped", None)

        def batches() -> dict:
            batch = next(loader)
            batch.pop("_skipped", None)
            return batch

        flops = measure_flops(run, first)
        timed_split(run, batches, args.warmup)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        split = timed_split(run, batches, args.steps)
        step_s = sum(split.values())
        samples = cfg.data.batch_size * cfg.train.grad_accum * env.world_size
        ratios = []
        for _ in range(args.repeats):  # alternate to cancel drift (thermal, caches, other load)
            minimal = minimal_loop(run, first, args.steps)
            framework = engine_loop(run, first, args.steps)
            ratios.append(framework / minimal)
        ratios.sort()
        fig: dict[str, Any] = {
            "recipe": cfg.source, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "precision": run.precision.name, "world_size": env.world_size,
            "micro_batch": cfg.data.batch_size, "grad_accum": cfg.train.grad_accum,
            "samples_per_s": samples / step_s, "step_s": step_s,
            "split_s": split, "data_wait_frac": split["data"] / step_s,
            "gflop_per_sample": flops / cfg.data.batch_size / 1e9,
            "memory_estimate_gib": run.memory.total / 2**30,
            "overhead_ratio": ratios[len(ratios) // 2], "overhead_ratios": ratios,
        }
        if dev.type == "cuda":
            fig["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            fig["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
            name = fig["device"]
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
            if peak and args.peak_tflops is None:
                fig["peak_tflops"] = {"fp32": peak[0], "half": peak[1]}
        else:
            fig["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        achieved = flops / cfg.data.batch_size * fig["samples_per_s"] / 1e12
        fig["achieved_tflops"] = achieved
        if args.peak_tflops:
            fig["mfu"] = achieved / args.peak_tflops
        elif "peak_tflops" in fig:
            fig["mfu_vs_fp32_peak"] = achieved / fig["peak_tflops"]["fp32"]
            fig["mfu_vs_half_peak"] = achieved / fig["peak_tflops"]["half"]
        if env.is_main:
            print(run.memory.table())
            for k, v in fig.items():
                print(f"{k:>20}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
            if args.json:
                Path(args.json).write_text(json.dumps(fig, indent=2))
        return 0

    return run_cli(bench)


if __name__ == "__main__":
    sys.exit(main())
