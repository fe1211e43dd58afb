#!/usr/bin/env python
"""Generate the offline demo data (phantom caption shards + VQA-RAD-format questions): `--out DIR --seed N`."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from corpora.phantoms import PhantomSpec, write_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = PhantomSpec()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the same data is already there")
    for f in fields(PhantomSpec):
        if f.name == "version":
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)}")
    args = parser.parse_args(argv)
    spec = PhantomSpec(**{f.name: getattr(args, f.name) for f in fields(PhantomSpec) if f.name != "version"})
    t0 = time.time()
    try:
        summary = write_demo_data(Path(args.out), spec, force=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vqa = summary["vqa"]
    state = "already there" if summary["reused"] else f"written in {time.time() - t0:.1f}s"
    print(f"demo data in {args.out} ({state}): {summary['train']} train + {summary['val']} val captions "
          f"(shards/), {vqa['questions']} VQA questions, test {vqa['test_questions']} "
          f"({vqa['test_closed']} closed / {vqa['test_open']} open) (vqa/)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
