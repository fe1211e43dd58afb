#!/usr/bin/env python
"""train.compile's speed: a MedBLIP training forward + backward, eager vs towers compiled, interleaved rounds.

    python launch/bench/benchmark_compile.py [--preset tiny] [--batch 8] [--image 32] [--steps 5] [--rounds 3]

Prints the compile time, seconds per step of each and the speed-up (eager time / compiled time) per round, with its
median and spread and the machine's load average (on a shared CPU the spread says how much the figure means).
On the CPU inductor generates C++ (a compiler is needed); on a GPU Triton kernels (sm_75 and newer).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model.preset (tiny | base)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=32, help="image size (tiny: 32)")
    parser.add_argument("--steps", type=int, default=5, help="forward+backward passes per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved eager/compiled rounds")
    parser.add_argument("--warmup", type=int, default=4,
                        help="compiled passes before timing (the second call of a new shape recompiles it dynamic)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from framework.compile import compile_towers
    from framework.gpu import gpu_facts
    from recipes.medblip.model.blip_pretrain import MedBlipPretrain
    from recipes.medblip.model.config import ModelConfig, VisionConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(preset=args.preset, queue_size=4 * args.batch, embed_dim=16,
                      vit=VisionConfig(image_size=args.image))
    eager = MedBlipPretrain(cfg).to(device).train()
    compiled = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(0)
    captions = ["a chest x ray with a small nodule", "ct of the head", "mri of the brain", "abdominal ultrasound"]
    batch = {"image": torch.randn(args.batch, 3, args.image, args.image, generator=g).to(device),
             **eager.tokenize([captions[i % 4] for i in range(args.batch)], device)}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def steps(model: torch.nn.Module, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            loss = sum(model(batch)["losses"].values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - t0) / n

    compile_towers(compiled, gpu_facts(device) if device.type == "cuda" else None)
    t0 = time.perf_counter()
    steps(compiled, args.warmup)  # compiles, then recompiles with dynamic shapes (ITM's 2B rows, the decoder)
    compile_s = time.perf_counter() - t0
    steps(eager, 1)
    rounds = []
    for _ in range(args.rounds):
        e, c = steps(eager, args.steps), steps(compiled, args.steps)
        rounds.append({"eager_s": e, "compiled_s": c, "speedup": e / c})
    speedups = sorted(r["speedup"] for r in rounds)
    fig = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "preset": args.preset, "batch": args.batch, "image": args.image, "steps_per_round": args.steps,
           "rounds": rounds, "speedup_median": statistics.median(speedups),
           "speedup_spread": [speedups[0], speedups[-1]], "compile_s": compile_s,
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "threads": torch.get_num_threads()}
    for r in rounds:
        print(f"eager {r['eager_s']:.3f} s/step, compiled {r['compiled_s']:.3f} s/step: x{r['speedup']:.2f}")
    print(f"speed-up (eager / compiled): median x{fig['speedup_median']:.2f}, spread x{speedups[0]:.2f}-"
          f"x{speedups[-1]:.2f} over {len(rounds)} rounds; compile {compile_s:.0f} s; device {fig['device']}; "
          f"load average {fig['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
