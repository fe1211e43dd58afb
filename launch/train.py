#!/usr/bin/env python
"""Train a recipe: `deepspeed launch/train.py --recipe FILE [key=value ...]` (or plain `python`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framework.cli import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--sync-timing", action="store_true",
                        help="GPU: wait for queued kernels around forward, backward and the optimizer step, so "
                             "perf/forward_s, perf/backward_s and perf/optimizer_s are true times (a little slower)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the launcher's --local_rank
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    def train() -> int:
        from framework.build import build_run
        from framework.config import import_recipe, load_config
        from framework.distributed import init_distributed, say
        from framework.engine import fit
        from framework.run_env import run_env

        cfg = load_config(args.recipe, args.overrides)  # validated before anything is built
        env = run_env(cfg, init_distributed())  # GPU checked, precision resolved: before the recipe builds
        task = import_recipe(cfg.recipe, cfg.source).build(cfg, env)
        result = fit(build_run(cfg, task, env), sync_timing=args.sync_timing)
        say(f"done: {result.reason} at step {result.step} (epoch {result.epoch}); checkpoint {result.last_checkpoint}")
        return 0

    return run_cli(train)


if __name__ == "__main__":
    sys.exit(main())
