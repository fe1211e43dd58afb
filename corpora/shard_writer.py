"""Writing WebDataset shards that a crash never leaves half-written: members with fixed metadata, atomic renames,
per-shard reports in STATE_DIR, one writer per output folder, the clean-up of an interrupted run's leftovers.

The library of corpora/rocov2.py (preparation) and recipes/medblip/capfilt (bootstrapped captions).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from framework.files import atomic_write_text, fsync_dir, sha256_file

STATE_DIR = ".prepare"  # per-shard reports; kept beside the shards so a re-run knows what is complete


class PrepareError(ValueError):
    """A conversion that cannot go on (missing input, nothing matched, unknown option value, --out taken); one line."""


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Add one file to a shard with fixed metadata (no time, owner or mode differences): identical inputs give
    identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` atomically (framework.files.atomic_write_text): never half a file under the name."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


@dataclass
class ShardFile:
    """A shard being written by `atomic_shard`: add members; after the block, its size and sha256 (None if empty)."""

    tar: tarfile.TarFile
    file: Any  # the .tmp file object (flushed by the crash test hook)
    members: int = 0
    bytes: int = 0
    sha256: Optional[str] = None

    def add(self, name: str, payload: bytes) -> None:
        add_member(self.tar, name, payload)
        self.members += 1


@contextmanager
def atomic_shard(out: Path, name: str) -> Iterator[ShardFile]:
    """Write the tar shard `out/name` atomically: members go to `name.tmp`, which is fsynced, hashed and renamed
    into place when the block ends. A shard with no members leaves no file; a failure deletes the partial .tmp."""
    final, tmp = out / name, out / (name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                shard = ShardFile(tar, f)
                yield shard
            f.flush()
            os.fsync(f.fileno())
        if shard.members == 0:  # an empty tar would starve a reader: no file at all
            tmp.unlink()
            return
        shard.bytes, shard.sha256 = tmp.stat().st_size, sha256_file(tmp)
        os.replace(tmp, final)
        fsync_dir(out)
    except BaseException:  # disk full, an interrupt: drop the partial .tmp now rather than leave it filling the disk
        tmp.unlink(missing_ok=True)
        raise


def complete_report(out: Path, name: str, fp: str) -> Optional[dict]:
    """The shard's report when the shard was finished by a run with the same fingerprint."""
    rep_path, tar_path = out / STATE_DIR / (name + ".json"), out / name
    try:
        report = json.loads(rep_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if report.get("fingerprint") != fp:
        return None
    if report.get("samples") == 0:  # finished with nothing readable: no file by design
        return report
    if not tar_path.is_file() or tar_path.stat().st_size != report.get("bytes"):
        return None
    return report


def _ours(path: Path, shard_name: Callable[[str], bool]) -> bool:
    """A file a conversion writes: a shard whose name `shard_name` accepts (or its .tmp), or a manifest.json with
    our fingerprint."""
    name = path.name[:-len(".tmp")] if path.name.endswith(".tmp") else path.name
    if name == "manifest.json":
        try:
            return path.name.endswith(".tmp") or "fingerprint" in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            return False
    return shard_name(name)


def clean_out(out: Path, fp: str, planned: set[str], overwrite: bool, shard_name: Callable[[str], bool]) -> None:
    """Delete leftovers of interrupted runs; refuse to mix with shards from other inputs unless overwrite.

    Only files a conversion writes (shard names `shard_name` accepts, their .tmp, our manifest) are ever deleted;
    any other .tar or manifest.json in `out` is refused.
    """
    manifest = out / "manifest.json"
    strangers = [p for p in sorted(out.glob("*.tar")) + [manifest] if p.is_file() and not _ours(p, shard_name)]
    if strangers:
        raise PrepareError(f"{out} holds {strangers[0].name}, which no conversion wrote; choose an empty or new "
                           "--out (nothing was changed)")
    for tmp in [p for p in out.glob("*.tmp") if _ours(p, shard_name)] + list((out / STATE_DIR).glob("*.tmp")):
        tmp.unlink()
    foreign = []
    for tar in out.glob("*.tar"):
        rep = out / STATE_DIR / (tar.name + ".json")
        try:
            same = json.loads(rep.read_text()).get("fingerprint") == fp
        except (OSError, json.JSONDecodeError):
            same = tar.name in planned  # finished but unreported (killed between rename and report): redone
        if not same or tar.name not in planned:
            foreign.append(tar)
    if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") != fp:
        foreign.append(manifest)
    if foreign and not overwrite:
        raise PrepareError(f"{out} holds shards from other inputs or options ({foreign[0].name}...); "
                           "use another --out or pass --overwrite")
    for p in foreign:
        p.unlink()
        rep = out / STATE_DIR / (p.name + ".json")
        if rep.exists():
            rep.unlink()


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold .prepare/lock while writing: a second conversion into the same --out is refused, not interleaved."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / STATE_DIR / "lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"another conversion is writing into {out} right now; wait for it to finish (then "
                               "re-run: finished shards are kept) or choose another --out") from None
        yield
