"""Shard streaming: shard expansion, equal batches per rank, exact resume position, corrupt samples counted."""
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from framework.data import SKIPPED, DataError, ShardStream, count_samples, expand_shards, make_loader, \
    verify_checksums
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


def test_ranks_get_equal_batch_counts_and_disjoint_shards(tmp_path):
    urls = [str(p) for p in make_shards(tmp_path, 30, 3)]  # 3 shards of 10 over 2 ranks: uneven on purpose
    counts, seen = [], []
    for rank in range(2):
        s = stream(urls, rank=rank, world=2, bs=4)
        s.set_epoch(0)
        batches = list(s)
        counts.append(len(batches))
        seen.append(set(keys_of(batches)))
    assert counts == [3, 3]  # 30 // (4 * 2) batches each: no rank waits for another at the end
    with pytest.raises(DataError, match="each rank needs at least one shard"):
        stream(urls[:1], world=2)


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
    from framework.data import MapStream

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
    s = ShardStream([str(empty)], decode, collate, 2, shuffle_buffer=0, samples_per_epoch=4)
    s.set_epoch(0)
    with pytest.raises(DataError, match="no readable samples"):
        list(s)
