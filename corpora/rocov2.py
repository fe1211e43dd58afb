"""Image-caption corpora (ROCOv2 parquet / ROCOv2 and ROCO folders / any image folder + CSV or JSONL)
-> deterministic, resumable WebDataset tar shards with a manifest.

Every sample is `<key>.jpg|png` (image bytes), `<key>.txt` (raw caption, UTF-8) and `<key>.json`
({"image_id", "cui", "modality", "modality_source", "source"}); the modality comes from the sample's modality
concept, else from its caption's first modality keyword (CAPTION_KEYWORDS). Shard i holds planned samples
[i*N, (i+1)*N) of the filtered listing, so the same inputs and options always give the same shards, byte for
byte: tar headers carry no times or owners, images are either copied as they are or re-encoded once with fixed
settings. Shards are written to `<name>.tmp`, fsynced and renamed; a per-shard report goes to `.prepare/` after
the rename, and manifest.json is written last. A re-run skips shards whose report matches; an interrupted
run leaves only `.tmp` files behind, which the next run deletes and rewrites. One conversion at a time writes
into an output folder (.prepare/lock), and only files a conversion writes are ever deleted there.

Here: the plan, the shard writers and the manifest. listings.py reads the source layouts, modalities.py decides each
sample's modality, image_encoding.py stores its image, shard_writer.py writes shards atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from corpora.image_encoding import ImageSource, encode_image
from corpora.listings import Listing, PrepareOptions, Record, filter_records, list_records, split_aliases
from corpora.modalities import decide_modality, resolve_modalities
from corpora.shard_writer import (
    STATE_DIR,
    PrepareError,
    atomic_shard,
    clean_out,
    complete_report,
    exclusive,
    write_json_atomic,
)

FORMAT_VERSION = 3  # 2: modality_source in each sample's json; 3: PNG photographs as JPEG, cui ['nan'] = none
CRASH_ENV = "MEDBLIP_PREPARE_CRASH_AFTER"  # test hook: a writer process dies after writing this many samples
LISTED_KEYS_CAP = 1000  # at most this many keys listed per filter reason in the manifest (all are counted)
DEFAULT_SAMPLES_PER_SHARD = 1000
MIN_SHARDS = 8  # the default shard size leaves small inputs this many shards: 2 ranks x 2 workers, twice over
_SHARD_NAME = re.compile(r"^(train|valid|test|all)-\d{5}\.tar$")  # the names prepare() gives its shards


@dataclass
class ShardTask:
    index: int
    name: str
    records: list[Record]
    out: str
    parquet_files: list[str]
    max_side: int
    jpeg_quality: int
    fingerprint: str
    kind: str
    keep_png: bool = False


_written_in_process = 0  # samples written by this process (for the crash test hook)


def write_shard(task: ShardTask) -> dict:
    """Write one shard atomically and its report to .prepare/<name>.json; returns the report."""
    global _written_in_process
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    out = Path(task.out)
    source = ImageSource(task.parquet_files)
    report: dict[str, Any] = {"name": task.name, "fingerprint": task.fingerprint, "samples": 0, "reencoded": 0,
                              "unreadable": [], "modalities": {}, "modality_sources": {}, "caption_modality": {},
                              "png": {}, "png_bytes_in": 0, "png_bytes_out": 0, "image_sha256": {}}
    png: Counter = Counter()
    modalities: Counter = Counter()
    sources: Counter = Counter()
    with atomic_shard(out, task.name) as shard:
        for rec in task.records:
            try:
                data = source.read(rec)
                payload, ext, reencoded, png_fate = encode_image(data, task.max_side, task.jpeg_quality,
                                                                 task.keep_png)
            except Exception as e:  # a bad image is reported and skipped, never fatal
                report["unreadable"].append({"key": rec.key, "source": rec.source,
                                             "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            modality, decided_by = decide_modality(rec.cui, rec.caption)
            meta = {"image_id": rec.image_id, "cui": list(rec.cui), "modality": modality,
                    "modality_source": decided_by, "source": f"{task.kind}:{rec.source}"}
            shard.add(f"{rec.key}.{ext}", payload)
            shard.add(f"{rec.key}.json", json.dumps(meta, sort_keys=True).encode())
            shard.add(f"{rec.key}.txt", rec.caption.strip().encode("utf-8"))
            report["samples"] += 1
            report["reencoded"] += int(reencoded)
            # the source bytes' hash: the manifest lists samples that are the same image under other ids
            report["image_sha256"][rec.key] = hashlib.sha256(data).hexdigest()
            if png_fate:
                png[png_fate] += 1
                report["png_bytes_in"] += len(data)
                report["png_bytes_out"] += len(payload)
            modalities[modality or "none"] += 1
            sources[decided_by or "none"] += 1
            if decided_by == "caption":
                report["caption_modality"][rec.key] = modality
            _written_in_process += 1
            if crash_after and _written_in_process >= crash_after:
                shard.file.flush()
                os._exit(17)  # simulate a kill: half a shard left in .tmp, no clean-up
    report["modalities"] = dict(sorted(modalities.items()))
    report["modality_sources"] = dict(sorted(sources.items()))
    report["png"] = dict(sorted(png.items()))
    report["bytes"], report["sha256"] = shard.bytes, shard.sha256  # 0, None: every image unreadable, no file
    write_json_atomic(out / STATE_DIR / (task.name + ".json"), report)
    return report


def fingerprint(opts: PrepareOptions, listing: Listing, plan: list[list[Record]]) -> str:
    """Hash of everything that determines the shards' bytes (not of --workers)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "kind": listing.kind, "max_side": opts.max_side,
                         "q": opts.jpeg_quality, "n": opts.samples_per_shard, "keep_png": opts.keep_png},
                        sort_keys=True).encode())
    for p in listing.source_files:
        h.update(f"{Path(p).name}:{os.path.getsize(p)}\n".encode())
    for i, shard in enumerate(plan):
        for r in shard:
            h.update(json.dumps([i, r.key, r.image_id, r.caption, r.cui, r.source]).encode())
    return h.hexdigest()


def is_prepared_name(name: str) -> bool:
    """A shard name prepare() gives: <split>-NNNNN.tar."""
    return _SHARD_NAME.match(name) is not None


def check_out(opts: PrepareOptions) -> Path:
    """--out, refused in one line if it lies in the input's data or cannot be written (before any work)."""
    out = Path(opts.out).expanduser()
    target, inp = out.resolve(), Path(opts.input).expanduser().resolve()
    if not inp.exists():
        raise PrepareError(f"input not found: {inp}")
    if inp.is_dir():
        data = inp  # a release folder: its images are somewhere below
    elif inp.suffix.lower() == ".parquet":
        data = None  # the images are inside the file
    else:  # a table: its image folder (or its own folder when the images lie beside it)
        images = Path(opts.images).expanduser() if opts.images else inp.parent / "images"
        data = images.resolve() if images.is_dir() else inp.parent
    if data is not None and (target == data or data in target.parents):
        what = "input folder" if inp.is_dir() else f"image folder of {inp.name}"
        raise PrepareError(f"--out {out} is inside the {what} {data}: the shards would be written into the data; "
                           "choose an --out outside it")
    if inp.is_file() and target == inp.parent:
        raise PrepareError(f"--out {out} is the folder of the input {inp.name}: the shards would be written into "
                           "the data; choose an --out outside it")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PrepareError(f"--out {out}: {existing} is a file (Not a directory); choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrepareError(f"--out {out}: cannot write in {existing} (read-only file system or no permission); "
                           "choose a writable folder for --out")
    return out


def samples_per_shard(opts: PrepareOptions, kept: int) -> int:
    """--samples-per-shard, or by default 1000 but fewer for small inputs: at least MIN_SHARDS shards (of inputs
    that have MIN_SHARDS samples), so that several ranks x workers all get shards."""
    if opts.samples_per_shard is not None:
        return opts.samples_per_shard
    return max(1, min(DEFAULT_SAMPLES_PER_SHARD, kept // MIN_SHARDS))


def prepare(opts: PrepareOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Convert `opts.input` into shards under `opts.out`; returns the manifest (also written to manifest.json)."""
    if opts.samples_per_shard is not None and opts.samples_per_shard < 1:
        raise PrepareError(f"--samples-per-shard must be >= 1, got {opts.samples_per_shard}")
    if opts.max_side < 0 or not 1 <= opts.jpeg_quality <= 100:
        raise PrepareError("--max-side must be >= 0 and --jpeg-quality in 1..100")
    if opts.limit is not None and opts.limit < 1 or opts.workers < 1:
        raise PrepareError(f"--limit and --workers must be >= 1 (got --limit {opts.limit}, --workers {opts.workers})")
    resolve_modalities(opts.modality)  # unknown names fail before any listing work
    t0 = time.time()
    out = check_out(opts)
    listing = list_records(opts)
    if not listing.records and not listing.filtered.get("missing_image"):
        raise PrepareError(f"{opts.input} lists no image-caption pairs for split {opts.split!r}")
    if not listing.records:
        raise PrepareError(f"no images matched in {opts.input} (split {opts.split!r}; "
                           f"{len(listing.filtered.get('missing_image', []))} captions without an image file"
                           f"{'; ' + listing.hint if listing.hint else ''})")
    kept = filter_records(listing, opts)
    counts = {k: len(v) for k, v in sorted(listing.filtered.items())}
    if not kept:
        raise PrepareError(f"no samples left after filtering {len(listing.records)} listed ({counts}); "
                           "change --modality or --limit")
    opts = replace(opts, samples_per_shard=samples_per_shard(opts, len(kept)))
    n = opts.samples_per_shard
    plan = [kept[i:i + n] for i in range(0, len(kept), n)]
    prefix = "all" if not split_aliases(opts.split) else split_aliases(opts.split)[0]
    names = [f"{prefix}-{i:05d}.tar" for i in range(len(plan))]
    fp = fingerprint(opts, listing, plan)
    log(f"prepare: {len(listing.records)} listed, {len(kept)} kept ({counts or 'nothing filtered'}); "
        f"{len(plan)} shards of <= {n}{_sources(kept)}")
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        with exclusive(out):
            return _write_all(opts, listing, kept, plan, names, fp, out, log, t0)
    except OSError as e:  # disk full, read-only, quota: what and where, then the way out
        where = f" ({e.filename})" if e.filename else ""
        raise PrepareError(f"writing into --out {out} failed: {e.strerror or e}{where}; free space or choose "
                           "another --out, then re-run the same command (finished shards are kept)") from None


def _sources(kept: list[Record]) -> str:
    """', modality from: cui N, caption M, none K' for the log line."""
    got = Counter(decide_modality(r.cui, r.caption)[1] or "none" for r in kept)
    return "; modality from " + ", ".join(f"{k} {v}" for k, v in sorted(got.items()))


def _write_all(opts: PrepareOptions, listing: Listing, kept: list[Record], plan: list[list[Record]],
               names: list[str], fp: str, out: Path, log: Callable[[str], None], t0: float) -> dict:
    """Write the shards that are not complete yet, then the manifest."""
    clean_out(out, fp, set(names), opts.overwrite, is_prepared_name)
    reports: dict[int, dict] = {}
    for i, name in enumerate(names):
        rep = complete_report(out, name, fp)
        if rep is not None:
            reports[i] = rep
    log(f"prepare: {len(reports)} of {len(plan)} shards already complete")
    manifest_path = out / "manifest.json"
    if len(reports) == len(plan) and manifest_path.is_file():
        log(f"prepare: {out} is up to date")
        return json.loads(manifest_path.read_text())
    tasks = [ShardTask(i, names[i], plan[i], str(out), listing.parquet_files, opts.max_side, opts.jpeg_quality,
                       fp, listing.kind, opts.keep_png) for i in range(len(plan)) if i not in reports]
    done_samples = 0
    t1 = time.time()

    def progress(rep: dict) -> None:
        nonlocal done_samples
        done_samples += rep["samples"]
        rate = done_samples / max(time.time() - t1, 1e-9)
        log(f"prepare: [{len(reports)}/{len(plan)}] {rep['name']}: {rep['samples']} samples, "
            f"{len(rep['unreadable'])} unreadable ({rate:.0f} img/s)")

    if opts.workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            reports[task.index] = write_shard(task)
            progress(reports[task.index])
    else:
        try:
            with ProcessPoolExecutor(max_workers=min(opts.workers, len(tasks)), mp_context=get_context("spawn")) as ex:
                for task, rep in zip(tasks, ex.map(write_shard, tasks)):
                    reports[task.index] = rep
                    progress(rep)
        except BrokenProcessPool:
            raise PrepareError("a writer process died (killed or out of memory); re-run the same command to "
                               "finish: completed shards are kept") from None
    manifest = _manifest(opts, listing, kept, names, reports, fp)
    write_json_atomic(manifest_path, manifest)
    t = manifest["totals"]
    log(f"prepare: wrote {t['samples']} samples in {t['shards']} shards ({t['bytes'] / 2**20:.1f} MiB), "
        f"{t['unreadable']} unreadable, {time.time() - t0:.1f} s -> {manifest_path}")
    if manifest["png"]["sources"]:
        log(f"prepare: {png_summary(manifest['png'], opts)}")
    if manifest["no_concept"]["count"]:
        log(f"prepare: {manifest['no_concept']['count']} samples have no concept (cui ['nan']): their modality comes "
            "from the caption keywords (manifest: no_concept)")
    for line in duplicate_lines(manifest):
        log(f"prepare: {line}")
    return manifest


def png_summary(png: dict[str, Any], opts: PrepareOptions) -> str:
    """One line: what became of the PNG sources and their bytes before and after."""
    fate = png["fate"]
    kept = {k: v for k, v in fate.items() if k not in ("jpeg", "resized", "converted", "keep_png")}
    mib = 2 ** 20
    if opts.keep_png:
        changed = fate.get("resized", 0) + fate.get("converted", 0)
        return (f"{png['sources']} PNG images ({png['bytes_in'] / mib:.1f} MiB) stored as they are (--keep-png)"
                + (f", except {changed} larger than --max-side or 16-bit, as JPEG" if changed else ""))
    how = (f"{png['sources']} PNG images ({png['bytes_in'] / mib:.1f} MiB) stored in {png['bytes_out'] / mib:.1f} "
           f"MiB: {fate.get('jpeg', 0)} photographs re-encoded as JPEG (quality {opts.jpeg_quality})")
    if fate.get("resized"):
        how += f", {fate['resized']} larger than --max-side shrunk to JPEG"
    if fate.get("converted"):
        how += f", {fate['converted']} 16-bit or other modes converted to JPEG"
    if kept:
        how += ", kept as PNG: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(kept.items()))
    return how + ("" if opts.keep_png else "; --keep-png keeps PNGs as they are")


def duplicate_lines(manifest: dict[str, Any]) -> list[str]:
    """Console lines for the manifest's duplicates (same image id dropped, same image bytes under two ids)."""
    d = manifest["duplicates"]
    out = []
    if d["same_image_id"]["count"]:
        out.append(f"{d['same_image_id']['count']} rows repeat an earlier image id and were dropped (manifest: "
                   "duplicates.same_image_id)")
    if d["same_image_bytes"]["count"]:
        out.append(f"{d['same_image_bytes']['count']} samples have the image bytes of another sample under another "
                   "id; kept (manifest: duplicates.same_image_bytes)")
    return out


def _manifest(opts: PrepareOptions, listing: Listing, kept: list[Record], names: list[str],
              reports: dict[int, dict], fp: str) -> dict:
    """manifest.json: the shards and totals, what was filtered and why, modalities, PNG fates, concepts, duplicates."""
    ordered = [reports[i] for i in range(len(names))]
    shards = [{"name": name, "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
              for name, r in zip(names, ordered) if r["samples"]]
    unreadable = [u for r in ordered for u in r["unreadable"]]
    modalities, sources, png = Counter(), Counter(), Counter()
    by_caption: dict[str, str] = {}
    for r in ordered:
        modalities.update(r["modalities"])
        sources.update(r["modality_sources"])
        by_caption.update(r["caption_modality"])
        png.update(r.get("png", {}))
    filtered = {reason: {"count": len(keys), "keys": [k for k in keys if k][:LISTED_KEYS_CAP]}
                for reason, keys in sorted(listing.filtered.items())}
    filtered["unreadable_image"] = {"count": len(unreadable), "keys": [u["key"] for u in unreadable][:LISTED_KEYS_CAP]}
    selected = resolve_modalities(opts.modality)
    options = {k: v for k, v in asdict(opts).items() if k not in ("out", "workers", "overwrite")}
    written = {r.key: r for r in kept}
    no_concept = [k for k in listing.no_concept if k in written]
    judged = Counter(decide_modality(written[k].cui, written[k].caption)[0] or "none" for k in no_concept)
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "source": {"kind": listing.kind, "split": opts.split},
        "options": options,
        "modality_filter": {cui: name for cui, name in sorted(selected.items())},
        "sample_format": {"__key__": "image id", "jpg|png": "image bytes", "txt": "raw caption (UTF-8)",
                          "json": "{image_id, cui, modality, modality_source (cui|caption|null), source}"},
        "shards": shards,
        "totals": {"listed": len(listing.records) + len(listing.filtered.get("missing_image", []))
                   + len(listing.filtered.get("other_split", [])),
                   "planned": len(kept), "samples": sum(s["samples"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards), "shards": len(shards),
                   "reencoded": sum(r["reencoded"] for r in ordered), "unreadable": len(unreadable)},
        "modalities": dict(sorted(modalities.items())),
        "modality_sources": dict(sorted(sources.items())),  # what decided each written sample's modality
        "caption_modality": by_caption,  # every written sample whose modality came from a caption keyword
        "filtered": filtered,
        "unreadable": unreadable[:LISTED_KEYS_CAP],
        # PNG sources: what became of them (jpeg | resized | few_colours | alpha | smaller | keep_png), bytes in/out
        "png": {"sources": sum(png.values()), "fate": dict(sorted(png.items())),
                "bytes_in": sum(r.get("png_bytes_in", 0) for r in ordered),
                "bytes_out": sum(r.get("png_bytes_out", 0) for r in ordered)},
        # rows whose concepts were only a 'nan' placeholder (the hub copy's cui ['nan']): no concept, so the
        # caption keywords decided their modality (counted here by what they decided)
        "no_concept": {"count": len(no_concept), "modality_from_caption": dict(sorted(judged.items())),
                       "keys": no_concept[:LISTED_KEYS_CAP],
                       "listed": len(listing.no_concept)},
        "duplicates": _duplicates(listing, ordered),
    }


def _duplicates(listing: Listing, reports: list[dict]) -> dict[str, Any]:
    """The manifest's repeats: an image id listed again (the later rows dropped, as filtered.duplicate_key) and one
    image under several ids (kept). The hub copy's train split has 4 rows more than the release (59,962 vs 59,958)."""
    by_key: dict[str, list[Record]] = {}
    for r in listing.records:
        by_key.setdefault(r.key, []).append(r)
    same_id = [{"key": k, "rows": [r.source for r in rs], "same_caption": len({r.caption for r in rs}) == 1}
               for k, rs in by_key.items() if len(rs) > 1]
    by_hash: dict[str, list[str]] = {}
    for report in reports:
        for key, digest in report.get("image_sha256", {}).items():
            by_hash.setdefault(digest, []).append(key)
    same_bytes = [keys for keys in by_hash.values() if len(keys) > 1]
    return {"same_image_id": {"count": sum(len(d["rows"]) - 1 for d in same_id), "ids": same_id[:LISTED_KEYS_CAP]},
            "same_image_bytes": {"count": sum(len(g) - 1 for g in same_bytes), "groups": same_bytes[:LISTED_KEYS_CAP]}}
