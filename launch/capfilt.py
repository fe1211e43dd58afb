#!/usr/bin/env python
"""CapFilt (BLIP section 3.3) for radiology captions: bootstrap image-caption shards with the model's own captioner
and ITM filter.

    python launch/capfilt.py --model runs/medblip-dapt --shards data/rocov2/train --out data/rocov2-capfilt/train
    python launch/capfilt.py --captioner runs/capfilt-captioner --filter runs/capfilt-filter --shards ... --out ...
    deepspeed --num_gpus 4 launch/capfilt.py --model ... --shards ... --out ...   # shards split across ranks

Per image: k synthetic captions by nucleus sampling from the image-grounded decoder, the ITM match probability of
the original and of each synthetic caption, and every caption at or above --threshold kept as its own pair. The
output shards read like prepare_rocov2's (recipes/medblip/dapt_capfilt.yaml trains on them); manifest.json holds
counts, the score distribution and every decision; OUT/report/index.md and OUT/tb show them. Re-running the same
command skips finished shards; an interrupted run is finished by re-running it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framework.cli import run_cli  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="one model as captioner and filter: a DAPT (or PSD) run directory, "
                   "a checkpoint, BLIP's .pth or a transformers Blip* directory")
    p.add_argument("--captioner", default=None, help="the captioner (LM-fine-tuned, capfilt_captioner.yaml); "
                   "default --model")
    p.add_argument("--filter", default=None, help="the filter (ITC+ITM-fine-tuned, capfilt_filter.yaml); "
                   "default --model")
    p.add_argument("--shards", required=True, nargs="+", help="input shards: folder(s), brace pattern, glob or files")
    p.add_argument("--out", required=True, help="output folder: shards, manifest.json, report/, tb/")
    p.add_argument("--k", type=int, default=1, help="synthetic captions per image (BLIP: 1)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (BLIP: 0.9)")
    p.add_argument("--min-length", type=int, default=5,
                   help="decoder tokens, [DEC] included (BLIP's caption_coco.yaml: 5)")
    p.add_argument("--max-length", type=int, default=20,
                   help="decoder tokens, [DEC] included (BLIP's caption_coco.yaml: 20)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="BLIP's sampling: 1.1")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="keep a caption when its ITM match probability is >= this (BLIP: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic captions (per shard, sample, caption)")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs of capability >= 8.0, fp16 on older GPUs, fp32 on the CPU")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: this rank's GPU, else the CPU)")
    p.add_argument("--recipe", default=None,
                   help="model shape for weights outside a run directory (default recipes/medblip/dapt.yaml)")
    p.add_argument("--examples", type=int, default=12, help="example images in the report")
    p.add_argument("--no-report", action="store_true", help="write no report/ and tb/ (the manifest has everything)")
    p.add_argument("--overwrite", action="store_true", help="replace output of other inputs, options or models in --out")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides of --recipe (e.g. model.tokenizer=...)")
    args = p.parse_intermixed_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    args.captioner = args.captioner or args.model
    args.filter = args.filter or args.model
    if not args.captioner or not args.filter:
        p.error("give --model (one model for both), or --captioner and --filter")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def capfilt() -> int:
        from framework.distributed import init_distributed
        from recipes.medblip.capfilt.bootstrap import CapFiltOptions, run_capfilt
        from recipes.medblip.capfilt.generation import SamplingOptions
        from recipes.medblip.capfilt.ranks import RankFailure, world
        from recipes.medblip.capfilt.writing import FilterSettings

        sampling = SamplingOptions(args.k, args.top_p, args.min_length, args.max_length, args.repetition_penalty)
        opts = CapFiltOptions(shards=args.shards, out=args.out, captioner=args.captioner, filter=args.filter,
                              settings=FilterSettings(sampling, args.threshold, args.seed), recipe=args.recipe,
                              overrides=args.overrides, batch_size=args.batch_size, precision=args.precision,
                              device=args.device, overwrite=args.overwrite, examples=args.examples,
                              report=not args.no_report)
        opts.check()  # before any process group or model is built
        init_distributed()
        try:
            run_capfilt(opts)
        except RankFailure as e:  # every rank stops here together: one line, from rank 0
            if world()[0] == 0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        return 0

    return run_cli(capfilt)


if __name__ == "__main__":
    sys.exit(main())
