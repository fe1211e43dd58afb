"""The source layouts (ROCOv2 parquet, ROCOv2 and ROCO release folders, CSV/JSONL tables) read into a Listing of
Records, and the filters that pick the samples to write; no image is opened."""
from __future__ import annotations

import csv
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from corpora.modalities import CUI_TO_MODALITY, decide_modality, is_placeholder, resolve_modalities, split_cuis
from corpora.shard_writer import PrepareError

_SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"),
                  "test": ("test",)}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "image_path", "path", "img", "image_file")
_CAPTION_COLUMNS = ("caption", "text", "captions", "report")


@dataclass
class PrepareOptions:
    """What to convert and how: the options of launch/prepare_rocov2.py."""

    input: str  # parquet file/dir, ROCOv2 or ROCO release folder, or a CSV/JSONL table
    out: str  # output directory for shards, manifest.json and .prepare/
    format: str = "auto"  # auto | parquet | rocov2 | roco | table
    split: str = "train"  # train | valid | test (aliases validation/val/dev) | all (parquet and tables)
    modality: list[str] = field(default_factory=list)  # names (CT, MRI, X-ray...) or raw CUIs; [] keeps all
    max_side: int = 512  # longer image side above which an image is re-encoded once as JPEG (0: never)
    jpeg_quality: int = 90
    keep_png: bool = False  # store PNGs within max_side as they are (default: photographs re-encoded as JPEG)
    samples_per_shard: Optional[int] = None  # None: DEFAULT_SAMPLES_PER_SHARD, fewer for small inputs
    workers: int = 1
    limit: Optional[int] = None  # keep only the first N samples after filtering (quick trials)
    images: Optional[str] = None  # image folder for a table (default: <table dir>/images, else <table dir>)
    image_column: Optional[str] = None  # table columns (default: detected, e.g. image / file_name)
    caption_column: Optional[str] = None
    overwrite: bool = False  # replace shards prepared from other inputs/options in `out`


@dataclass(frozen=True)
class Record:
    """One planned sample: where its image is (a path, or (parquet file index, row)) and its text."""

    key: str
    image_id: str
    caption: str
    cui: tuple[str, ...]
    source: str  # human-readable origin (relative path, file#row)
    loc: Any  # str path | (file_index, row)


@dataclass
class Listing:
    records: list[Record]
    kind: str  # rocov2-parquet | rocov2 | roco | table
    parquet_files: list[str] = field(default_factory=list)
    source_files: list[str] = field(default_factory=list)  # files whose sizes enter the fingerprint
    has_cui: bool = True
    no_concept: list[str] = field(default_factory=list)  # keys whose concepts were a 'nan' placeholder
    filtered: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    hint: str = ""  # which image names were looked for and which were found (for "no images matched")

    def drop(self, reason: str, key: str) -> None:
        self.filtered.setdefault(reason, []).append(key)


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots (the reader splits key/extension at the first dot) or slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text.strip()) or "_"


def split_aliases(split: str) -> tuple[str, ...]:
    s = split.strip().lower()
    for canon, names in _SPLIT_ALIASES.items():
        if s in names:
            return names
    if s == "all":
        return ()
    raise PrepareError(f"--split {split!r}: use train, valid (validation/val/dev), test or all")


def _parquet_listing(root: Path, split: str) -> Listing:
    import pyarrow.parquet as pq

    if root.is_file():
        files = [root]
    else:
        files = sorted(root.rglob("*.parquet"))
        if not files:
            raise PrepareError(f"no .parquet files under {root}")
        names = split_aliases(split)
        if names:
            def split_of(p: Path) -> str:
                rel = p.relative_to(root)
                parts = [re.split(r"[-_.]", part)[0].lower() for part in rel.parts]
                return next((x for x in parts if any(x in v for v in _SPLIT_ALIASES.values())), "")
            found = sorted({split_of(p) for p in files} - {""})
            files = [p for p in files if split_of(p) in names]
            if not files:
                raise PrepareError(f"no parquet files for split {split!r} under {root} (splits found: "
                                   f"{', '.join(found) or 'none'}; files are matched by name, "
                                   "e.g. train-00000.parquet)")
    listing = Listing([], "rocov2-parquet", parquet_files=[str(p) for p in files], source_files=[str(p) for p in files])
    base = root if root.is_dir() else root.parent
    for fi, path in enumerate(files):
        pf = pq.ParquetFile(path)
        cols = set(pf.schema_arrow.names)
        if "image" not in cols or "caption" not in cols:
            raise PrepareError(f"{path}: expected columns image and caption (found: {', '.join(sorted(cols))})")
        wanted = [c for c in ("image_id", "caption", "cui") if c in cols]
        listing.has_cui = listing.has_cui and "cui" in cols
        row = 0
        rel = path.relative_to(base).as_posix()
        for batch in pf.iter_batches(batch_size=4096, columns=wanted):  # captions only: images stay on disk
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                image_id = data["image_id"][i] if "image_id" in data else f"{path.stem}_{row}"
                cuis = split_cuis(data["cui"][i]) if "cui" in data else ()
                key = sanitize_key(str(image_id))
                if "cui" in data and is_placeholder(data["cui"][i]):
                    listing.no_concept.append(key)
                listing.records.append(Record(key, str(image_id), data["caption"][i] or "", cuis, f"{rel}#{row}",
                                              (fi, row)))
                row += 1
    return listing


def _read_csv_columns(path: Path, want: dict[str, tuple[str, ...]]) -> Iterator[dict[str, str]]:
    """Rows of a CSV with the wanted columns found case-insensitively ({our name: candidates})."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = {h.lower().strip(): h for h in (reader.fieldnames or [])}
        cols = {}
        for name, candidates in want.items():
            hit = next((header[c] for c in candidates if c in header), None)
            if hit is None:
                raise PrepareError(f"{path}: no {'/'.join(candidates)} column (found: {', '.join(header.values())})")
            cols[name] = hit
        with _csv_errors(path, reader):
            for row in reader:
                yield {name: (row.get(col) or "") for name, col in cols.items()}


@contextmanager
def _csv_errors(path: Path, reader: Any) -> Iterator[None]:
    """csv.Error (a field over csv's 128 KiB limit: in practice an unbalanced quote that swallowed the lines after
    it) as one PrepareError naming the file and line."""
    try:
        yield
    except csv.Error as e:
        raise PrepareError(f"{path}: the row from line {reader.line_num + 1}: {e} (a caption over "
                           f"{csv.field_size_limit() // 1024} KiB is usually an unbalanced quote \" that swallowed the "
                           "lines after it; fix the file)") from None


def _index_images(folder: Path) -> dict[str, Path]:
    """Image file stem -> path for every image under `folder` (one directory scan, not one stat per ID)."""
    index: dict[str, Path] = {}
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in _IMAGE_EXTS:
                index.setdefault(stem, Path(dirpath) / name)
    return index


def _image_hint(img_dir: Path, expected: str, index: dict[str, Path]) -> str:
    """'looked for e.g. DIR/NAME; found e.g. OTHER' (or: no image files there)."""
    found = f"found e.g. {min(index.values()).name}" if index else "it holds no image files"
    return f"looked for e.g. {img_dir / expected}; {found}"


def _rocov2_listing(root: Path, split: str) -> Listing:
    names = split_aliases(split)
    if not names:
        raise PrepareError("--split all is not supported for the ROCOv2 folder layout; prepare train/valid/test")
    cap_file = next((p for n in names for p in sorted(root.rglob(f"{n}_captions.csv"))), None)
    if cap_file is None:
        raise PrepareError(f"no {names[0]}_captions.csv under {root} (ROCOv2 layout: <split>_captions.csv, "
                           "<split>_concepts.csv, <split>/ images)")
    base = cap_file.parent
    split_name = cap_file.name[: -len("_captions.csv")]
    candidates = [base / split_name, base / f"{split_name}_images" / split_name, base / f"{split_name}_images",
                  base / "images" / split_name, base / "images"]
    img_dir = next((d for d in candidates if d.is_dir()), None)
    if img_dir is None:
        looked = ", ".join(str(c) for c in candidates[:3])
        raise PrepareError(f"no image folder for {cap_file.name} (looked for {looked})")
    cuis: dict[str, dict[str, None]] = {}  # ordered union of the concept files' CUIs
    concept_files = [base / f"{split_name}_concepts.csv", base / f"{split_name}_concepts_manual.csv"]
    for cf in concept_files:
        if cf.is_file():
            for row in _read_csv_columns(cf, {"id": ("id",), "cuis": ("cuis", "cui", "concepts")}):
                cuis.setdefault(row["id"].strip(), {}).update(dict.fromkeys(split_cuis(row["cuis"])))
    listing = Listing([], "rocov2", source_files=[str(cap_file)] + [str(c) for c in concept_files if c.is_file()])
    listing.has_cui = any(c.is_file() for c in concept_files)
    index = _index_images(img_dir)
    for row in _read_csv_columns(cap_file, {"id": ("id", "image_id"), "caption": ("caption", "captions")}):
        image_id = row["id"].strip()
        path = index.get(image_id) or index.get(Path(image_id).stem)
        key = sanitize_key(image_id)
        if path is None:
            listing.drop("missing_image", key)
            listing.hint = listing.hint or _image_hint(img_dir, f"{image_id}.jpg", index)
            continue
        listing.records.append(Record(key, image_id, row["caption"], tuple(cuis.get(image_id, ())),
                                      path.relative_to(root).as_posix(), str(path)))
    return listing


def _roco_captions(root: Path, names: tuple[str, ...]) -> Path:
    """The captions.txt of the split: under <split>/ below root, or root itself is (inside) the split folder."""
    def rel_parts(p: Path) -> list[str]:
        return [x.lower() for x in p.relative_to(root).parts[:-1]]

    found = [p for p in sorted(root.rglob("captions.txt")) if "non-radiology" not in rel_parts(p)]
    hits = [p for p in found if any(n in rel_parts(p) for n in names)]
    own = [x.lower() for x in root.resolve().parts[-2:]]  # .../validation or .../validation/radiology
    if not hits and any(n in own for n in names):
        hits = found
    if hits:
        return hits[0]
    other = next((x for x in own if any(x in v for v in _SPLIT_ALIASES.values())), None)
    if found and other:
        raise PrepareError(f"{root} is ROCO's {other!r} split, not {names[0]!r}: pass --split {other}")
    raise PrepareError(f"no {names[0]}/.../captions.txt under {root} (ROCO layout: <split>/radiology/captions.txt "
                       "and <split>/radiology/images/; --input may also be the split or radiology folder itself)")


def _roco_sidecar(folder: Path, name: str) -> Optional[Path]:
    """cuis.txt / dlinks.txt beside captions.txt (some ROCO revisions add a suffix: cuis_tp_val_revised.txt)."""
    exact = folder / f"{name}.txt"
    return exact if exact.is_file() else next(iter(sorted(folder.glob(f"{name}*.txt"))), None)


def _roco_listing(root: Path, split: str) -> Listing:
    names = split_aliases(split)
    if not names:
        raise PrepareError("--split all is not supported for the ROCO folder layout; prepare train/validation/test")
    cap_file = _roco_captions(root, names)
    img_dir = cap_file.parent / "images" if (cap_file.parent / "images").is_dir() else cap_file.parent
    cuis: dict[str, tuple[str, ...]] = {}
    cui_file = _roco_sidecar(cap_file.parent, "cuis")
    if cui_file is not None:
        for line in cui_file.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if parts and parts[0].strip():
                cuis[parts[0].strip()] = tuple(c for p in parts[1:] for c in split_cuis(p))
    # ROCO's fetch.py saved images as <PMC id>_<figure file> until 2022 and as <ROCO id>.jpg since: accept both.
    # dlinks.txt lines: ROCO_ID <TAB> wget -r ftp://.../PMC3970251.tar.gz -P /path <TAB> figure.jpg
    pmc_names: dict[str, str] = {}
    dlinks = _roco_sidecar(cap_file.parent, "dlinks")
    if dlinks is not None:
        for line in dlinks.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            archive = next((w for w in parts[1].split() if w.endswith(".tar.gz")), "") if len(parts) > 2 else ""
            if archive:
                pmc_names[parts[0].strip()] = f"{archive.rsplit('/', 1)[-1][:-len('.tar.gz')]}_{parts[-1].strip()}"
    sources = [cap_file] + [f for f in (cui_file, dlinks) if f is not None]
    listing = Listing([], "roco", source_files=[str(f) for f in sources])
    listing.has_cui = cui_file is not None
    index = _index_images(img_dir)
    first_id = None
    for line in cap_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        image_id, _, caption = line.partition("\t")
        image_id = image_id.strip()
        first_id = first_id or image_id
        key = sanitize_key(image_id)
        path = index.get(image_id) or index.get(os.path.splitext(pmc_names.get(image_id, ""))[0])
        if path is None:
            listing.drop("missing_image", key)
            continue
        listing.records.append(Record(key, image_id, caption, cuis.get(image_id, ()),
                                      path.relative_to(root).as_posix(), str(path)))
    if first_id:
        alt = f" or {pmc_names[first_id]} (its dlinks.txt name)" if first_id in pmc_names else \
            " (add dlinks.txt beside captions.txt to match <PMC id>_<figure>.jpg names)"
        listing.hint = _image_hint(img_dir, f"{first_id}.jpg{alt}", index)
    return listing


def _table_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise PrepareError(f"{path}:{n}: expected one JSON object per line ({{\"image\": ..., "
                                       f"\"caption\": ...}}), got {type(rows[-1]).__name__}")
        cols = sorted({k for r in rows for k in r})
        return rows, cols
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        with _csv_errors(path, reader):
            return list(reader), list(reader.fieldnames or [])


def _table_listing(table: Path, split: str, images: Optional[str], image_col: Optional[str],
                   caption_col: Optional[str]) -> Listing:
    rows, cols = _table_rows(table)
    lower = {c.lower(): c for c in cols}

    def pick(given: Optional[str], candidates: tuple[str, ...], what: str) -> str:
        if given:
            if given not in cols:
                raise PrepareError(f"{table}: no column {given!r} (found: {', '.join(cols)})")
            return given
        hit = next((lower[c] for c in candidates if c in lower), None)
        if hit is None:
            raise PrepareError(f"{table}: no {what} column (looked for {', '.join(candidates)}; found: "
                               f"{', '.join(cols)}); name it with --{what}-column")
        return hit

    icol = pick(image_col, _IMAGE_COLUMNS, "image")
    ccol = pick(caption_col, _CAPTION_COLUMNS, "caption")
    cui_col = lower.get("cui") or lower.get("cuis")
    split_col = lower.get("split")
    names = split_aliases(split)
    if images:
        img_dir = Path(images)
    else:
        img_dir = table.parent / "images" if (table.parent / "images").is_dir() else table.parent
    if not img_dir.is_dir():
        raise PrepareError(f"image folder not found: {img_dir}")
    if names and split_col is None:
        raise PrepareError(f"{table} has no split column: use --split all")
    listing = Listing([], "table", source_files=[str(table)], has_cui=cui_col is not None)
    for row in rows:
        if names and str(row.get(split_col, "")).strip().lower() not in names:
            listing.filtered.setdefault("other_split", []).append("")
            continue
        rel = str(row.get(icol) or "").strip()
        key = sanitize_key(os.path.splitext(rel)[0]) if rel else "_"
        path = Path(rel) if os.path.isabs(rel) else img_dir / rel
        if not rel or not path.is_file():
            listing.drop("missing_image", key)
            if rel and not listing.hint:
                listing.hint = f"looked for e.g. {path} (--images DIR sets the folder the {icol} paths start from)"
            continue
        caption = row.get(ccol)
        listing.records.append(Record(key, os.path.splitext(os.path.basename(rel))[0],
                                      "" if caption is None else str(caption),
                                      split_cuis(row.get(cui_col)) if cui_col else (),
                                      rel, str(path)))
    return listing


def detect_format(path: Path, fmt: str) -> str:
    """The input layout: explicit, or guessed from what the path holds."""
    if fmt != "auto":
        if fmt not in ("parquet", "rocov2", "roco", "table"):
            raise PrepareError(f"--format {fmt!r}: use auto, parquet, rocov2, roco or table")
        return fmt
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return "parquet"
        if suffix in (".csv", ".jsonl", ".ndjson", ".tsv"):
            return "table"
        raise PrepareError(f"{path}: cannot tell the format from the file type; pass --format")
    if next(path.rglob("*.parquet"), None) is not None:
        return "parquet"
    if next(path.rglob("*_captions.csv"), None) is not None:
        return "rocov2"
    if next(path.rglob("captions.txt"), None) is not None:
        return "roco"
    raise PrepareError(f"{path}: no parquet files, <split>_captions.csv (ROCOv2) or captions.txt (ROCO) found; "
                       "for an image folder + table pass the CSV/JSONL file as the input")


def list_records(opts: PrepareOptions) -> Listing:
    """All candidate samples of the input, in a deterministic order (no image is opened)."""
    path = Path(opts.input).expanduser()
    if not path.exists():
        raise PrepareError(f"input not found: {path}")
    fmt = detect_format(path, opts.format)
    if fmt == "table" and not path.is_file():
        raise PrepareError(f"--format table needs the CSV/JSONL file as the input, got the folder {path}")
    try:
        if fmt == "parquet":
            return _parquet_listing(path, opts.split)
        if fmt == "rocov2":
            return _rocov2_listing(path, opts.split)
        if fmt == "roco":
            return _roco_listing(path, opts.split)
        return _table_listing(path, opts.split, opts.images, opts.image_column, opts.caption_column)
    except UnicodeDecodeError as e:  # a caption/concept table that is not UTF-8 text
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the table as UTF-8 "
                           "or pass the right --format") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid/ArrowIOError: not a parquet file
        if type(e).__module__.startswith("pyarrow"):
            raise PrepareError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]}); "
                               "pass the right --format") from None
        raise


def filter_records(listing: Listing, opts: PrepareOptions) -> list[Record]:
    """Drop empty captions, duplicate keys and (with --modality) other modalities; record why."""
    selected = resolve_modalities(opts.modality)
    raw = sorted(c for c in selected if c not in CUI_TO_MODALITY)
    if raw and not listing.has_cui:
        raise PrepareError(f"--modality {raw[0]} needs UMLS concepts, but this input has none (no cui column / "
                           "concepts file); select by modality name (CT, MRI, ...) to use the caption keywords")
    names = set(selected.values())
    kept, seen = [], set()
    for r in listing.records:
        if not r.caption.strip():
            listing.drop("empty_caption", r.key)
        elif r.key in seen:
            listing.drop("duplicate_key", r.key)
        elif selected and not any(c in selected for c in r.cui) and decide_modality(r.cui, r.caption)[0] not in names:
            listing.drop("modality", r.key)
        else:
            seen.add(r.key)
            kept.append(r)
    if opts.limit is not None:
        for r in kept[opts.limit:]:
            listing.drop("limit", r.key)
        kept = kept[:opts.limit]
    return kept
