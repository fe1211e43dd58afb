"""Streams of batches that every rank reads equally: ShardStream (WebDataset shards) and MapStream (a Dataset)."""
from __future__ import annotations

import itertools
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import webdataset as wds
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from .epoch_plan import PrivateRng, epoch_batches, share, stable_seed, worker_role
from .shards import DataError, manifest_counts, shard_counts

SKIPPED = "_skipped"  # batch key: samples skipped (undecodable, or lost in a damaged shard) since the previous batch
NOTES = "_notes"  # batch key: one-line warnings from a DataLoader worker; make_loader's loader prints each once
FAILURES_IN_A_ROW = 100  # this many samples in a row that decode rejects: the data is wrong, not a few samples


class DecodeError(ValueError):
    """Raised by a recipe's decode for a sample it cannot use; `expected` names the keys it needs.

    Alternatives are written with |, e.g. DecodeError("no image", expected=("jpg|png", "txt")).
    """

    def __init__(self, message: str, expected: Sequence[str] = ()):
        super().__init__(message)
        self.expected = tuple(expected)


def _unreadable(urls: list[str]) -> str:
    return f"no readable samples in shard(s) {', '.join(urls[:3])}{'...' * (len(urls) > 3)}"


@dataclass
class _Tally:
    """One reader's account of what it skipped and why (handed on with its batches)."""

    skipped: int = 0  # samples skipped so far: rejected by decode, or missing from a damaged shard
    decoded: int = 0
    in_a_row: int = 0  # decode failures since the last decoded sample
    last: tuple[dict, Optional[BaseException]] = ({}, None)  # the last rejected sample and its error
    notes: list[tuple[str, str]] = field(default_factory=list)  # (subject, one-line warning) not yet in a batch
    noted: set[str] = field(default_factory=set)  # shards whose rejected samples have a note


class ShardStream(IterableDataset):
    """Batches from WebDataset shards; every rank yields exactly `len(self)` batches per epoch (epoch_batches).

    The shards, in a per-epoch seeded order, are one sequence of samples cut into contiguous ranges, one per (rank,
    DataLoader worker), shards weighed by their counts, the last range wrapping to the start for the pad
    (docs/scaling.md); a range short of samples (a damaged shard, rejected samples) is read again to fill its batches.
    Samples pass through a seeded shuffle buffer, `decode` (a raising or None-returning sample is skipped and counted)
    and `collate`. Batch b of an epoch belongs to logical worker b % W; the DataLoader reads workers round-robin from
    worker 0, so on a resume at batch k worker w plays logical worker (w + k) % W and the remaining batches arrive in
    the uninterrupted order, decoded under RNG streams seeded by (seed, epoch, rank, logical worker). Data that cannot
    work is a DataError, never a hang (docs/data.md); the constructor decodes a first sample, so wrong shards fail
    before training starts.
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
            raise DataError(_unreadable(self.urls))
        self.samples = samples_per_epoch or self.total
        self.batches, self.pad = epoch_batches(self.samples, batch_size, world_size, batch_multiple)
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
        for _ in PrivateRng(stable_seed(self.seed, "probe")).wrap(self._decoded(raw, tally)):
            return
        raise DataError(self._undecodable(tally) if tally.in_a_row else _unreadable(self.urls))

    def _worker_segments(self, worker: int, workers: int) -> list[tuple[str, int, int]]:
        """(shard, first sample, samples) pieces of this (rank, logical worker)'s range of the epoch's sequence."""
        order = list(self.urls)
        random.Random(stable_seed(self.seed, self.epoch, "order")).shuffle(order)
        quotas = [share(self.batches, w, workers) * self.batch_size for w in range(workers)]
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
        listed = self.listed.get(url, self.counts.get(url) if end is not None else None)
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
                random.Random(stable_seed(self.seed, self.epoch, self.rank, worker, n)).shuffle(order)
            raw: Iterator[dict] = (s for url, first, count in order for s in self._shard_samples(url, tally, first,
                                                                                                 count))
            if self.shuffle_buffer > 1:
                raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  seed=stable_seed(self.seed, self.epoch, self.rank, worker, n, "samples"))(raw)
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
        worker, workers = worker_role(self.skip)
        quota = share(self.batches, worker, workers)
        skip = share(self.skip, worker, workers)
        in_worker = torch.utils.data.get_worker_info() is not None
        tally = _Tally()
        samples = self._decoded(self._passes(self._worker_segments(worker, workers), worker, tally), tally)
        # whole batches as soon as they are full (wds.batched reads one sample ahead: a rejected one would be counted
        # in a batch it is not part of, and a pass's range read again for a sample no batch takes)
        batches = (self.collate(chunk) for chunk in iter(lambda: list(itertools.islice(samples, self.batch_size)), [])
                   if len(chunk) == self.batch_size)
        reported = 0
        rng = PrivateRng(stable_seed(self.seed, self.epoch, self.rank, worker, "decode"))
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

    Like ShardStream, an epoch trains on every sample (epoch_batches), the epoch's shuffled order wrapping around to
    its start for the pad."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], dict], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, batch_multiple: int = 1):
        # drop_last=False: the sampler pads the epoch's order by wrapping it, so that every rank has as many samples
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.batches, self.pad = epoch_batches(len(dataset), batch_size, world_size, batch_multiple)
        self.skip = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_role(self.skip)  # roles rotate on resume, as in ShardStream
        indices = list(self.sampler)  # this rank's share of the epoch's order
        need = self.batches * self.batch_size
        indices = (indices * -(-need // len(indices)))[:need]  # the pad wraps to this share's start
        first = self.skip + (worker - self.skip) % workers  # this worker's first batch at or after skip

        for b in range(first, self.batches, workers):
            rows = indices[b * self.batch_size:(b + 1) * self.batch_size]
            # Each batch draws its augmentation from its own seeded streams: independent of what was skipped.
            rng = PrivateRng(stable_seed(self.sampler.seed, self.sampler.epoch, self.sampler.rank, b))
            batch = self.collate(list(rng.wrap(self.dataset[i] for i in rows)))
            batch[SKIPPED] = 0
            yield batch
