"""Crash-safe DeepSpeed checkpoints: complete-marker per tag, atomic `latest` pointer, pruning, RNG + data position.

Loading never unpickles arbitrary objects: every file of a resumed checkpoint goes through `safe_load`
(torch.load(weights_only=True), with only DeepSpeed's own plain-data classes allowlisted).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from .files import atomic_write_text, fsync_dir

COMPLETE = "COMPLETE"  # written into a tag directory once every rank has finished writing it
LATEST = "latest"  # text file naming the newest complete tag; replaced atomically, last
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt) or would need arbitrary unpickling."""


# Classes DeepSpeed pickles into its own optimizer checkpoints: plain data holders (no code runs on load).
# Allowlisted by name for torch.load(weights_only=True); anything else in a pickle is refused.
_DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScaleProfile",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch names the refused class: "... GLOBAL posix.system ..."


def _allowed_globals() -> list[Any]:
    found = []
    for dotted in _DEEPSPEED_DATA_CLASSES:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is simply not allowed
            pass
    return found


def safe_load(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True) with DeepSpeed's data classes allowed; CheckpointReadError (one line)
    for a file that needs other pickled objects (which could run code) or cannot be read at all."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found:
            raise CheckpointReadError(
                f"{path}: refused: it holds a pickled {found.group(1)}, not only tensors and plain data; "
                "unpickling it could run code, so only checkpoints written by this framework (or tensors-only "
                "files / safetensors) are loaded") from None
        raise CheckpointReadError(f"{path}: not a readable tensors-only checkpoint ({_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic number, empty file, malformed pickle opcodes
        raise CheckpointReadError(f"{path}: unreadable or truncated checkpoint file ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """The informative line of a torch.load error (not its advice to retry with weights_only=False)."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def seed_host_rngs(seed: int, rank: int) -> None:
    """Seed Python's and NumPy's global RNGs per rank, so every stream a checkpoint saves starts from the config.

    (torch's global generator is seeded by the recipe, which needs identical initial weights on every rank.)
    """
    digest = hashlib.sha256(f"{seed}/{rank}".encode()).digest()
    random.seed(int.from_bytes(digest[:8], "little"))
    np.random.seed(int.from_bytes(digest[8:12], "little"))


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
    try:
        ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, tag_dir / f"rank_{rank:05d}.pt")
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        shutil.rmtree(tag_dir, ignore_errors=True)  # the half-written tag goes; `latest` still names the last good one
        raise OSError(errno.ENOSPC, "No space left on device", str(tag_dir)) from None
    barrier()
    if rank == 0:
        fsync_dir(tag_dir)
        atomic_write_text(tag_dir / COMPLETE, f"{step}\n")
        atomic_write_text(ckpt_dir / LATEST, tag)  # last: a crash before this leaves the previous pointer valid
        prune(ckpt_dir, keep_last, current=tag)
    barrier()
    return tag


def disk_full(e: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC/EDQUOT, or torch's zip writer's short write ("unexpected pos",
    its only report of a full disk), here or in the exceptions it was raised while handling."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    """Delete complete tags beyond the newest `keep_last`, and incomplete leftovers; never `current`."""
    complete = complete_tags(ckpt_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p.name not in complete]
    for tag in doomed:
        if tag != current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(ds_engine: Any, ckpt_dir: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Load module, optimizer, scheduler and loss-scaler state; returns (client_state, this rank's state).

    DeepSpeed's own loader unpickles with weights_only=False; its file reads are routed through `safe_load`.
    """
    try:
        with _safe_deepspeed_reads(ds_engine):
            _, client_state = ds_engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
    except CheckpointReadError as e:
        raise CheckpointReadError(f"{e}; delete {ckpt_dir / tag} to resume from the previous checkpoint, or set "
                                  "run.resume=none") from None
    if client_state is None:
        raise CheckpointReadError(f"could not load checkpoint {ckpt_dir / tag} (DeepSpeed found no model states)")
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    rank_state = safe_load(rank_file) if rank_file.is_file() else {}
    return client_state, rank_state


@contextlib.contextmanager
def _safe_deepspeed_reads(ds_engine: Any) -> Iterator[None]:
    """The DeepSpeed engine's checkpoint reads go through `safe_load` (its torch engine only), and model states
    saved under the old self-distillation wrapper ("student." before every name) load into the model."""
    from .deepspeed_patches import torch_checkpoint_engine

    engine = torch_checkpoint_engine(ds_engine)
    if engine is None:
        yield  # another engine (Nebula, async...) reads its own way; it is the user's explicit choice
        return
    module = getattr(ds_engine, "module", None)
    names = set(module.state_dict()) if module is not None else set()
    engine.load = lambda path, map_location=None: _without_wrapper_prefix(
        safe_load(path, map_location=map_location), names)
    try:
        yield
    finally:
        del engine.load  # back to the class's method


WRAPPER_PREFIX = "student."  # PSD checkpoints written before 2026-12 held the model under a wrapper module


def _without_wrapper_prefix(state: Any, names: set[str]) -> Any:
    """A DeepSpeed model-states dict whose module keys all carry WRAPPER_PREFIX, renamed to the model's names."""
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict) or not module or not names:
        return state
    if all(k.startswith(WRAPPER_PREFIX) for k in module) and not any(k in names for k in module):
        state = dict(state)
        state["module"] = {k[len(WRAPPER_PREFIX):]: v for k, v in module.items()}
    return state
