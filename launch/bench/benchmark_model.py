#!/usr/bin/env python
"""MedBLIP model cost at full size (ViT-B/16 + BERT-base): seconds per training step, peak memory, parameter counts.

    python launch/bench/benchmark_model.py [--batch 2] [--steps 3] [--image-size 224] [--precision fp32|bf16]
                                     [--queue-size 256] [--grad-ckpt] [--objectives itc,itm,lm]
                                     [--compare-share-kv]

A plain PyTorch step (momentum update, forward with all objectives, backward, AdamW), no DeepSpeed: the
model's own cost. Runs on a GPU when one is visible (peak allocated memory), else on the CPU (peak RSS).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework.cli import run_cli  # noqa: E402


def count_parameters(model) -> dict[str, int]:
    """Unique tensors (tied weights once): trainable, momentum (frozen EMA copies), other frozen."""
    momentum = {id(p) for m in model.fp32_modules() for p in m.parameters()}
    seen, counts = set(), {"trainable": 0, "momentum": 0, "frozen": 0}
    for p in model.parameters():  # parameters() yields each shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "momentum" if id(p) in momentum else "trainable" if p.requires_grad else "frozen"
        counts[kind] += p.numel()
    counts["buffers"] = sum(b.numel() for b in model.buffers())
    return counts


def compare_share_kv(model, batch: dict, step, steps: int) -> None:
    """Alternate steps with and without shared image K/V projections; print both step times and the loss gap."""
    import torch

    if not model.share_image_kv:
        print("shared image K/V: off in this configuration (text activation checkpointing); nothing to compare")
        return
    gaps = []
    with torch.no_grad():
        for _ in range(2):  # the same dropout masks for both settings, on the current weights
            out = {}
            queues = [b.clone() for b in (model.image_queue, model.text_queue, model.queue_ptr)]
            negatives = model.itm_generator.get_state()
            for share in (True, False):  # the same queue, ITM negatives and dropout masks for both
                model.share_image_kv = share
                for b, saved in zip((model.image_queue, model.text_queue, model.queue_ptr), queues):
                    b.copy_(saved)
                model.itm_generator.set_state(negatives)
                torch.manual_seed(123)
                out[share] = model(batch)["losses"]
            gaps += [abs(float(out[True][k]) - float(out[False][k])) for k in out[True]]
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for share in (False, True):
            model.share_image_kv = share
            t0 = time.perf_counter()
            step()
            times[share].append(time.perf_counter() - t0)
    model.share_image_kv = True
    on, off = (sorted(times[s])[len(times[s]) // 2] for s in (True, False))
    print(f"shared image K/V: {on:.2f} s/step vs {off:.2f} s/step without (median of {steps}, alternating): "
          f"{off / on:.2f}x faster; largest loss difference {max(gaps):.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (ViT and text)")
    parser.add_argument("--objectives", default="itc,itm,lm")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compare-share-kv", action="store_true",
                        help="also time steps without the shared image key/value projections (alternating) and "
                             "check that both give the same losses")
    args = parser.parse_args(argv)

    def run() -> int:
        import torch

        from framework.preflight import check_cuda_device
        from recipes.medblip.model.blip_pretrain import MedBlipPretrain
        from recipes.medblip.model.config import ModelConfig, VisionConfig

        if args.batch < 2:
            raise ValueError("--batch must be >= 2 (ITM draws a negative from the rest of the batch)")
        if args.queue_size % args.batch:
            raise ValueError(f"--queue-size {args.queue_size} must be a multiple of --batch {args.batch}")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_cuda_device(device)
        cfg = ModelConfig(preset="base", vit=VisionConfig(image_size=args.image_size), queue_size=args.queue_size,
                          grad_checkpointing_vit=args.grad_ckpt, grad_checkpointing_text=args.grad_ckpt)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = MedBlipPretrain(cfg, args.objectives.split(","))
        built = time.perf_counter() - t0
        counts = count_parameters(model)
        if args.precision == "bf16":
            model.to(torch.bfloat16)
            for m in model.fp32_modules():
                m.float()
        model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05)
        enc = model.tokenize(["a ct scan of the abdomen showing a large hypodense lesion in the right lobe of "
                              "the liver with surrounding oedema and no free fluid"] * args.batch, device)
        batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size, device=device), **enc}

        def step() -> dict:
            out = model(batch)
            loss = sum(out["losses"].values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.progress.step += 1  # the next forward applies this step's momentum update first, as BLIP's does
            if device.type == "cuda":
                torch.cuda.synchronize()
            return {k: float(v.detach()) for k, v in out["losses"].items()}

        t0 = time.perf_counter()
        step()  # warm-up: allocator, optimizer state
        warm = time.perf_counter() - t0
        times, losses = [], {}
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses = step()
            times.append(time.perf_counter() - t0)
        if args.compare_share_kv:
            compare_share_kv(model, batch, step, args.steps)
        if device.type == "cuda":
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated (GPU)"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"
        mean = sum(times) / len(times)
        print(f"MedBLIP {cfg.preset}: ViT {cfg.vit.depth}x{cfg.vit.width} @ {args.image_size}px, BERT "
              f"{cfg.text.layers}x{cfg.text.hidden}, vocab {len(model.tokenizer)}, queue {args.queue_size}")
        ckpt = "on" if args.grad_ckpt else "off"
        print(f"device {device.type} ({torch.get_num_threads()} threads), precision {args.precision}, batch "
              f"{args.batch}, objectives {args.objectives}, activation checkpointing {ckpt}")
        print(f"parameters: trainable {counts['trainable'] / 1e6:.1f}M, momentum (fp32 copies) "
              f"{counts['momentum'] / 1e6:.1f}M, other frozen {counts['frozen'] / 1e6:.1f}M, "
              f"buffers {counts['buffers'] / 1e6:.2f}M")
        print(f"build {built:.1f}s, warm-up step {warm:.1f}s")
        print(f"seconds per training step: {mean:.2f} (min {min(times):.2f}, max {max(times):.2f}, "
              f"{args.steps} steps)  -> {args.batch / mean:.2f} img/s")
        print(f"peak memory: {peak}")
        print("losses: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
