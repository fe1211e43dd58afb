#!/usr/bin/env python
"""The extra cost of self-distillation: step time and memory of PSD vs DAPT on the same batch.

    python launch/bench/benchmark_psd.py [--size tiny|small|base] [--steps 5] [--shards DIR] [key=value ...]

Both variants are the same recipe (psd.yaml) with distill.enabled false / true, trained by the framework's
engine on one fixed batch; each runs in its own process so that peak memory (RSS on the CPU, CUDA max allocated
on a GPU) belongs to it alone. Without --shards a few synthetic image-caption pairs are written to a temp dir.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from framework.cli import run_cli  # noqa: E402

# Model sizes (overrides of the recipe). small: a CPU-sized BLIP with BERT's real 30524-token vocabulary.
SIZES: dict[str, list[str]] = {
    "tiny": ["model.preset=tiny", "image.size=32", "model.queue_size=64", "data.batch_size=4"],
    "small": ["model.preset=tiny", "image.size=128", "model.vit.patch_size=16", "model.vit.width=256",
              "model.vit.depth=4", "model.vit.heads=4", "model.vit.mlp_ratio=4.0", "model.text.hidden=256",
              "model.text.layers=4", "model.text.heads=4", "model.text.intermediate=1024",
              "model.text.max_position=512", "model.queue_size=256", "data.batch_size=8"],
    "base": ["model.preset=base", "image.size=224", "model.queue_size=256", "data.batch_size=16"],
}
WORDS = ("axial ct of the chest shows a right lower lobe consolidation with air bronchograms and a small "
         "pleural effusion no pneumothorax mri brain flair hyperintense lesion periventricular white matter "
         "contrast enhanced abdomen liver hypodense mass portal vein thrombosis").split()


def write_synthetic_shard(out_dir: Path, n: int, size: int, seed: int = 0) -> Path:
    """n random RGB JPEGs with 30-word radiology-like captions, one tar shard (the recipe's sample format)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(out_dir / "synthetic-00000.tar")) as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS, 30))
            tar.write({"__key__": f"s{i:06d}", "jpg": buf.getvalue(), "txt": caption,
                       "json": json.dumps({"image_id": f"s{i:06d}"})})
    return out_dir


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


class ForwardTimer:
    """Accumulates the wall time of a module's forward (the teacher's, inside the wrapper's forward)."""

    def __init__(self, module: Any, sync: Any):
        self.seconds, self.sync, self.start = 0.0, sync, 0.0
        if module is not None:
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self.sync()
        self.start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.sync()
        self.seconds += time.perf_counter() - self.start


def measure(recipe: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Build the engine for one variant and time `steps` optimizer steps on one fixed batch."""
    import torch

    from framework.build import build_run
    from framework.config import import_recipe, load_config
    from framework.distributed import init_distributed
    from framework.loader import make_loader
    from framework.run_env import run_env
    from framework.streams import SKIPPED

    cfg = load_config(recipe, overrides)
    env = run_env(cfg, init_distributed())
    task = import_recipe(cfg.recipe, cfg.source).build(cfg, env)
    run = build_run(cfg, task, env)
    ds, dev, plugins = run.ds, env.device, run.plugins
    run.stream.set_epoch(0)
    batch = next(iter(make_loader(run.stream, 0)))
    batch.pop(SKIPPED, None)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    ema = next((p for p in plugins if p.name == "ema_teacher"), None)
    teacher = ForwardTimer(ema.teacher if ema else None, sync)
    rss_setup = current_rss_gib()
    parts = ("forward", "backward", "optimizer", "plugins")
    per_step: list[dict[str, float]] = []  # one dict per timed optimizer step
    step = 0
    for i in range(warmup + steps):
        if i == warmup and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        split = dict.fromkeys(parts, 0.0)
        teacher.seconds = 0.0
        for _ in range(run.accum):
            sync()
            t0 = time.perf_counter()
            loss, _ = run.combine(run.forward(batch), step)
            sync()
            t1 = time.perf_counter()
            ds.backward(loss)
            sync()
            t2 = time.perf_counter()
            boundary = ds.is_gradient_accumulation_boundary()
            ds.step()
            sync()
            t3 = time.perf_counter()
            if boundary:
                step += 1
                for plugin in plugins:
                    plugin.after_optimizer_step(step)
            sync()
            t4 = time.perf_counter()
            for k, a, b in zip(parts, (t0, t1, t2, t3), (t1, t2, t3, t4)):
                split[k] += b - a
        if i >= warmup:
            per_step.append({**split, "teacher": teacher.seconds, "step": sum(split.values())})
    student = ds.module
    fig: dict[str, Any] = {
        "distill": cfg.distill.enabled, "precision": run.precision.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "micro_batch": cfg.data.batch_size, "grad_accum": cfg.train.grad_accum,
        "student_params_m": sum(p.numel() for p in student.parameters()) / 1e6,
        "teacher_params_m": sum(p.numel() for p in ema.teacher.parameters()) / 1e6 if ema else 0.0,
        # medians over the timed steps: robust to other processes sharing the CPU for a moment
        "step_s": median(d["step"] for d in per_step), "split_s": {k: median(d[k] for d in per_step) for k in parts},
        "teacher_forward_s": median(d["teacher"] for d in per_step), "step_times_s": [d["step"] for d in per_step],
        "rss_after_setup_gib": rss_setup,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "memory_estimate_gib": run.memory.total / 2 ** 30,
    }
    if dev.type == "cuda":
        fig["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return fig


def report(dapt: dict, psd: dict) -> str:
    mem = "cuda_max_allocated_gib" if "cuda_max_allocated_gib" in dapt else "peak_rss_gib"
    rows = [("step time (s)", "step_s"), ("  forward (s)", ("split_s", "forward")),
            ("    of which teacher (s)", "teacher_forward_s"), ("  backward (s)", ("split_s", "backward")),
            ("  optimizer (s)", ("split_s", "optimizer")), ("  plugins: EMA, r_hat (s)", ("split_s", "plugins")),
            (f"{mem} ", mem), ("RSS after set-up (GiB)", "rss_after_setup_gib"),
            ("engine's estimate (GiB)", "memory_estimate_gib")]
    get = lambda d, k: d[k[0]][k[1]] if isinstance(k, tuple) else d[k]  # noqa: E731
    lines = [f"PSD vs DAPT on {psd['device']}, {psd['precision']}, micro-batch {psd['micro_batch']} x accumulation "
             f"{psd['grad_accum']}, {psd['student_params_m']:.1f}M student parameters "
             f"(+{psd['teacher_params_m']:.1f}M fp32 teacher)",
             f"  {'':<28}{'DAPT':>10}{'PSD':>10}{'PSD/DAPT':>10}"]
    for label, key in rows:
        a, b = get(dapt, key), get(psd, key)
        ratio = f"{b / a:10.2f}" if a else f"{'':>10}"
        lines.append(f"  {label:<28}{a:10.3f}{b:10.3f}{ratio}")
    lines.append(f"  step times of the repeats (s): DAPT {', '.join(f'{v:.3f}' for v in dapt['repeat_step_s'])}; "
                 f"PSD {', '.join(f'{v:.3f}' for v in psd['repeat_step_s'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "medblip" / "psd.yaml"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating DAPT/PSD runs; the fastest of each is kept")
    parser.add_argument("--shards", default=None, help="real shards to take the batch from (default: synthetic)")
    parser.add_argument("--json", default=None, help="also write both variants' figures to this file")
    parser.add_argument("--variant", choices=("dapt", "psd"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, after the size's")
    args = parser.parse_args(argv)

    def bench() -> int:
        if min(args.steps, args.grad_accum, args.repeats) < 1:
            raise ValueError("--steps, --grad-accum and --repeats must be >= 1")
        if args.variant:  # a child: one variant, figures to --out
            tmp = tempfile.mkdtemp(prefix="bench-psd-")
            over = [f"run.dir={tmp}", "run.resume=none", "run.save_every=0", "run.eval_every=0",
                    "run.log_every=1000000", "run.init_from=null", "data.val=null", "data.num_workers=0",
                    "train.epochs=null", f"train.max_steps={args.steps + args.warmup + 1}",
                    f"train.grad_accum={args.grad_accum}", "train.warmup_steps=0",
                    f"distill.enabled={'true' if args.variant == 'psd' else 'false'}",
                    *SIZES[args.size], *args.overrides]
            fig = measure(args.recipe, over, args.steps, args.warmup)
            Path(args.out).write_text(json.dumps(fig))
            return 0
        shards = args.shards
        with tempfile.TemporaryDirectory(prefix="bench-psd-data-") as tmp:
            if shards is None:
                size = int(next(o.split("=")[1] for o in SIZES[args.size] if o.startswith("image.size=")))
                batch = int(next(o.split("=")[1] for o in SIZES[args.size] if o.startswith("data.batch_size=")))
                shards = str(write_synthetic_shard(Path(tmp) / "shards", batch * args.grad_accum * 2, size))
            figs: dict[str, dict] = {}
            runs: dict[str, list[float]] = {"dapt": [], "psd": []}
            for variant in ("dapt", "psd") * args.repeats:  # alternating: slow phases of a shared machine hit both
                out = Path(tmp) / f"{variant}.json"
                cmd = [sys.executable, __file__, "--variant", variant, "--out", str(out), "--size", args.size,
                       "--recipe", args.recipe, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--grad-accum", str(args.grad_accum), f"data.train={shards}", *args.overrides]
                env = {k: v for k, v in os.environ.items()
                       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    print(f"error: the {variant} run failed: {tail.removeprefix('error: ')}", file=sys.stderr)
                    return proc.returncode
                fig = json.loads(out.read_text())
                runs[variant].append(fig["step_s"])
                if variant not in figs or fig["step_s"] < figs[variant]["step_s"]:
                    figs[variant] = fig  # the least disturbed repeat
            for variant, fig in figs.items():
                fig["repeat_step_s"] = runs[variant]
        print(report(figs["dapt"], figs["psd"]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(figs, indent=2))
        return 0

    return run_cli(bench)


if __name__ == "__main__":
    sys.exit(main())
