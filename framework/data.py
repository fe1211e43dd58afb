"""WebDataset shard streaming: seeded shuffles, shards split by rank and worker, equal batch counts per rank."""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from .files import sha256_file

SKIPPED = "_skipped"  # batch key: samples skipped (undecodable, or lost in a damaged shard) since the previous batch
NOTES = "_notes"  # batch key: one-line warnings from a DataLoader worker; make_loader's loader prints each once
FAILURES_IN_A_ROW = 100  # this many samples in a row that decode rejects: the data is wrong, not a few samples


class DataError(ValueError):
    """A data problem a user must fix (no shards, corrupt shard, undecodable samples); one line."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's DataError reaches the main process re-raised as DataError("Caught DataError in
        # DataLoader worker process N.\nOriginal Traceback ...\nframework.data.DataError: <message>"): keep <message>.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class DecodeError(ValueError):
    """Raised by a recipe's decode for a sample it cannot use; `expected` names the keys it needs.

    Alternatives are written with |, e.g. DecodeError("no image", expected=("jpg|png", "txt")).
    """

    def __init__(self, message: str, expected: Sequence[str] = ()):
        super().__init__(message)
        self.expected = tuple(expected)


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
    """The manifest.json beside the (first) shards, if there is one."""
    path = Path(urls[0]).parent / "manifest.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run the data preparation or delete it") from None
    shards = doc.get("shards", []) if isinstance(doc, dict) else None
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise DataError(f"{path} is not a shard manifest (expected {{\"shards\": [{{\"name\": ..., \"samples\": ...}}, "
                        "...]}); re-run the data preparation or delete it")
    return doc


def manifest_entries(urls: list[str]) -> dict[str, dict]:
    """{shard: its entry} for the shards that the manifest.json of their folder lists."""
    by_dir: dict[Path, dict[str, dict]] = {}
    found = {}
    for url in urls:
        folder, name = Path(url).parent, Path(url).name
        if folder not in by_dir:
            doc = read_manifest([url]) or {}
            by_dir[folder] = {Path(str(e.get("name", e.get("file", "")))).name: e for e in doc.get("shards", [])}
        if name in by_dir[folder]:
            found[url] = by_dir[folder][name]
    return found


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """{shard: samples} for the shards that the manifest.json of their folder lists with a count."""
    counts = {url: entry["samples"] for url, entry in manifest_entries(urls).items() if "samples" in entry}
    for url, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"{Path(url).parent / 'manifest.json'}: {Path(url).name} has samples={n!r}, not a count; "
                            "re-run the data preparation or delete the manifest")
    return counts


def shard_counts(urls: list[str]) -> list[int]:
    """Samples in each shard: from manifest.json where it lists them, else by reading the tar headers (of a
    truncated shard, those before the damage: what a reader gets)."""
    listed = manifest_counts(urls)
    counts = []
    for url in urls:
        if url in listed:
            counts.append(listed[url])
            continue
        keys: set[str] = set()
        try:
            with tarfile.open(url) as tar:
                try:
                    for m in tar:
                        if m.isfile():
                            keys.add(wds.tariterators.base_plus_ext(m.name)[0])
                except (tarfile.TarError, OSError):  # cut short: count what can be read
                    if not keys:
                        raise
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"corrupt shard {url}: {e}") from None
        counts.append(len(keys))
    return counts


def count_samples(urls: list[str]) -> int:
    """Samples in the shards: from manifest.json where it lists them, else by reading the tar headers."""
    return sum(shard_counts(urls))


def verify_checksums(urls: list[str]) -> None:
    """Check every shard against the sha256 in manifest.json; raise DataError naming the first mismatch."""
    entries = manifest_entries(urls)
    if not entries:
        raise DataError(f"data.verify_checksums: no manifest.json beside {urls[0]}")
    for url in urls:
        entry = entries.get(url)
        if entry is None or "sha256" not in entry:
            raise DataError(f"data.verify_checksums: {url} is not listed (with sha256) in manifest.json")
        if sha256_file(url) != entry["sha256"]:
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
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU stream torch.manual_seed(seed) would give, without reseeding every CUDA generator as it does
        self.inner = (torch.Generator().manual_seed(seed).get_state(), *self._get()[1:])
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


class _Tally:
    """One reader's account of what it skipped and why (handed on with its batches)."""

    def __init__(self) -> None:
        self.skipped = 0  # samples skipped so far: rejected by decode, or missing from a damaged shard
        self.decoded = 0
        self.in_a_row = 0  # decode failures since the last decoded sample
        self.last: tuple[dict, Optional[BaseException]] = ({}, None)  # the last rejected sample and its error
        self.notes: list[tuple[str, str]] = []  # (what it is about, one-line warning) not yet handed to a batch
        self.noted: set[str] = set()


class ShardStream(IterableDataset):
    """Batches from WebDataset shards; every rank yields exactly `len(self)` batches per epoch.

    Shard order is shuffled per epoch with `seed`; the samples of the shards in that order are one sequence, cut into
    contiguous ranges, one per (rank, DataLoader worker), each as long as the batches it must yield (shards weighed by
    their counts: uneven shards lose nothing). An epoch has ceil(samples / (batch x ranks x batch_multiple)) x
    batch_multiple batches per rank, so it trains on every sample once, and the last range wraps around to the
    sequence's start for the pad (< batch x ranks x batch_multiple samples seen twice). A range short of samples
    (a damaged shard, rejected samples) is read again to fill its batches. Samples pass through a seeded shuffle buffer,
    `decode` (a raising or None-returning sample is skipped and counted) and `collate`. Batch b of an epoch belongs
    to logical worker b % W; the DataLoader reads workers round-robin from worker 0, so on a resume at batch k
    worker w plays logical worker (w + k) % W and the remaining batches arrive in the uninterrupted order, decoded
    under RNG streams seeded by (seed, epoch, rank, logical worker). Data that cannot work is a DataError, never a
    hang (docs/data.md); the constructor decodes a first sample, so wrong shards fail before training starts.
    """

    def __init__(self, urls: list[str], decode: Callable[[dict], Optional[dict]], collate: Callable[[list], dict],
                 batch_size: int, *, seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
                 samples_per_epoch: Optional[int] = None, failures_in_a_row: int = FAILURES_IN_A_ROW,
                 batch_multiple: int = 1):
        self.urls, self.decode, self.collate = list(urls), decode, collate
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size, self.failures_in_a_row = rank, world_size, failures_in_a_row
        self.listed = manifest_counts(self.urls)  # shard -> samples it should hold
        self.counts = dict(zip(self.urls, shard_counts(self.urls)))
        self.total = sum(self.counts.values())
        if self.total == 0:
            raise DataError(f"no readable samples in shard(s) {', '.join(self.urls[:3])}{'...' * (len(self.urls) > 3)}")
        self.samples = samples_per_epoch or self.total
        per_batch = batch_size * world_size
        if self.samples // per_batch == 0:
            raise DataError(f"{self.samples} samples cannot fill one batch of {batch_size} on {world_size} rank(s)")
        # round up to whole optimizer steps: every sample once, plus a pad of fewer than one optimizer step's samples
        # (data that cannot fill one optimizer step keeps its whole batches: build_run refuses that epoch)
        multiple, full = max(1, batch_multiple), self.samples // per_batch
        self.batches = -(-self.samples // (per_batch * multiple)) * multiple if full >= multiple else full
        self.pad = max(0, self.batches * per_batch - self.samples)
        self.epoch, self.skip = 0, 0
        self.printed: set[str] = set()  # what this process printed notes about (a shard, a setting)
        self._probe()

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (re-seeds the shuffles) and how many of its batches were already consumed."""
        self.epoch, self.skip = epoch, skip_batches

    def print_once(self, notes: list[tuple[str, str]]) -> None:
        """Print each (subject, one-line note) unless this process already printed a note about the subject."""
        for subject, note in notes:
            if subject not in self.printed:
                self.printed.add(subject)
                print(note, file=sys.stderr, flush=True)

    def _probe(self) -> None:
        """Decode samples from the first shards until one works (under private RNG streams)."""
        tally = _Tally()
        raw = (s for url in sorted(self.urls) for s in self._shard_samples(url, tally))
        for _ in _PrivateRng(_seed(self.seed, "probe")).wrap(self._decoded(raw, tally)):
            return
        raise DataError(self._undecodable(tally) if tally.in_a_row else
                        f"no readable samples in shard(s) {', '.join(self.urls[:3])}{'...' * (len(self.urls) > 3)}")

    def _worker_segments(self, worker: int, workers: int) -> list[tuple[str, int, int]]:
        """(shard, first sample, samples) pieces of this (rank, logical worker)'s range of the epoch's sequence."""
        order = list(self.urls)
        random.Random(_seed(self.seed, self.epoch, "order")).shuffle(order)
        quotas = [_share(self.batches, w, workers) * self.batch_size for w in range(workers)]
        start = self.rank * self.batches * self.batch_size + sum(quotas[:worker])
        need, segments = quotas[worker], []
        starts = list(itertools.accumulate([0] + [self.counts[u] for u in order]))
        position = start % self.total  # past the end (the pad, or samples_per_epoch > samples): from the start again
        while need > 0:
            i = next(i for i in range(len(order)) if starts[i] <= position < starts[i + 1])
            take = min(need, starts[i + 1] - position)
            segments.append((order[i], position - starts[i], take))
            need -= take
            position = (position + take) % self.total
        return segments

    def _shard_samples(self, url: str, tally: _Tally, first: int = 0, count: Optional[int] = None) -> Iterator[dict]:
        """Samples first..first+count-1 of a shard (all by default); a shard that ends before them (short of its
        manifest count) has the missing ones counted and reported."""
        errors: list[str] = []

        def handler(exn: Exception) -> bool:  # webdataset handler: count and continue, never sleep
            errors.append(str(exn).split(" @ ")[0].replace("\n", " ")[:120] or type(exn).__name__)
            return True

        end = first + count if count is not None else None
        read = 0
        for sample in wds.tarfile_to_samples(handler=handler)(iter([{"url": url}])):
            read += 1
            if read > first:
                yield sample
            if end is not None and read >= end:
                return  # the rest of the shard is another range's
        listed = self.listed.get(url)
        if end is not None and listed is None:
            listed = self.counts.get(url)
        lost = max(0, min(listed, end if end is not None else listed) - max(read, first)) if listed is not None \
            else len(errors)
        if lost:
            tally.skipped += lost
            what = f"{read} of its {listed} samples" if listed is not None else f"{read} samples, then {errors[0]}"
            cause = f" ({errors[0]})" if errors and listed is not None else ""
            note = (f"warning: shard {url} is damaged: read {what}{cause}; the rest is skipped and counted in "
                    "data/skipped_samples; re-run the data preparation to repair it")
            tally.notes.append((f"damaged {url}", note))

    def _passes(self, segments: list[tuple[str, int, int]], worker: int, tally: _Tally) -> Iterator[dict]:
        """Raw samples: whole passes over this worker's range, each shuffled then flushed, repeated as needed."""
        shards = sorted({url for url, _, _ in segments})
        for n in itertools.count():
            order = list(segments)
            if n:  # later passes (only when this worker's range is short) visit its pieces in a new order
                random.Random(_seed(self.seed, self.epoch, self.rank, worker, n)).shuffle(order)
            raw: Iterator[dict] = (s for url, first, count in order for s in self._shard_samples(url, tally, first,
                                                                                                 count))
            if self.shuffle_buffer > 1:
                raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  seed=_seed(self.seed, self.epoch, self.rank, worker, n, "samples"))(raw)
            seen, decoded = 0, tally.decoded
            for sample in raw:  # the consumer decodes each sample before asking for the next
                seen += 1
                yield sample
            if seen == 0:  # cycling again would spin forever
                raise DataError(f"no readable samples in shard(s) {', '.join(shards)}")
            if tally.decoded == decoded:  # a whole pass and not one sample decoded: the same
                raise DataError(self._undecodable(tally))

    def _decoded(self, samples: Iterator[dict], tally: _Tally) -> Iterator[dict]:
        """decode() of each sample; rejected ones are counted and skipped, too many in a row raise DataError."""
        for sample in samples:
            try:
                out, error = self.decode(sample), None
            except Exception as e:  # a corrupt sample must not stop a run
                out, error = None, e
            if out is not None:
                tally.decoded += 1
                tally.in_a_row = 0
                yield out
                continue
            tally.skipped += 1
            tally.in_a_row += 1
            tally.last = (sample, error)
            if tally.in_a_row >= self.failures_in_a_row:
                raise DataError(self._undecodable(tally))
            url = str(sample.get("__url__"))
            if url not in tally.noted:  # one line per shard with rejected samples (most shards have none)
                tally.noted.add(url)
                note = (f"warning: shard {url}: samples that decode rejects are skipped and counted in "
                        f"data/skipped_samples (first: {self._why(sample, error)})")
                tally.notes.append((f"rejected {url}", note))

    @staticmethod
    def _why(sample: dict, error: Optional[BaseException]) -> str:
        """'sample K has keys A, B; the recipe's decode expects X and Y' (or what it raised / returned None)."""
        keys = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        if isinstance(error, DecodeError) and error.expected:
            why = f"expects {' and '.join(error.expected)}"
        elif error is not None:
            why = f"raised {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        else:
            why = "returned None"
        return f"sample {sample.get('__key__')!r} has keys {keys}; the recipe's decode {why}"

    def _undecodable(self, tally: _Tally) -> str:
        sample, error = tally.last
        return (f"{tally.in_a_row} sample(s) in a row could not be decoded, the last in shard "
                f"{sample.get('__url__')}: {self._why(sample, error)}; check that these shards were written for "
                "this recipe")

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_role(self.skip)
        quota = _share(self.batches, worker, workers)
        skip = _share(self.skip, worker, workers)
        in_worker = torch.utils.data.get_worker_info() is not None
        tally = _Tally()
        samples = self._decoded(self._passes(self._worker_segments(worker, workers), worker, tally), tally)
        # whole batches as soon as they are full (wds.batched reads one sample ahead: a rejected one would be counted
        # in a batch it is not part of, and a pass's range read again for a sample no batch takes)
        batches = (self.collate(chunk) for chunk in iter(lambda: list(itertools.islice(samples, self.batch_size)), [])
                   if len(chunk) == self.batch_size)
        reported = 0
        rng = _PrivateRng(_seed(self.seed, self.epoch, self.rank, worker, "decode"))
        for i, batch in enumerate(rng.wrap(batches)):
            if i >= quota:
                break
            if i < skip:
                continue
            batch[SKIPPED] = tally.skipped - reported
            reported = tally.skipped
            if tally.notes:
                notes, tally.notes = tally.notes, []
                if in_worker:  # the main process prints them (make_loader), once per run and not per worker
                    batch[NOTES] = notes
                else:
                    self.print_once(notes)
            yield batch


class MapStream(IterableDataset):
    """A map-style dataset as an epoch-seeded, rank-sharded, resumable stream of batches (equal per rank).

    Like ShardStream, an epoch trains on every sample: each rank gets ceil(samples / (batch x ranks x
    batch_multiple)) x batch_multiple batches, the epoch's shuffled order wrapping around to its start for the pad
    (fewer than one optimizer step's samples seen twice). Data that cannot fill one optimizer step keeps its whole
    batches (build_run refuses that epoch)."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], dict], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, batch_multiple: int = 1):
        # drop_last=False: the sampler pads the epoch's order by wrapping it, so that every rank has as many samples
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        per_batch, multiple = batch_size * world_size, max(1, batch_multiple)
        full = len(dataset) // per_batch
        if full == 0:
            raise DataError(f"{len(dataset)} samples cannot fill one batch of {batch_size} on {world_size} rank(s)")
        self.batches = -(-len(dataset) // (per_batch * multiple)) * multiple if full >= multiple else full
        self.pad = max(0, self.batches * per_batch - len(dataset))
        self.skip = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_role(self.skip)  # roles rotate on resume, as in ShardStream
        indices = list(self.sampler)  # this rank's share of the epoch's order
        need = self.batches * self.batch_size
        indices = (indices * -(-need // len(indices)))[:need]  # the pad wraps to this share's start
        first = self.skip + (worker - self.skip) % workers  # this worker's first batch at or after skip

        for b in range(first, self.batches, workers):
            rows = indices[b * self.batch_size:(b + 1) * self.batch_size]
            # Each batch draws its augmentation from its own seeded streams: independent of what was skipped.
            rng = _PrivateRng(_seed(self.sampler.seed, self.sampler.epoch, self.sampler.rank, b))
            batch = self.collate(list(rng.wrap(self.dataset[i] for i in rows)))
            batch[SKIPPED] = 0
            yield batch


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
