#!/usr/bin/env python
"""Kill (SIGKILL) a toy run at random moments while it saves checkpoints; check every kill leaves a resumable run."""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def child_cmd(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "recipes/toy/toy.yaml"),
            f"run.dir={run_dir}", f"data.train={shards}", "train.epochs=null", "train.max_steps=400",
            "run.save_every=1", "run.keep_last=2", "model.hidden=256", *extra]


def check_loadable(run_dir: Path) -> str:
    """The checkpoint resume: auto would pick must load completely; returns its tag."""
    import torch

    from framework.checkpoint import find_resume_tag

    tag = find_resume_tag(run_dir / "checkpoints")
    if tag is None:
        return "none"
    state = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["position"]["step"] == int(tag.split("_")[1]), tag
    torch.load(run_dir / "checkpoints" / tag / "rank_00000.pt", weights_only=True)
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--resume-every", type=int, default=5, help="run a real resume after every Nth kill")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from recipes.toy import make_shards

    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        make_shards(shards, 64, 4, seed=1)
        run_dir = Path(tmp) / "run"
        tags = []
        for trial in range(args.trials):
            proc = subprocess.Popen(child_cmd(run_dir, shards), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            # wait until the child is saving checkpoints, then kill it at a random moment
            for line in proc.stdout:
                if "checkpoint " in line:
                    break
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            tag = check_loadable(run_dir)
            tags.append(tag)
            if (trial + 1) % args.resume_every == 0:  # a real resume must continue from that checkpoint
                done = subprocess.run(child_cmd(run_dir, shards, "run.stop_at_step=" + str(int(tag[5:]) + 2)),
                                      env=env, capture_output=True, text=True)
                if done.returncode != 0 or "resumed from" not in done.stderr:
                    print(f"trial {trial}: resume FAILED\n{done.stderr[-2000:]}")
                    return 1
            print(f"trial {trial + 1}/{args.trials}: killed; resume picks {tag}", flush=True)
        print(f"{args.trials} kills, {args.trials} resumable checkpoints (tags {tags[0]} .. {tags[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
