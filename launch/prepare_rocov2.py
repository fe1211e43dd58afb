#!/usr/bin/env python
"""Convert ROCOv2 (hub parquet, or the ROCOv2 / ROCO release folders) or any image folder + CSV/JSONL
into WebDataset shards for training:

    python launch/prepare_rocov2.py --input ROCOv2-radiology/data --split train --modality all --out data/rocov2/train
    python launch/prepare_rocov2.py --input medpix/sample_captions.csv --split all --out data/medpix

Re-running the same command skips finished shards; an interrupted run is finished by re-running it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from corpora.listings import PrepareOptions  # noqa: E402
from corpora.modalities import MODALITY_CUIS  # noqa: E402
from corpora.rocov2 import DEFAULT_SAMPLES_PER_SHARD, MIN_SHARDS, prepare  # noqa: E402
from corpora.shard_writer import PrepareError  # noqa: E402


def parse_args(argv: list[str] | None) -> PrepareOptions:
    modalities = ", ".join(f"{name} ({'/'.join(cuis)})" for name, cuis in MODALITY_CUIS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="parquet file or folder (hub copy), ROCOv2 release folder (<split>_captions.csv, "
                        "<split>_concepts.csv, <split>/), ROCO folder (<split>/radiology/captions.txt + images/), "
                        "or a CSV/JSONL table of image,caption")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--format", default="auto", choices=["auto", "parquet", "rocov2", "roco", "table"])
    p.add_argument("--split", default="train", help="train | valid | test | all (all: parquet and tables only)")
    p.add_argument("--modality", action="append", default=[],
                   help=f"keep only these modalities (repeat or comma-separate): {modalities}; "
                        "'all' = the six; or any UMLS CUI. A sample without a modality concept is judged by its "
                        "caption's keywords (docs/data.md). Default: keep everything")
    p.add_argument("--max-side", type=int, default=512,
                   help="re-encode images whose longer side exceeds this once, as JPEG (0: keep all as they are)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--keep-png", action="store_true",
                   help="store PNGs within --max-side as they are; by default PNG photographs are re-encoded once as "
                        "JPEG (--jpeg-quality) when that is smaller; PNGs with transparency or few colours (line art) "
                        "stay PNG")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help=f"default {DEFAULT_SAMPLES_PER_SHARD}, or samples // {MIN_SHARDS} for smaller inputs: at least "
                        f"{MIN_SHARDS} shards")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="writer processes")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N samples after filtering")
    p.add_argument("--images", default=None, help="image folder for a table input (default: <table dir>/images)")
    p.add_argument("--image-column", default=None, help="table column with the image file name (default: detected)")
    p.add_argument("--caption-column", default=None, help="table column with the caption (default: detected)")
    p.add_argument("--overwrite", action="store_true", help="replace shards prepared from other inputs in --out")
    a = p.parse_args(argv)
    return PrepareOptions(input=a.input, out=a.out, format=a.format, split=a.split, modality=a.modality,
                          max_side=a.max_side, jpeg_quality=a.jpeg_quality, keep_png=a.keep_png,
                          samples_per_shard=a.samples_per_shard, workers=a.workers, limit=a.limit, images=a.images, image_column=a.image_column,
                          caption_column=a.caption_column, overwrite=a.overwrite)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 on success, 2 with a one-line `error: ...` for bad input, 130 when interrupted."""
    opts = parse_args(argv)
    try:
        prepare(opts)
    except PrepareError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # an input file that cannot be read: which one and why
        print(f"error: {e.filename or 'input'}: {e.strerror or e}; check the file and its permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
