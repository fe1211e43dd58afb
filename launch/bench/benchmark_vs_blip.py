#!/usr/bin/env python
"""Our MedBLIP training step against salesforce/BLIP's own, at full size, in one run: step time and peak memory.

    python launch/bench/benchmark_vs_blip.py [--rounds 3] [--steps 2] [--batch 4] [--queue-size 256]
                                             [--grad-ckpt] [--variants blip,ours] [--json FILE]

blip: BLIP_Pretrain.forward and pretrain.py's loop as salesforce/BLIP writes them (recipes/medblip/model/
      blip_reference.py, which tests/test_blip_training_sequence.py proves equal to our step: momentum update
      in the forward, ITC against the queues, ITM with hard negatives drawn row by row, LM, every text pass
      projecting the image tokens itself; `optimizer.zero_grad(); loss.backward(); optimizer.step()` with
      torch.optim.AdamW at its defaults, no clipping), on our towers with transformers' written-out text attention
      (BLIP's med.py math).
ours: framework.build.build_run of recipes/medblip/dapt.yaml at the same sizes (fp32, grad_accum 1, alpha 0, clip
      1.0) and the calls of one optimizer step of framework.engine's loop.
Both: ViT-B/16 + BERT-base from random weights, the same images and 30-token captions every step. A variant may carry
recipe overrides (`ours+model.text_attention=eager`) or `ours+ds_allreduce` (DeepSpeed's own all-reduce of the
gradients with itself in a world of one, which framework.build skips).

Each variant runs in a process of its own, one at a time, the order reversed every round (blip ours | ours blip | ...)
so that drift in the machine's load cancels. A process builds, takes one warm-up step, resets its peak RSS
(/proc/self/clear_refs) and times --steps steps: "peak RSS" is the steady training step's, "process peak" includes
building. The ratio ours/BLIP is taken per round (neighbouring processes); its median and range are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from framework.cli import run_cli  # noqa: E402

CAPTIONS = [  # ROCO-like; the first is longer than 30 tokens, so every batch is 30 wide with padding in the rest
    "axial contrast enhanced computed tomography of the abdomen showing a large hypodense lesion in the right lobe "
    "of the liver with peripheral nodular enhancement and a small amount of perihepatic free fluid",
    "chest radiograph showing a right upper lobe consolidation",
    "sagittal t2 weighted mri of the lumbar spine with a disc herniation at l4 l5",
    "ultrasound of the right kidney showing mild hydronephrosis",
]
MOMENTUM = 0.995


# ----------------------------------------------------------------------------- salesforce/BLIP's step, written out


def blip_variant(cfg: Any, batch: dict) -> Any:
    """A step function of BLIP's loop on a model with BLIP's own modules (plain Linear image projections)."""
    import torch
    from torch import nn

    from recipes.medblip import pretrain
    from recipes.medblip.model.blip_reference import blip_forward
    from recipes.medblip.model.shared_kv import SharedKVLinear

    model = pretrain.build_model(cfg, load_weights=False).train()
    for m in model.modules():
        if type(m) is SharedKVLinear:
            m.__class__ = nn.Linear
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        losses, _ = blip_forward(model, batch, cfg.model.alpha, MOMENTUM)
        loss_ita, loss_itm, loss_lm = losses["itc"], losses["itm"], losses["lm"]
        loss = loss_ita + loss_itm + loss_lm
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        for v in (loss_ita, loss_itm, loss_lm):  # metric_logger.update(loss_x=loss_x.item())
            v.item()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


# ----------------------------------------------------------------------------- ours: the engine


def ours_variant(cfg: Any, batch: dict, ds_allreduce: bool) -> Any:
    """A step function of framework.engine.Trainer.fit's per-step calls on framework.build.build_run's run."""
    from framework.build import build_run
    from framework.distributed import init_distributed
    from framework.run_env import run_env
    from framework.engine import Trainer
    from framework.tracking import QuietLog
    from recipes.medblip import pretrain

    env = run_env(cfg, init_distributed())
    run = build_run(cfg, pretrain.build(cfg, env), env)
    if ds_allreduce:
        vars(run.ds).pop("allreduce_gradients", None)  # DeepSpeed's own method again
    trainer = Trainer(run)
    trainer.log = QuietLog()  # fit() opens the run's logger; a non-finite step would report to it

    def step() -> tuple[float, float, float]:
        # the engine's own micro-step (one micro-batch = one optimizer step here): data loading, logging, saving aside
        if trainer.micro_step(dict(batch)) is None:
            raise RuntimeError("the benchmark's step did not reach the accumulation boundary")
        if trainer.health.nonfinite_total:
            raise RuntimeError("non-finite loss in the benchmark")
        return trainer.last_times

    return step


# ----------------------------------------------------------------------------- one variant in this process


def recipe_config(args: argparse.Namespace, work: Path, overrides: list[str]) -> Any:
    from framework.config import load_config

    return load_config(ROOT / "recipes" / "medblip" / "dapt.yaml", [
        f"run.dir={work / 'run'}", f"data.train={work / 'shards'}", "data.val=null", "run.init_from=null",
        "run.save_every=0", "run.eval_every=0", f"data.batch_size={args.batch}", "data.num_workers=0",
        "train.grad_accum=1", "train.precision=fp32", "train.max_steps=1000", "train.warmup_steps=0",
        f"model.queue_size={args.queue_size}", "model.alpha=0.0", f"image.size={args.image_size}",
        f"model.grad_checkpointing_vit={str(args.grad_ckpt).lower()}", *overrides])


def make_batch(tokenizer: Any, batch: int, image_size: int) -> dict:
    """The same images (BLIP's normalisation range) and captions in every process; BLIP's tokenisation (30 tokens)."""
    import torch

    image = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], padding="max_length", truncation=True,
                     max_length=30, return_tensors="pt")
    return {"image": image, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args: argparse.Namespace) -> int:
    """Build one variant, warm up, time --steps steps; write the figures as JSON to --out."""
    import torch

    from recipes.common.tokenizer import load_tokenizer

    kind, *extras = args.worker.split("+")
    ds_allreduce = "ds_allreduce" in extras
    overrides = [e for e in extras if e != "ds_allreduce"]
    if kind == "blip":
        overrides.append("model.text_attention=eager")  # med.py's attention, written out
    work = Path(args.work)
    cfg = recipe_config(args, work, overrides)
    batch = make_batch(load_tokenizer(cfg.model.tokenizer), args.batch, args.image_size)
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    step = blip_variant(cfg, batch) if kind == "blip" else ours_variant(cfg, batch, ds_allreduce)
    built = time.perf_counter() - t0
    warm = sum(step())  # allocates the optimizer states
    reset = reset_peak_rss()
    splits = [step() for _ in range(args.steps)]
    load.append(os.getloadavg()[0])
    result = {"variant": args.worker, "threads": torch.get_num_threads(), "build_s": built, "warmup_s": warm,
              "steps": [sum(s) for s in splits], "forward": [s[0] for s in splits],
              "backward": [s[1] for s in splits], "optimizer": [s[2] for s in splits],
              "peak_rss_gib": peak_rss_gib() if reset else None,
              "process_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "load": load}
    Path(args.out).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- the alternating run


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_variant(args: argparse.Namespace, variant: str, work: Path, index: int) -> dict:
    out = work / f"result_{index}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--work", str(work), "--out", str(out),
           "--steps", str(args.steps), "--batch", str(args.batch), "--queue-size", str(args.queue_size),
           "--image-size", str(args.image_size)] + (["--grad-ckpt"] if args.grad_ckpt else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    print(f"  {variant:<28} {median(result['steps']):6.2f} s/step  (" +
          ", ".join(f"{t:.2f}" for t in result["steps"]) + f")  load {result['load'][0]:.1f}-{result['load'][1]:.1f}",
          flush=True)
    return result


def report(args: argparse.Namespace, variants: list[str], rounds: list[dict[str, dict]]) -> dict:
    """Per variant: median step (and split), peak RSS; per non-BLIP variant: per-round ratios to BLIP."""
    summary: dict[str, Any] = {"settings": {k: getattr(args, k) for k in
                                            ("rounds", "steps", "batch", "queue_size", "image_size", "grad_ckpt")},
                               "variants": {}, "ratios": {}}
    loads = [x for r in rounds for res in r.values() for x in res["load"]]
    size = "tiny preset" if any("preset=tiny" in v for v in variants) else "full size (ViT-B/16 + BERT-base)"
    print(f"\n{size}, {args.image_size} px, batch {args.batch}, queue {args.queue_size}, "
          f"alpha 0, fp32, CPU, {rounds[0][variants[0]]['threads']} threads; ViT checkpointing "
          f"{'on' if args.grad_ckpt else 'off'}; {len(rounds)} rounds x {args.steps} timed steps per variant; "
          f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    print(f"{'variant':<28} {'s/step':>7} {'[min-max]':>13} {'forward':>8} {'backward':>9} {'optim':>7} "
          f"{'peak RSS':>9} {'process':>8}")
    for v in variants:
        res = [r[v] for r in rounds]
        steps = [t for x in res for t in x["steps"]]
        row = {k: median([t for x in res for t in x[k]]) for k in ("steps", "forward", "backward", "optimizer")}
        peaks = [x["peak_rss_gib"] for x in res if x["peak_rss_gib"] is not None]
        row |= {"min": min(steps), "max": max(steps), "all": steps, "peak_rss_gib": max(peaks) if peaks else None,
                "process_peak_gib": max(x["process_peak_gib"] for x in res)}
        summary["variants"][v] = row
        peak = f"{row['peak_rss_gib']:.2f} GiB" if peaks else "n/a"
        print(f"{v:<28} {row['steps']:7.2f} {row['min']:6.2f}-{row['max']:<6.2f} {row['forward']:8.2f} "
              f"{row['backward']:9.2f} {row['optimizer']:7.2f} {peak:>9} {row['process_peak_gib']:6.2f} GiB")
    base = variants[0]
    for v in variants[1:]:
        ratios = [median(r[v]["steps"]) / median(r[base]["steps"]) for r in rounds]
        b, o = summary["variants"][base], summary["variants"][v]
        mem = o["peak_rss_gib"] / b["peak_rss_gib"] if b["peak_rss_gib"] and o["peak_rss_gib"] else None
        summary["ratios"][v] = {"per_round": ratios, "median": median(ratios), "min": min(ratios),
                                "max": max(ratios), "peak_rss": mem,
                                "process_peak": o["process_peak_gib"] / b["process_peak_gib"]}
        mem_text = f"{mem:.2f}x" if mem else "n/a"
        print(f"{v} / {base}: step time {median(ratios):.2f}x (per round " +
              ", ".join(f"{x:.2f}" for x in ratios) + f"; range {min(ratios):.2f}-{max(ratios):.2f}), "
              f"peak RSS of the step {mem_text}, process peak {summary['ratios'][v]['process_peak']:.2f}x")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternations (each runs every variant once)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grad-ckpt", action="store_true", help="ViT activation checkpointing in both (dapt.yaml's)")
    parser.add_argument("--variants", default="blip,ours",
                        help="comma-separated; the first is the baseline; ours+KEY=VALUE adds a recipe override, "
                             "ours+ds_allreduce DeepSpeed's world-of-one gradient all-reduce")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_cli(lambda: worker(args))

    def run() -> int:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if len(variants) < 2 or any(v.split("+")[0] not in ("blip", "ours") for v in variants):
            raise ValueError("--variants: at least two of blip / ours[+override...], e.g. blip,ours")
        if args.batch < 2 or args.queue_size % args.batch:
            raise ValueError(f"--batch must be >= 2 and divide --queue-size {args.queue_size}")
        from corpora.phantoms import PhantomSpec, write_caption_shards

        with tempfile.TemporaryDirectory(prefix="bench_vs_blip_") as tmp:
            work = Path(tmp)  # a shard the run is built on (the benchmark feeds its own batch)
            write_caption_shards(work / "shards", PhantomSpec(image_size=args.image_size, samples_per_shard=8),
                                 "train", 8)
            rounds: list[dict[str, dict]] = []
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                print(f"round {r + 1}/{args.rounds}", flush=True)
                rounds.append({v: run_variant(args, v, work, r * len(variants) + i) for i, v in enumerate(order)})
            summary = report(args, variants, rounds)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
