"""Files that are never seen half-written: write through a temporary sibling, rename over; content hashes."""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]


def fsync_dir(path: PathLike) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` (synced) if the block succeeds, else removed.
    Readers see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable_file(path: PathLike, option: str) -> Path:
    """Raise ValueError (one line naming `option`) unless `path` can be written as a file; creates nothing.

    Called before long work, so that hours of results are not lost to a bad output path at the very end.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: name a file (e.g. {path / 'out.json'})")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: its folder {parent} does not exist (or is a file)")
    try:  # a real write probe: os.access says yes to root on read-only folders and knows nothing of a full disk
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write in {parent} ({e.strerror})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: the file is not writable")
    return path


def check_own_folder(folder: Path, marker: str, option: str, owner: str, legacy: tuple[str, ...] = ()) -> None:
    """Raise ValueError (one line) unless `folder` is absent, empty, or holds `marker` (or a `legacy` file) that
    `owner` writes: a program that replaces what is in a folder may only do it in its own."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / f).is_file() for f in (marker, *legacy)):
        raise ValueError(f"{option} {folder} is not empty and was not written by {owner}: it is left as it is; "
                         f"choose a new or empty folder, or one {owner} wrote before")


def claim_folder(folder: Path, marker: str, note: str) -> None:
    """Create `folder` (checked by check_own_folder) and write `marker` into it, saying `note`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).write_text(note + "\n")
