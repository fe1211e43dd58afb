#!/usr/bin/env python
"""Benchmark a recipe: images/s, step-time split, peak memory, MFU, and the engine's overhead vs a minimal loop.

    python launch/benchmark.py --recipe recipes/toy/toy.yaml [--steps 20] [key=value ...]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.cli import run_cli  # noqa: E402
from framework.gpu import PEAK_TFLOPS  # noqa: E402



def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_flops(engine: Any, batch: dict) -> int:
    """FLOPs of one forward + backward on `batch` (torch's FlopCounterMode; gradients are discarded)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = engine.ds.module
    with FlopCounterMode(display=False) as counter:
        out = module(batch)
        loss, _ = engine.combine(out, 0)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def timed_split(engine: Any, batches: Callable[[], dict], steps: int) -> dict[str, float]:
    """Run `steps` optimizer steps timing data / forward / backward / optimizer separately (seconds per step)."""
    dev = engine.dist.device
    split = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(steps * engine.accum):
        t0 = time.perf_counter()
        batch = batches()
        sync(dev)
        t1 = time.perf_counter()
        loss, _ = engine.combine(engine.ds(batch), engine.pos.step)
        sync(dev)
        t2 = time.perf_counter()
        engine.ds.backward(loss)
        sync(dev)
        t3 = time.perf_counter()
        boundary = engine.ds.is_gradient_accumulation_boundary()
        engine.ds.step()
        if boundary:
            for plugin in engine.task.plugins:
                plugin.after_optimizer_step(engine.pos.step)
        sync(dev)
        t4 = time.perf_counter()
        for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4)):
            split[k] += b - a
    return {k: v / steps for k, v in split.items()}


def minimal_loop(engine: Any, batch: dict, steps: int) -> float:
    """Seconds per optimizer step of a bare DeepSpeed loop on the same engine and batch (the yardstick)."""
    ds, dev = engine.ds, engine.dist.device
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps * engine.accum):
        loss = sum(ds(batch)["losses"].values())
        ds.backward(loss)
        ds.step()
    sync(dev)
    return (time.perf_counter() - t0) / steps


def engine_loop(engine: Any, batch: dict, steps: int) -> float:
    """Seconds per optimizer step of the engine's own fit() on the same fixed batch (logging, plugins included)."""
    engine.total_steps = engine.pos.step + steps
    engine.cfg.run.save_every = "0"
    engine.cfg.run.eval_every = "0"
    engine._saved_step = engine.total_steps  # no final save inside the timed region
    engine._epoch_batches = lambda: (batch for _ in range(steps * engine.accum + 1))
    from framework.tracking import RunLogger

    engine.log = RunLogger(engine.run_dir, engine.dist.rank, engine.total_steps, engine.cfg.run.log_every)
    sync(engine.dist.device)
    t0 = time.perf_counter()
    engine.fit()
    sync(engine.dist.device)
    return (time.perf_counter() - t0) / steps


def estimate_only(cfg: Any, task: Any, precision: str) -> int:
    """Print the per-GPU memory estimate for the recipe as configured (what a P100 run would print first)."""
    from framework.preflight import GIB, count_params, estimate_for_config

    model = task.model
    if cfg.distill.enabled:
        from framework.distill import with_self_distillation

        model = with_self_distillation(task, cfg, 1).model
    est = estimate_for_config(cfg, model, precision, world_size=1, cuda=True)
    trainable, frozen = count_params(getattr(model, "student", model))
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

        from framework.config import import_recipe, load_config
        from framework.engine import Engine

        tmp = tempfile.mkdtemp(prefix="bench-")
        cfg = load_config(args.recipe, [f"run.dir={tmp}", "run.resume=none", "run.save_every=0",
                                        "run.eval_every=0", "run.log_every=1000000",
                                        # the estimate needs shapes only: no weights to load, no held-out data
                                        *(["run.init_from=null", "data.val=null"] if args.estimate_only else []),
                                        *args.overrides])
        task = import_recipe(cfg.recipe, cfg.source).build(cfg)
        if args.estimate_only:
            return estimate_only(cfg, task, args.estimate_only)
        engine = Engine(cfg, task)
        dev = engine.dist.device
        loader = iter(engine._epoch_batches())
        first = next(loader)

        def batches() -> dict:
            nonlocal loader
            try:
                return next(loader)
            except StopIteration:
                engine.pos.epoch += 1
                engine.pos.batch_in_epoch = 0
                loader = iter(engine._epoch_batches())
                return next(loader)

        flops = measure_flops(engine, first)
        timed_split(engine, batches, args.warmup)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        split = timed_split(engine, batches, args.steps)
        step_s = sum(split.values())
        samples = cfg.data.batch_size * cfg.train.grad_accum * engine.dist.world_size
        ratios = []
        for _ in range(args.repeats):  # alternate to cancel drift (thermal, caches, other load)
            minimal = minimal_loop(engine, first, args.steps)
            framework = engine_loop(engine, first, args.steps)
            ratios.append(framework / minimal)
        ratios.sort()
        fig: dict[str, Any] = {
            "recipe": cfg.source, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "precision": engine.precision.name, "world_size": engine.dist.world_size,
            "micro_batch": cfg.data.batch_size, "grad_accum": cfg.train.grad_accum,
            "samples_per_s": samples / step_s, "step_s": step_s,
            "split_s": split, "data_wait_frac": split["data"] / step_s,
            "gflop_per_sample": flops / cfg.data.batch_size / 1e9,
            "memory_estimate_gib": engine.memory.total / 2**30,
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
        if engine.dist.rank == 0:
            print(engine.memory.table())
            for k, v in fig.items():
                print(f"{k:>20}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
            if args.json:
                Path(args.json).write_text(json.dumps(fig, indent=2))
        return 0

    return run_cli(bench)


if __name__ == "__main__":
    sys.exit(main())
