"""Shard streaming: shard expansion, equal batches per rank, exact resume position, corrupt samples counted."""
import gc
import io
import json
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds

from framework.loader import make_loader
from framework.shards import DataError, count_samples, expand_shards, verify_checksums
from framework.streams import FAILURES_IN_A_ROW, NOTES, SKIPPED, DecodeError, ShardStream
from recipes.toy import collate, decode, make_shards


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def stream(urls, rank=0, world=1, bs=4, buf=8, seed=3):
    return ShardStream(urls, decode, collate, bs, seed=seed, shuffle_buffer=buf, rank=rank, world_size=world)


def test_expand_dir_brace_glob_list(tmp_path):
    paths = make_shards(tmp_path, 20, 4)
    as_str = [str(p) for p in paths]
    assert expand_shards(str(tmp_path)) == as_str
    assert expand_shards(str(tmp_path / "toy-{0000..0003}.tar")) == as_str
    assert expand_shards(str(tmp_path / "toy-000[01].tar")) == as_str[:2]
    assert expand_shards(as_str[1:3]) == as_str[1:3]
    with pytest.raises(DataError, match="no shards matched"):
        expand_shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(DataError, match="shard not found"):
        expand_shards(str(tmp_path / "toy-{0000..0009}.tar"))
    assert count_samples(as_str) == 20


def test_epoch_covers_every_sample_once_and_reshuffles(tmp_path):
    urls = [str(p) for p in make_shards(tmp_path, 32, 4)]
    s = stream(urls)
    s.set_epoch(0)
    e0 = keys_of(list(s))
    assert sorted(e0) == sorted(f"s{i:06d}" for i in range(32)) and len(s) == 8
    s.set_epoch(0)
    assert keys_of(list(s)) == e0  # deterministic for a seed and epoch
    s.set_epoch(1)
    assert keys_of(list(s)) != e0  # re-seeded per epoch


def test_ranks_get_equal_batch_counts_and_every_sample(tmp_path):
    urls = [str(p) for p in make_shards(tmp_path, 30, 3)]  # 3 shards of 10 over 2 ranks: uneven on purpose
    for shards in (urls, urls[:1]):  # one shard serves two ranks too: ranges of samples, not whole shards
        counts, seen = [], []
        for rank in range(2):
            s = stream(shards, rank=rank, world=2, bs=4)
            s.set_epoch(0)
            batches = list(s)
            counts.append(len(batches))
            seen += keys_of(batches)
        n = count_samples(shards)
        assert counts == [-(-n // 8)] * 2  # ceil(n / (4 * 2)) batches each: no rank waits for another at the end
        assert len(set(seen)) == n and len(seen) - n == s.pad < 8  # every sample; the pad under one global batch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_remaining_batches(tmp_path, workers):
    urls = [str(p) for p in make_shards(tmp_path, 48, 4)]
    s = stream(urls)
    s.set_epoch(2)
    full = keys_of(list(make_loader(s, workers)))
    s.set_epoch(2, skip_batches=5)
    rest = keys_of(list(make_loader(s, workers)))
    assert rest == full[5 * 4:]


def test_corrupt_samples_skipped_and_counted(tmp_path):
    path = tmp_path / "bad-0000.tar"
    with wds.TarWriter(str(path)) as tar:
        for i in range(10):
            buf = io.BytesIO()
            np.save(buf, np.zeros(8, np.float32))
            npy = b"garbage" if i in (2, 7) else buf.getvalue()
            tar.write({"__key__": f"s{i:06d}", "npy": npy, "json": json.dumps({"y": 1.0}).encode()})
    s = ShardStream([str(path)], decode, collate, 4, shuffle_buffer=0, samples_per_epoch=8)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == 2 and sum(b[SKIPPED] for b in batches) == 2
    assert "s000002" not in keys_of(batches) and "s000007" not in keys_of(batches)


def test_truncated_and_non_tar_shards(tmp_path):
    urls = [str(p) for p in make_shards(tmp_path / "ok", 16, 2)]
    data = open(urls[0], "rb").read()
    trunc = tmp_path / "trunc-0000.tar"
    trunc.write_bytes(data[: len(data) // 2 + 100])
    s = ShardStream([str(trunc), urls[1]], decode, collate, 2, shuffle_buffer=0, samples_per_epoch=8)
    s.set_epoch(0)
    assert len(list(s)) == 4  # the truncated shard's tail is skipped; the stream cycles and keeps going
    junk = tmp_path / "junk-0000.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="corrupt shard"):
        count_samples([str(junk)])


def test_manifest_counts_and_checksums(tmp_path):
    import hashlib

    urls = [str(p) for p in make_shards(tmp_path, 12, 2)]
    entries = [{"name": p.split("/")[-1], "samples": 6, "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()}
               for p in urls]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries}))
    assert count_samples(urls) == 12
    verify_checksums(urls)
    with tarfile.open(urls[1], "a") as tar:  # the shard changes after preparation
        info = tarfile.TarInfo("extra.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_checksums(urls)


@pytest.mark.parametrize("workers", [0, 2])
def test_map_stream_resume_and_rank_split(workers):
    import torch

    from framework.streams import MapStream

    class Noisy(torch.utils.data.Dataset):  # random "augmentation" from the global RNG
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return {"x": torch.rand(1), "key": f"s{i:06d}"}

    def coll(samples):
        return {"x": torch.cat([s["x"] for s in samples]), "keys": [s["key"] for s in samples]}

    s = MapStream(Noisy(), coll, 4, seed=1)
    s.set_epoch(3)
    full = list(make_loader(s, workers))
    s.set_epoch(3, skip_batches=3)
    rest = list(make_loader(s, workers))
    assert keys_of(rest) == keys_of(full)[12:]
    assert torch.equal(torch.cat([b["x"] for b in rest]), torch.cat([b["x"] for b in full])[12:])
    two = [MapStream(Noisy(), coll, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for t in two:
        t.set_epoch(3)
    halves = [list(t) for t in two]
    # rank 0 and rank 1 batch k together are exactly the one-rank batch k of twice the size
    for k in range(len(full)):
        assert sorted(halves[0][k]["keys"] + halves[1][k]["keys"]) == sorted(full[k]["keys"])


def test_empty_shards_are_an_error_not_a_hang(tmp_path):
    empty = tmp_path / "empty-0000.tar"
    with wds.TarWriter(str(empty)):
        pass
    with pytest.raises(DataError, match="no readable samples"):  # found before training starts
        ShardStream([str(empty)], decode, collate, 2, shuffle_buffer=0, samples_per_epoch=4)


def _other_kind(path, n):
    """A shard whose samples lack the toy decode's "npy" (e.g. shards written for another recipe)."""
    with wds.TarWriter(str(path)) as tar:
        for i in range(n):
            tar.write({"__key__": f"o{i:06d}", "jpg": b"x", "txt": b"a caption"})
    return str(path)


def strict_decode(sample):
    """The toy decode, saying which keys it needs (what recipes do with DecodeError)."""
    if "npy" not in sample or "json" not in sample:
        raise DecodeError("no npy/json", expected=("npy", "json"))
    return decode(sample)


def test_shards_of_another_kind_fail_at_construction_naming_shard_and_keys(tmp_path):
    urls = [_other_kind(tmp_path / f"o-{i:04d}.tar", 30) for i in range(2)]
    with pytest.raises(DataError) as e:
        ShardStream(urls, strict_decode, collate, 4, shuffle_buffer=0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("60 sample(s) in a row") and "o-0001.tar" in msg
    assert "has keys jpg, txt" in msg and "expects npy and json" in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_a_worker_whose_samples_all_fail_raises_one_line_instead_of_spinning(tmp_path, capsys, workers):
    """One good shard (the start-up probe passes), one undecodable shard."""
    good = [str(p) for p in make_shards(tmp_path / "good", 16, 1)]
    bad = _other_kind(tmp_path / "z-0001.tar", 16)
    s = ShardStream(good + [bad], strict_decode, collate, 2, shuffle_buffer=4)
    s.set_epoch(0)
    if workers == 0:  # one reader of both shards: half its samples decode; it warns once and carries on
        batches = list(make_loader(s, workers))
        assert len(batches) == len(s) == 16 and sum(b[SKIPPED] for b in batches) >= 16
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: shard {bad}: samples that decode rejects")
        assert "has keys jpg, txt; the recipe's decode expects npy and json" in warnings[0]
        return
    with pytest.raises(DataError) as e:  # the bad shard's worker: a whole pass without one decoded sample
        list(make_loader(s, workers))
    msg = str(e.value)  # a worker's error arrives in the main process as the worker's one line
    del e
    t0 = time.time()
    gc.collect()  # the loader was freed with the error: were it left to the collector, torch waits 5 s per worker
    assert time.time() - t0 < 4
    assert "\n" not in msg and not msg.startswith("Caught"), msg
    assert msg.startswith("16 sample(s) in a row could not be decoded") and "z-0001.tar" in msg, msg
    assert "has keys jpg, txt" in msg and "expects npy and json" in msg, msg


def test_too_many_failures_in_a_row_raise_before_the_pass_ends(tmp_path):
    good = [str(p) for p in make_shards(tmp_path / "good", 8, 1)]
    bad = _other_kind(tmp_path / "z-0001.tar", 500)
    s = ShardStream(good + [bad], strict_decode, collate, 2, shuffle_buffer=0, failures_in_a_row=50)
    s.set_epoch(0)
    with pytest.raises(DataError, match="^50 sample\\(s\\) in a row could not be decoded"):
        list(s)
    assert FAILURES_IN_A_ROW == 100  # the default, documented in docs/data.md


def _manifest(folder, urls, counts):
    (folder / "manifest.json").write_text(json.dumps(
        {"shards": [{"name": u.split("/")[-1], "samples": c} for u, c in zip(urls, counts)]}))


def _truncate_before_sample(path, k):
    """Cut a shard in the middle of sample k's first tar header: exactly samples 0..k-1 stay readable."""
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isfile()]
    first = {}
    for m in members:
        first.setdefault(m.name.split(".")[0], m.offset)
    cut = sorted(first.values())[k] + 100
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_counts_every_lost_sample_and_warns_once(tmp_path, capsys, workers):
    urls = [str(p) for p in make_shards(tmp_path, 20, 2)]  # 10 samples each, listed in the manifest
    _manifest(tmp_path, urls, [10, 10])
    _truncate_before_sample(urls[1], 6)  # 6 of 10 readable: 4 lost every time the shard is read to its end
    s = ShardStream(urls, decode, collate, 2, shuffle_buffer=0)
    assert len(s) == 10
    skipped = 0
    for epoch in range(2):
        s.set_epoch(epoch)
        batches = list(make_loader(s, workers))
        assert len(batches) == 10  # the short shard is cycled: the epoch keeps its length
        skipped += sum(b[SKIPPED] for b in batches)
        assert not any(NOTES in b for b in batches)
    # workers=0: both shards in one pass (16 samples), the next pass stops before reaching the cut again;
    # workers=2: the damaged shard's worker reads it once to its end (6), then 4 more of its next pass
    assert skipped == 2 * 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warnings) == 1, warnings  # once per run, not per epoch or per worker
    assert warnings[0].startswith(f"warning: shard {urls[1]} is damaged: read 6 of its 10 samples")


def test_fewer_shards_than_workers_use_fewer_workers_with_a_note(tmp_path, capsys):
    urls = [str(p) for p in make_shards(tmp_path, 24, 1)]
    s = stream(urls)
    s.set_epoch(0)
    loader = make_loader(s, 2)
    assert loader.num_workers == 1
    assert len(keys_of(list(loader))) == 24
    make_loader(s, 2)  # every epoch builds a loader: the note is printed once
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: 1 shard(s) for 1 rank(s): using 1 DataLoader worker(s) per rank instead of "
                     "data.num_workers=2 (prepare more shards to use more)"]
    urls = [str(p) for p in make_shards(tmp_path / "three", 30, 3)]  # 2 ranks: 2 shards and 1 shard
    counts = []
    for rank in range(2):
        r = stream(urls, rank=rank, world=2, bs=4)
        r.set_epoch(0)
        loader = make_loader(r, 2)
        assert loader.num_workers == 1
        counts.append(len(list(loader)))
    assert counts == [4, 4]  # ceil(30 / 8): every sample, 2 of them twice


@pytest.mark.parametrize("sample,found", [({"jpg": "JPEG", "json": b"{}"}, "jpg, json"),  # no caption
                                          ({"image": "JPEG", "caption": b"a chest CT"}, "caption, image")])
def test_medblip_decode_names_the_keys_it_expects(tmp_path, sample, found):
    import io as _io

    from PIL import Image

    from recipes.common.image_text import ImageConfig, make_decode

    buf = _io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    path = tmp_path / "other-0000.tar"
    with wds.TarWriter(str(path)) as tar:
        for i in range(8):
            tar.write({"__key__": f"k{i}", **{k: buf.getvalue() if v == "JPEG" else v for k, v in sample.items()}})
    with pytest.raises(DataError) as e:
        ShardStream([str(path)], make_decode(ImageConfig(size=16), train=True), collate, 2)
    assert f"has keys {found}; the recipe's decode expects jpg|jpeg|png|webp and txt" in str(e.value)


@pytest.mark.parametrize("doc,needle", [
    ("[1, 2]", "is not a shard manifest"),
    ('{"shards": 3}', "is not a shard manifest"),
    ('{"shards": ["toy-0000.tar"]}', "is not a shard manifest"),
    ('{"shards": [{"name": "toy-0000.tar", "samples": "4"}]}', "toy-0000.tar has samples='4', not a count"),
    ('{"shards": [', "is not valid JSON"),
])
def test_a_malformed_manifest_is_one_data_error(tmp_path, doc, needle):
    urls = [str(p) for p in make_shards(tmp_path, 8, 2)]
    (tmp_path / "manifest.json").write_text(doc)
    with pytest.raises(DataError, match=needle) as e:
        ShardStream(urls, decode, collate, 2)
    assert str(tmp_path / "manifest.json") in str(e.value) and "re-run the data preparation" in str(e.value)


def test_private_rng_leaves_the_cuda_generators_alone(monkeypatch):
    """The data's private streams are seeded without torch.manual_seed (which reseeds every CUDA generator, the
    model's dropout and noise on a GPU), and draw what torch.manual_seed(seed) would have given."""
    from framework.epoch_plan import PrivateRng

    calls = []
    monkeypatch.setattr(torch, "manual_seed", lambda *a: calls.append(a))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda *a: calls.append(a))
    before = torch.get_rng_state()
    drawn = list(PrivateRng(1234).wrap(iter(torch.rand(3) for _ in range(2))))
    assert calls == [] and torch.equal(torch.get_rng_state(), before)
    monkeypatch.undo()
    expected = torch.Generator().manual_seed(1234)
    assert torch.equal(torch.cat(drawn), torch.rand(6, generator=expected))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_map_style_epoch_trains_every_sample_with_a_pad_under_one_step(world_size):
    """37 samples, batch 4, 2 micro-batches a step: every sample in the epoch, whole optimizer steps per rank, the same
    number of batches on every rank, and fewer than one optimizer step's samples seen twice (drop_last used to lose
    up to a step's worth)."""
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 37

        def __getitem__(self, i):
            return {"key": f"s{i:02d}"}

    from framework.streams import MapStream

    streams = [MapStream(Items(), lambda s: {"keys": [x["key"] for x in s]}, 4, seed=3, rank=r,
                         world_size=world_size, batch_multiple=2) for r in range(world_size)]
    seen = []
    for s in streams:
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s) and len(s) % 2 == 0 and all(len(b["keys"]) == 4 for b in batches)
        seen += [k for b in batches for k in b["keys"]]
    assert {f"s{i:02d}" for i in range(37)} == set(seen)
    assert 0 <= len(seen) - 37 < 4 * world_size * 2 and streams[0].pad == len(seen) - 37
