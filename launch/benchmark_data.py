#!/usr/bin/env python
"""Data-pipeline throughput of the MedBLIP recipe: images/s per worker process (decode + augment + batch).

    python launch/benchmark_data.py [--shards DIR] [--workers 1 2] [--batches 60]

Without --shards it prepares the MedPix sample (../shared/data/medpix2_sample, or --medpix) into a temp dir.
Runs framework.data.ShardStream + make_loader exactly as training does, with BLIP's training transform
and the bundled tokenizer, and prints one line per setting. Compare with what a GPU step consumes
(a P100 trains on ~12 img/s of BLIP-base).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _prepare_medpix(medpix: Path, out: Path) -> None:
    from recipes.medblip.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(input=str(medpix / "sample_captions.csv"), out=str(out), split="all",
                           samples_per_shard=100, workers=2), log=lambda s: None)


def measure(urls: list[str], workers: int, batches: int, batch_size: int, train: bool, size: int) -> tuple[float, int]:
    """Images/s over `batches` batches after one warm-up batch (worker start-up excluded)."""
    from framework.data import ShardStream, make_loader
    from recipes.medblip.data import ImageConfig, make_collate, make_decode
    from recipes.medblip.tokenizer import load_tokenizer

    decode = make_decode(ImageConfig(size=size), train=train)
    collate = make_collate(load_tokenizer("bundled"), 30)
    stream = ShardStream(urls, decode, collate, batch_size, seed=0, shuffle_buffer=100)
    loader = make_loader(stream, workers)
    seen, epoch, t0, done = 0, 0, 0.0, 0
    while done <= batches:
        stream.set_epoch(epoch)
        for batch in loader:
            if done == 0:
                t0 = time.perf_counter()  # after the first batch: workers are up and their buffers filled
            else:
                seen += batch["image"].shape[0]
            done += 1
            if done > batches:
                break
        epoch += 1
    return seen / (time.perf_counter() - t0), seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shard folder/pattern (default: prepare the MedPix sample)")
    p.add_argument("--medpix", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "medpix2_sample"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process, as in training
    import torch

    torch.set_num_threads(1)
    from framework.data import expand_shards

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards
        if spec is None:
            medpix = Path(args.medpix)
            if not (medpix / "sample_captions.csv").is_file():
                print(f"error: no --shards and no MedPix sample at {medpix}", file=sys.stderr)
                return 2
            t = time.perf_counter()
            _prepare_medpix(medpix, Path(tmp))
            print(f"prepared the MedPix sample into {tmp} in {time.perf_counter() - t:.1f} s")
            spec = tmp
        urls = expand_shards(spec)
        print(f"pipeline: framework.data.ShardStream + make_loader, recipes.medblip.data decode/collate; "
              f"{len(urls)} shards, batch {args.batch_size}, image {args.size}, {os.cpu_count()} CPUs")
        for train in (False, True):
            for w in args.workers:
                rate, n = measure(urls, w, args.batches, args.batch_size, train, args.size)
                per = rate / max(w, 1)
                what = "train (crop+RandAugment)" if train else "eval (resize)"
                print(f"  {what:26s} workers={w}: {rate:6.1f} img/s total, {per:6.1f} img/s per worker ({n} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
