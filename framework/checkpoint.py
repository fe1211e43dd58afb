"""Crash-safe DeepSpeed checkpoints: complete-marker per tag, atomic `latest` pointer, pruning, RNG + data position."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

COMPLETE = "COMPLETE"  # written into a tag directory once every rank has finished writing it
LATEST = "latest"  # text file naming the newest complete tag; replaced atomically, last
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def find_resume_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag named by `latest` if complete, else the newest complete tag, else None."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ds_engine: Any, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, rank: int,
         keep_last: int) -> str:
    """Save a DeepSpeed checkpoint for `step` (all ranks call this); returns the tag once it is complete."""
    from .distributed import barrier

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # a leftover of a crashed save of this very step
        shutil.rmtree(tag_dir)
    barrier()
    ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, tag_dir / f"rank_{rank:05d}.pt")
    barrier()
    if rank == 0:
        _fsync_dir(tag_dir)
        _atomic_write(tag_dir / COMPLETE, f"{step}\n")
        _atomic_write(ckpt_dir / LATEST, tag)  # last: a crash before this leaves the previous pointer valid
        prune(ckpt_dir, keep_last, current=tag)
    barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    """Delete complete tags beyond the newest `keep_last`, and incomplete leftovers; never `current`."""
    complete = complete_tags(ckpt_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p.name not in complete]
    for tag in doomed:
        if tag != current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(ds_engine: Any, ckpt_dir: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Load module, optimizer, scheduler and loss-scaler state; returns (client_state, this rank's state)."""
    _, client_state = ds_engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else {}
    return client_state, rank_state
