"""Steps every rank runs together: a failure on any rank becomes one line on rank 0, every rank stops cleanly.

Each step ends in one small all_gather_object of (value, failure), so no rank is left waiting in a collective for
a peer that died on an exception (which would surface as a gloo/NCCL traceback on every other rank).
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

from framework.cli import USER_ERRORS

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A step failed on one or more ranks: `message` is the one line to print (rank 0 prints it)."""

    def __init__(self, message: str, local: Optional[BaseException] = None):
        super().__init__(message)
        self.local = local  # this rank's own exception, if it failed


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def describe(e: BaseException) -> str:
    """An exception as one line: the message for user errors, the type and message for anything else."""
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}; fix it (free space, permissions) and re-run the same command: finished " \
               "shards are kept"
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, USER_ERRORS) and text else f"{type(e).__name__}: {text}".rstrip(": ")


def agree(step: Callable[[], T]) -> list[T]:
    """Run `step` on every rank; return every rank's value (in rank order), or raise RankFailure on every rank
    when it failed on any. In a single process the step's own exception propagates unchanged."""
    rank, size = world()
    if size == 1:
        return [step()]
    value: Any = None
    failure: Optional[str] = None
    local: Optional[BaseException] = None
    try:
        value = step()
    except Exception as e:  # noqa: BLE001 - reported to every rank below, then re-raised as RankFailure
        local, failure = e, describe(e)
        if not isinstance(e, USER_ERRORS) or os.environ.get("FRAMEWORK_DEBUG"):
            traceback.print_exc(file=sys.stderr)  # a bug: its traceback on the rank where it happened
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, (value, failure))
    failed = [(r, f) for r, (_, f) in enumerate(gathered) if f is not None]
    if failed:
        messages = {f for _, f in failed}
        if len(failed) == size and len(messages) == 1:
            message = failed[0][1]  # the same on every rank: say it once
        else:
            r, f = failed[0]
            others = f" ({len(failed) - 1} more rank(s) failed too)" if len(failed) > 1 else ""
            message = f"rank {r}: {f}{others}"
        raise RankFailure(message, local)
    return [v for v, _ in gathered]


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
