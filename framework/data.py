"""WebDataset shard streaming: seeded shuffles, shards split by rank and worker, equal batch counts per rank."""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

SKIPPED = "_skipped"  # batch key: samples skipped (corrupt/undecodable) since this worker's previous batch


class DataError(ValueError):
    """A data problem a user must fix (no shards, corrupt shard, too few shards for ranks x workers)."""


def expand_shards(spec: Union[str, list[str]]) -> list[str]:
    """Shard paths from a directory (its *.tar), a brace pattern, a glob, or a list of any of these."""
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    urls: list[str] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if os.path.isdir(s):
            urls += sorted(glob.glob(os.path.join(s, "*.tar")))
        elif "{" in s:
            urls += [u for u in wds.shardlists.expand_urls(s)]
        elif any(c in s for c in "*?["):
            urls += sorted(glob.glob(s))
        else:
            urls.append(s)
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls:
        raise DataError(f"no shards matched {spec!r}")
    if missing:
        raise DataError(f"shard not found: {missing[0]} (from {spec!r})")
    return urls


def read_manifest(urls: list[str]) -> Optional[dict]:
    """The manifest.json beside the shards, if there is one."""
    path = Path(urls[0]).parent / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None


def _manifest_entries(manifest: Optional[dict]) -> dict[str, dict]:
    if not manifest:
        return {}
    return {Path(e.get("name", e.get("file", ""))).name: e for e in manifest.get("shards", [])}


def count_samples(urls: list[str]) -> int:
    """Samples in the shards: from manifest.json when it lists them all, else by reading the tar headers."""
    entries = _manifest_entries(read_manifest(urls))
    total = 0
    for url in urls:
        entry = entries.get(Path(url).name)
        if entry is not None and "samples" in entry:
            total += int(entry["samples"])
            continue
        try:
            with tarfile.open(url) as tar:
                keys = {wds.tariterators.base_plus_ext(m.name)[0] for m in tar if m.isfile()}
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"corrupt shard {url}: {e}") from None
        total += len(keys)
    return total


def verify_checksums(urls: list[str]) -> None:
    """Check every shard against the sha256 in manifest.json; raise DataError naming the first mismatch."""
    entries = _manifest_entries(read_manifest(urls))
    if not entries:
        raise DataError(f"data.verify_checksums: no manifest.json beside {urls[0]}")
    for url in urls:
        entry = entries.get(Path(url).name)
        if entry is None or "sha256" not in entry:
            raise DataError(f"data.verify_checksums: {url} is not listed (with sha256) in manifest.json")
        h = hashlib.sha256()
        with open(url, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise DataError(f"checksum mismatch for {url}: the shard changed or is truncated; re-run preparation")


def _seed(*parts: Any) -> int:
    """A seed that is the same in every process (unlike hash() of strings)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class _PrivateRng:
    """Global RNG streams (torch, random, numpy) private to data loading, swapped in around each batch.

    Random augmentations in decode draw from the global RNGs; giving the data its own seeded streams
    makes batches a pure function of (seed, epoch, position) and leaves the model's RNG untouched.
    """

    def __init__(self, seed: int):
        outer = self._get()
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.inner = self._get()
        self._set(outer)

    @staticmethod
    def _get() -> tuple:
        return torch.get_rng_state(), random.getstate(), np.random.get_state()

    @staticmethod
    def _set(state: tuple) -> None:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])

    def wrap(self, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from `items`, computing each item under the private streams."""
        while True:
            outer = self._get()
            self._set(self.inner)
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.inner = self._get()
                self._set(outer)
            yield item


def _worker_role(skip: int) -> tuple[int, int]:
    """(logical worker, workers) for this process; see ShardStream on why roles rotate by `skip`."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return (worker + skip) % workers, workers


def _share(total: int, index: int, parts: int) -> int:
    """How many of items 0..total-1 fall to `index` when dealt round-robin to `parts`."""
    return len(range(index, total, parts))


class ShardStream(IterableDataset):
    """Batches from WebDataset shards; every rank yields exactly `len(self)` batches per epoch.

    Shard order is shuffled per epoch with `seed`; shards are dealt to ranks then to DataLoader workers
    (a worker cycles its shards when they run out, so ranks stay equal); samples pass through a seeded
    shuffle buffer, `decode` (a raising or None-returning sample is skipped and counted) and `collate`.
    Batch b of an epoch belongs to logical worker b % W. The DataLoader reads its workers round-robin
    starting at worker 0, so on a resume at batch k worker w plays logical worker (w + k) % W: the
    remaining batches then arrive in exactly the uninterrupted order. Decode randomness comes from
    streams seeded by (seed, epoch, rank, logical worker), so resumed batches are identical too.
    """

    def __init__(self, urls: list[str], decode: Callable[[dict], Optional[dict]], collate: Callable[[list], dict],
                 batch_size: int, *, seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
                 samples_per_epoch: Optional[int] = None):
        if len(urls) < world_size:
            raise DataError(f"{len(urls)} shard(s) for {world_size} ranks: each rank needs at least one shard; "
                            "write more, smaller shards (prepare with a lower --samples-per-shard)")
        self.urls, self.decode, self.collate = list(urls), decode, collate
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.samples = samples_per_epoch or count_samples(self.urls)
        self.batches = self.samples // (batch_size * world_size)
        if self.batches == 0:
            raise DataError(f"{self.samples} samples cannot fill one batch of {batch_size} on {world_size} rank(s)")
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (re-seeds the shuffles) and how many of its batches were already consumed."""
        self.epoch, self.skip = epoch, skip_batches

    def _worker_shards(self, worker: int, workers: int) -> list[str]:
        order = list(self.urls)
        random.Random(_seed(self.seed, self.epoch, "order")).shuffle(order)
        mine = order[self.rank::self.world_size][worker::workers]
        if not mine:
            raise DataError(f"{len(self.urls)} shards < {self.world_size} ranks x {workers} workers: "
                            "lower data.num_workers or write more shards")
        return mine

    def _passes(self, shards: list[str], worker: int, count: Callable[[Exception], bool]) -> Iterator[dict]:
        """Raw samples: whole passes over this worker's shards, each shuffled then flushed, repeated as needed."""
        for n in itertools.count():
            order = list(shards)
            if n:  # later passes (only when this worker's share is short) visit shards in a new order
                random.Random(_seed(self.seed, self.epoch, self.rank, worker, n)).shuffle(order)
            shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  seed=_seed(self.seed, self.epoch, self.rank, worker, n, "samples"))
            stages = [wds.SimpleShardList(order), wds.tarfile_to_samples(handler=count)]
            seen = 0
            for sample in wds.DataPipeline(*stages, *([shuffle] if self.shuffle_buffer > 1 else [])):
                seen += 1
                yield sample
            if seen == 0:  # cycling again would spin forever
                raise DataError(f"no readable samples in shard(s) {', '.join(shards)}")

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_role(self.skip)
        quota = _share(self.batches, worker, workers)
        skip = _share(self.skip, worker, workers)
        skipped = [0]

        def count(exn: Exception) -> bool:  # webdataset handler: count and continue, never sleep
            skipped[0] += 1
            return True

        def decoded(samples: Iterator[dict]) -> Iterator[dict]:
            for sample in samples:
                try:
                    out = self.decode(sample)
                except Exception:  # a corrupt sample must not stop a run
                    out = None
                if out is None:
                    skipped[0] += 1
                else:
                    yield out

        pipeline = wds.DataPipeline(
            lambda: self._passes(self._worker_shards(worker, workers), worker, count),
            decoded,
            wds.batched(self.batch_size, collation_fn=self.collate, partial=False),
        )
        reported = 0
        rng = _PrivateRng(_seed(self.seed, self.epoch, self.rank, worker, "decode"))
        for i, batch in enumerate(rng.wrap(iter(pipeline))):
            if i >= quota:
                break
            if i < skip:
                continue
            batch[SKIPPED] = skipped[0] - reported
            reported = skipped[0]
            yield batch


class MapStream(IterableDataset):
    """A map-style dataset as an epoch-seeded, rank-sharded, resumable stream of batches (equal per rank)."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], dict], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=True)
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.batches = len(self.sampler) // batch_size
        if self.batches == 0:
            raise DataError(f"{len(dataset)} samples cannot fill one batch of {batch_size} on {world_size} rank(s)")
        self.skip = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_role(self.skip)  # roles rotate on resume, as in ShardStream
        indices = list(self.sampler)
        first = self.skip + (worker - self.skip) % workers  # this worker's first batch at or after skip

        for b in range(first, self.batches, workers):
            rows = indices[b * self.batch_size:(b + 1) * self.batch_size]
            # Each batch draws its augmentation from its own seeded streams: independent of what was skipped.
            rng = _PrivateRng(_seed(self.sampler.seed, self.sampler.epoch, self.sampler.rank, b))
            batch = self.collate(list(rng.wrap(self.dataset[i] for i in rows)))
            batch[SKIPPED] = 0
            yield batch


def make_loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader over a stream that already batches (batch_size=None); workers keep their order."""
    workers = max(0, min(num_workers, len(stream)))
    if isinstance(stream, ShardStream) and workers > 0:
        per_rank = len(stream.urls) // stream.world_size
        if per_rank < workers:
            raise DataError(f"{len(stream.urls)} shards < {stream.world_size} ranks x {workers} workers: "
                            "lower data.num_workers or write more shards")
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers else None)


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (first tensor's leading dimension)."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
        if isinstance(v, list):
            return len(v)
    return 0
