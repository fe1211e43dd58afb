#!/usr/bin/env python
"""Data-pipeline throughput of the MedBLIP recipe: images/s per worker process (decode + augment + batch).

    python launch/bench/benchmark_data.py [--shards DIR | --images DIR] [--workers 1 2] [--batches 60]
                                    [--compare-draft --repeats 5]

Without --shards it prepares the MedPix sample (../shared/data/medpix2_sample, or --medpix) into a temp dir;
--images DIR shards a folder of images instead (e.g. VQA-RAD's JPEGs: image.draft only speeds up JPEGs).
Runs framework.streams.ShardStream + make_loader exactly as training does, with BLIP's training transform
and the bundled tokenizer, and prints one line per setting. --compare-draft times the training transform with
and without reduced-size JPEG decoding (image.draft) in one process, alternating, and prints median, min and
max of the images per CPU second and per wall second.
Compare with what a GPU step consumes (a P100 trains on ~12 img/s of BLIP-base).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def _prepare_medpix(medpix: Path, out: Path) -> None:
    from corpora.listings import PrepareOptions
    from corpora.rocov2 import prepare

    prepare(PrepareOptions(input=str(medpix / "sample_captions.csv"), out=str(out), split="all",
                           samples_per_shard=100, workers=2), log=lambda s: None)


def _shard_images(folder: Path, out: Path, per_shard: int = 100) -> int:
    """The images of a folder as caption shards (key.jpg/png + a fixed key.txt); returns how many."""
    import io
    import tarfile

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for first in range(0, len(files), per_shard):
        with tarfile.open(out / f"images-{first // per_shard:04d}.tar", "w") as tar:
            for i, f in enumerate(files[first:first + per_shard], start=first):
                ext = "png" if f.suffix.lower() == ".png" else "jpg"
                for name, data in ((f"{i:06d}.{ext}", f.read_bytes()), (f"{i:06d}.txt", b"a radiology image")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return len(files)


def measure(urls: list[str], workers: int, batches: int, batch_size: int, train: bool, size: int,
            draft: bool = True) -> tuple[float, int, float]:
    """(images/s, images, images per CPU second of this process) over `batches` batches after one warm-up batch
    (worker start-up excluded); the CPU rate counts the decoding only with workers=0 (in this process)."""
    from framework.loader import make_loader
    from framework.streams import ShardStream
    from recipes.common.image_text import ImageConfig, make_collate, make_decode
    from recipes.common.tokenizer import load_tokenizer

    decode = make_decode(ImageConfig(size=size, draft=draft), train=train)
    collate = make_collate(load_tokenizer("bundled"), 30)
    stream = ShardStream(urls, decode, collate, batch_size, seed=0, shuffle_buffer=100)
    loader = make_loader(stream, workers)
    seen, epoch, t0, c0, done = 0, 0, 0.0, 0.0, 0
    while done <= batches:
        stream.set_epoch(epoch)
        for batch in loader:
            if done == 0:
                t0 = time.perf_counter()  # after the first batch: workers are up and their buffers filled
                c0 = time.process_time()
            else:
                seen += batch["image"].shape[0]
            done += 1
            if done > batches:
                break
        epoch += 1
    return seen / (time.perf_counter() - t0), seen, seen / max(time.process_time() - c0, 1e-9)


def _compare_draft(urls: list[str], args: argparse.Namespace) -> int:
    """Training transform with and without reduced-size JPEG decoding, in this process (workers=0), alternating
    to cancel drift: images per wall second and per CPU second (the latter barely moved by other jobs)."""
    import statistics

    rates: dict[tuple[bool, int], list[float]] = {}
    for _ in range(args.repeats):
        for draft in (False, True):
            wall, _, cpu = measure(urls, 0, args.batches, args.batch_size, True, args.size, draft)
            rates.setdefault((draft, 0), []).append(wall)
            rates.setdefault((draft, 1), []).append(cpu)
    for kind, unit in ((1, "img per CPU s"), (0, "img/s (wall)")):
        for draft in (False, True):
            r = rates[(draft, kind)]
            print(f"  train (crop+RandAugment), draft {'on ' if draft else 'off'}: median {statistics.median(r):6.1f} "
                  f"{unit} (min {min(r):.1f}, max {max(r):.1f}, {len(r)} runs)")
        ratios = [a / b for a, b in zip(rates[(True, kind)], rates[(False, kind)])]
        print(f"  draft speed-up, {unit}: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, "
              f"max {max(ratios):.2f}x, per alternation)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shard folder/pattern (default: prepare the MedPix sample)")
    p.add_argument("--images", default=None, help="a folder of images to shard and read instead")
    p.add_argument("--compare-draft", action="store_true", help="training transform with and without image.draft")
    p.add_argument("--repeats", type=int, default=5, help="alternations for --compare-draft")
    p.add_argument("--medpix", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "medpix2_sample"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process, as in training
    import torch

    torch.set_num_threads(1)
    from framework.shards import expand_shards

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards
        if spec is None and args.images:
            n = _shard_images(Path(args.images), Path(tmp))
            print(f"sharded {n} images of {args.images} into {tmp}")
            spec = tmp
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
        print(f"pipeline: framework.streams.ShardStream + make_loader, recipes.common.image_text decode/collate; "
              f"{len(urls)} shards, batch {args.batch_size}, image {args.size}, {os.cpu_count()} CPUs")
        if args.compare_draft:
            return _compare_draft(urls, args)
        for train in (False, True):
            for w in args.workers:
                rate, n, _ = measure(urls, w, args.batches, args.batch_size, train, args.size)
                per = rate / max(w, 1)
                what = "train (crop+RandAugment)" if train else "eval (resize)"
                print(f"  {what:26s} workers={w}: {rate:6.1f} img/s total, {per:6.1f} img/s per worker ({n} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
