"""Shard lists and their manifest.json (expanding shard specs, sample counts, checksums); DataError."""
from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path
from typing import Optional, Union

import webdataset as wds

from .files import sha256_file


class DataError(ValueError):
    """A data problem a user must fix (no shards, corrupt shard, undecodable samples); one line."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's DataError reaches the main process re-raised as DataError("Caught DataError in
        # DataLoader worker process N.\nOriginal Traceback ...\n...DataError: <message>"): keep <message>.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def expand_shards(spec: Union[str, list[str]]) -> list[str]:
    """Shard paths from a directory (its *.tar), a brace pattern, a glob, or a list of any of these."""
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    urls: list[str] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if os.path.isdir(s):
            urls += sorted(glob.glob(os.path.join(s, "*.tar")))
        elif "{" in s:
            urls += wds.shardlists.expand_urls(s)
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
    """Samples in each shard: from manifest.json where it lists them, else by reading the tar headers."""
    listed = manifest_counts(urls)
    return [listed[url] if url in listed else _tar_count(url) for url in urls]


def _tar_count(url: str) -> int:
    """Samples in a shard by its tar headers (of a truncated shard, those before the damage: what a reader gets)."""
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
    return len(keys)


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

