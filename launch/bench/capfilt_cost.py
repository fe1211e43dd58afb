#!/usr/bin/env python
"""What CapFilt costs per image: image embeddings, k nucleus-sampled captions and the ITM scores of the original and
the synthetic captions, with a BLIP-sized model of random weights (no download) on random images.

    python launch/bench/capfilt_cost.py [--preset base] [--batch 8] [--k 1] [--repeats 3] [--device cpu] [--precision auto]

Random weights rarely stop early: a caption runs to --max-length, the upper bound of the generation cost. Prints
seconds per image (median of the repeats, and their range) of each part: the ViT image embedding, captioning (k
sampled captions from the decoder) and filtering (ITM of the original and the k synthetic captions), and their sum
with one model for both (one embedding; separate captioner and filter models embed each image twice).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=["base", "tiny"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto")
    args = p.parse_args(argv)

    import torch

    from recipes.medblip.capfilt.generation import SamplingOptions, sample_captions
    from recipes.medblip.capfilt.models import inference_precision, resolve_device
    from recipes.medblip.capfilt.scoring import match_scores
    from recipes.medblip.model.blip_pretrain import MedBlipPretrain
    from recipes.medblip.model.config import ModelConfig

    device = resolve_device(args.device)
    precision = inference_precision(args.precision, device)
    cfg = ModelConfig(preset=args.preset, vit={"image_size": args.image_size})
    torch.manual_seed(0)
    model = MedBlipPretrain(cfg).to(device=device, dtype=precision.dtype).eval()
    opts = SamplingOptions(k=args.k, max_length=args.max_length)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    captions = ["axial ct of the chest shows a right lower lobe consolidation with a small pleural effusion"] * args.batch
    seeds = [[i * 10 + j for j in range(args.k)] for i in range(args.batch)]

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def once() -> dict[str, float]:
        """Seconds per image of each part of one batch."""
        with torch.no_grad():
            t0 = clock()
            embeds = model.image_embeddings(images)
            t1 = clock()
            synthetic = sample_captions(model, embeds, seeds, opts)
            t2 = clock()
            match_scores(model, embeds, [[c] + s for c, s in zip(captions, synthetic)])
            t3 = clock()
        parts = {"embedding": t1 - t0, "captioning": t2 - t1, "filtering": t3 - t2}
        return {k: v / args.batch for k, v in {**parts, "total": t3 - t0}.items()}

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    print(f"capfilt cost, s/image, median (range) of {args.repeats} repeats | preset {args.preset}, image "
          f"{args.image_size}, batch {args.batch}, k {args.k}, max_length {args.max_length}, {precision.name} on "
          f"{device} ({torch.get_num_threads()} threads)")
    for part, what in (("embedding", "ViT image embedding"), ("captioning", f"decoder: {args.k} nucleus caption(s)"),
                       ("filtering", f"ITM: original + {args.k} synthetic"), ("total", "one model for both")):
        times = [r[part] for r in runs]
        print(f"  {part:<10} {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
