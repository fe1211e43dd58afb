"""The DataLoader over a stream that batches: workers' notes printed once, their DataErrors re-raised as one line."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .shards import DataError
from .streams import NOTES, ShardStream


class _Loader(DataLoader):
    """A DataLoader that prints the notes its workers attach to batches (once each) and drops them."""

    def __iter__(self) -> Iterator[dict]:
        batches, message = super().__iter__(), None
        try:
            for batch in batches:
                notes = batch.pop(NOTES, None)
                if notes:
                    self.dataset.print_once(notes)
                yield batch
        except DataError as e:
            # torch re-raises a worker's error from a frame that holds the error and the iterator: a cycle that the
            # garbage collector frees late, and then waits 5 s for each worker. Cut it and free the iterator now.
            message, e.__traceback__ = str(e), None
        if message is not None:
            del batches
            raise DataError(message)


def make_loader(stream: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream that already batches (batch_size=None); workers keep their order.

    A ShardStream gets at most as many workers as each rank has shards (a one-line note says so). pin_memory: batches
    in page-locked memory (for a CUDA device: the copy to it can then overlap the step, `.to(non_blocking=True)`).
    """
    workers = max(0, min(num_workers, len(stream)))
    if isinstance(stream, ShardStream) and workers > 0:
        per_rank = len(stream.urls) // stream.world_size
        if per_rank < workers:
            if stream.rank == 0:
                stream.print_once([("workers", f"note: {len(stream.urls)} shard(s) for {stream.world_size} rank(s): "
                                   f"using {per_rank} DataLoader worker(s) per rank instead of data.num_workers="
                                   f"{workers} (prepare more shards to use more)")])
            workers = per_rank
    return _Loader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                   prefetch_factor=4 if workers else None, pin_memory=pin_memory)


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (first tensor's leading dimension)."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
        if isinstance(v, list):
            return len(v)
    return 0
