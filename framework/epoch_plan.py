"""How a stream deals out an epoch: batches per rank, logical worker roles, stable seeds, private RNG streams."""
from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator

import numpy as np
import torch

from .shards import DataError


def stable_seed(*parts: Any) -> int:
    """A seed that is the same in every process (unlike hash() of strings)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def epoch_batches(samples: int, batch_size: int, world_size: int, batch_multiple: int) -> tuple[int, int]:
    """(batches per rank, pad samples seen twice) of an epoch that trains on every sample once.

    Rounded up to whole optimizer steps (batch_multiple batches): the pad is fewer than one optimizer step's samples.
    Data that cannot fill one optimizer step keeps its whole batches (build_run refuses that epoch).
    """
    per_batch, multiple = batch_size * world_size, max(1, batch_multiple)
    full = samples // per_batch
    if full == 0:
        raise DataError(f"{samples} samples cannot fill one batch of {batch_size} on {world_size} rank(s)")
    batches = -(-samples // (per_batch * multiple)) * multiple if full >= multiple else full
    return batches, max(0, batches * per_batch - samples)


def worker_role(skip: int) -> tuple[int, int]:
    """(logical worker, workers) for this process; see ShardStream on why roles rotate by `skip`."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return (worker + skip) % workers, workers


def share(total: int, index: int, parts: int) -> int:
    """How many of items 0..total-1 fall to `index` when dealt round-robin to `parts`."""
    return len(range(index, total, parts))


class PrivateRng:
    """Global RNG streams (torch, random, numpy) private to data loading, swapped in around each batch.

    Random augmentations in decode draw from the global RNGs; giving the data its own seeded streams
    makes batches a pure function of (seed, epoch, position) and leaves the model's RNG untouched.
    """

    def __init__(self, seed: int):
        # the streams torch.manual_seed, random.seed and np.random.seed would give, without touching the global ones
        # (torch.manual_seed would also reseed every CUDA generator)
        self.inner = (torch.Generator().manual_seed(seed).get_state(), random.Random(seed).getstate(),
                      np.random.RandomState(seed % 2**32).get_state())

    def wrap(self, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from `items`, computing each item under the private streams."""
        while True:
            outer = _swap(self.inner)
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.inner = _swap(outer)
            yield item


def _swap(state: tuple) -> tuple:
    """Install the global RNG streams (torch CPU, random, numpy) `state`; return the ones it replaces."""
    outer = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])
    return outer
