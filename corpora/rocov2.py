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
"""
from __future__ import annotations

import bisect
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from PIL import Image

from framework.files import atomic_write_text, fsync_dir, sha256_file

FORMAT_VERSION = 3  # 2: modality_source in each sample's json; 3: PNG photographs as JPEG, cui ['nan'] = none
STATE_DIR = ".prepare"  # per-shard reports; kept beside the shards so a re-run knows what is complete
CRASH_ENV = "MEDBLIP_PREPARE_CRASH_AFTER"  # test hook: a writer process dies after writing this many samples
LISTED_KEYS_CAP = 1000  # at most this many keys listed per filter reason in the manifest (all are counted)
DEFAULT_SAMPLES_PER_SHARD = 1000
MIN_SHARDS = 8  # the default shard size leaves small inputs this many shards: 2 ranks x 2 workers, twice over

# ROCOv2's manually curated modality concepts (UMLS CUIs). Every ROCOv2 image carries exactly one of them;
# the same six are the modality concepts of the ImageCLEFmedical 2023 concept-detection evaluation.
MODALITY_CUIS: dict[str, tuple[str, ...]] = {
    "CT": ("C0040405",),  # X-Ray Computed Tomography
    "MRI": ("C0024485",),  # Magnetic Resonance Imaging
    "X-ray": ("C1306645",),  # Plain x-ray (projection radiography)
    "ultrasound": ("C0041618",),  # Ultrasonography
    "angiography": ("C0002978",),  # Angiogram
    "PET": ("C0032743",),  # Positron-Emission Tomography
}
MODALITY_ALIASES = {
    "ct": "CT", "mri": "MRI", "mr": "MRI", "x-ray": "X-ray", "xray": "X-ray", "xr": "X-ray", "cr": "X-ray",
    "radiograph": "X-ray", "radiography": "X-ray", "ultrasound": "ultrasound", "us": "ultrasound",
    "ultrasonography": "ultrasound", "angiography": "angiography", "angio": "angiography",
    "angiogram": "angiography", "pet": "PET",
}
_CUI_TO_MODALITY = {cui: name for name, cuis in MODALITY_CUIS.items() for cui in cuis}
# For samples whose concepts name no modality (ROCO v1's cuis.txt, extracted from the captions, has one of the six
# for 2,315 of its 8,180 validation rows and never MRI; tables may have no concepts at all): the modality whose
# keyword comes first in the caption. Whole words, case-insensitive, except MR and US (not "Mr." or "us").
CAPTION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "CT": (r"ct", r"cta", r"hrct", r"mdct", r"cbct", r"computed tomograph\w*", r"computeri[sz]ed tomograph\w*",
           r"cat scan"),
    "MRI": (r"mri", r"(?-i:MR)", r"mra", r"mrcp", r"fmri", r"magnetic resonance", r"t1", r"t2", r"t1w", r"t2w",
            r"t[12][- ]weighted", r"flair", r"dwi", r"diffusion[- ]weighted"),
    "X-ray": (r"x-?rays?", r"x ray", r"radiograph\w*", r"cxr", r"plain films?", r"roentgenogra\w*"),
    "ultrasound": (r"ultrasound\w*", r"ultrasonogra\w*", r"sonogra\w*", r"(?-i:US)", r"echocardiogra\w*",
                   r"doppler"),
    "angiography": (r"angiogra\w*", r"arteriogra\w*", r"venogra\w*", r"dsa"),
    "PET": (r"pet", r"positron emission", r"fdg"),
}
_KEYWORD_RES = {name: re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)
                for name, words in CAPTION_KEYWORDS.items()}
_KEEP_MODES = ("L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "YCbCr")  # 8-bit images every reader decodes alike
_CUI_RE = re.compile(r"^C\d{7}$")
# What the Hugging Face copy of ROCOv2 (and pandas-written tables) put where an image has no manual concept: the
# string 'nan' (about 1% of its rows carry cui ['nan']). Not a concept: such an image is judged by its caption.
NO_CONCEPT = frozenset({"NAN", "NONE", "NULL", "NA", "N/A", ""})
# PNGs within --max-side with at most this many colours (diagrams, line art, annotated drawings) stay PNG: JPEG
# blurs their edges and seldom saves bytes. Radiographs and photographs use far more (an 8-bit CT: ~200 grey levels).
PNG_FEW_COLOURS = 64
_SHARD_NAME = re.compile(r"^(train|valid|test|all)-\d{5}\.tar$")  # the names prepare() gives its shards
_SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"),
                  "test": ("test",)}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "image_path", "path", "img", "image_file")
_CAPTION_COLUMNS = ("caption", "text", "captions", "report")


class PrepareError(ValueError):
    """Bad input for preparation (missing path, nothing matched, unknown option value); one line."""


# ----------------------------------------------------------------------------- options and records


@dataclass
class PrepareOptions:
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


def resolve_modalities(names: Iterable[str]) -> dict[str, str]:
    """Modality names / raw CUIs -> {CUI: modality name}; unknown names fail listing the known ones."""
    selected: dict[str, str] = {}
    for raw in names:
        for item in str(raw).split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() in ("all", "radiology"):
                selected.update(_CUI_TO_MODALITY)
            elif _CUI_RE.match(item.upper()):
                selected[item.upper()] = _CUI_TO_MODALITY.get(item.upper(), item.upper())
            elif item.lower() in MODALITY_ALIASES:
                name = MODALITY_ALIASES[item.lower()]
                selected.update({c: name for c in MODALITY_CUIS[name]})
            else:
                known = ", ".join(MODALITY_CUIS)
                raise PrepareError(f"--modality {item!r}: unknown modality (known: {known}, all, or a UMLS CUI "
                                   "like C0040405)")
    return selected


def modality_of(cuis: Iterable[str]) -> Optional[str]:
    """The first modality concept among an image's CUIs (ROCOv2 has one per image), or None."""
    for c in cuis:
        if c in _CUI_TO_MODALITY:
            return _CUI_TO_MODALITY[c]
    return None


def caption_modality(caption: str) -> Optional[str]:
    """The modality whose CAPTION_KEYWORDS word comes first in the caption, or None."""
    hits = [(m.start(), name) for name, rx in _KEYWORD_RES.items() if (m := rx.search(caption))]
    return min(hits)[1] if hits else None


def decide_modality(cuis: Iterable[str], caption: str) -> tuple[Optional[str], Optional[str]]:
    """(modality, source): the sample's modality concept (source "cui"), else its caption's first modality
    keyword ("caption"), else (None, None)."""
    name = modality_of(cuis)
    if name:
        return name, "cui"
    name = caption_modality(caption)
    return (name, "caption") if name else (None, None)


def _split_cuis(text: Any) -> tuple[str, ...]:
    """A cell of concepts (a list, or text with ; , or spaces) -> upper-case CUIs; 'nan' placeholders dropped."""
    if text is None:
        return ()
    if isinstance(text, float) and text != text:  # a float NaN (pandas' empty cell)
        return ()
    if isinstance(text, (list, tuple)):
        cuis = (str(c).strip().upper() for c in text if c is not None)
    else:
        cuis = (c.strip().upper() for c in re.split(r"[;,\s]+", str(text)))
    return tuple(c for c in cuis if c not in NO_CONCEPT)


def _is_placeholder(text: Any) -> bool:
    """True for a concept cell that holds only 'nan'-like placeholders (the image has no manual concept)."""
    if text is None:
        return False
    if isinstance(text, float):
        return text != text
    items = [str(c).strip() for c in text] if isinstance(text, (list, tuple)) else re.split(r"[;,\s]+", str(text))
    return any(c.strip() for c in items) and not _split_cuis(text)


# ----------------------------------------------------------------------------- listing each layout


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
                cuis = _split_cuis(data["cui"][i]) if "cui" in data else ()
                key = sanitize_key(str(image_id))
                if "cui" in data and _is_placeholder(data["cui"][i]):
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
        raise PrepareError(f"{path}: the row from line {reader.line_num + 1}: {e} (a caption over {csv.field_size_limit() // 1024} KiB is "
                           "usually an unbalanced quote \" that swallowed the lines after it; fix the file)") from None


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
                cuis.setdefault(row["id"].strip(), {}).update(dict.fromkeys(_split_cuis(row["cuis"])))
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
                cuis[parts[0].strip()] = tuple(c for p in parts[1:] for c in _split_cuis(p))
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
                                      _split_cuis(row.get(cui_col)) if cui_col else (),
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
    raw = sorted(c for c in selected if c not in _CUI_TO_MODALITY)
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


# ----------------------------------------------------------------------------- images


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / float greyscale (common in medical PNGs) -> 8-bit L, scaled by the image's own maximum."""
    import numpy as np

    arr = np.asarray(im, dtype=np.float32)
    top = float(arr.max()) if arr.size else 0.0
    arr = arr * (255.0 / top) if top > 255.0 else arr
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_stays(im: Image.Image) -> Optional[str]:
    """Why a decoded 8-bit PNG should stay PNG ("alpha", "few_colours"), or None for a photograph."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:  # transparency JPEG cannot hold
            return "alpha"
    if im.mode == "1" or im.getcolors(PNG_FEW_COLOURS) is not None:  # None: more colours than that
        return "few_colours"
    return None


def encode_image(data: bytes, max_side: int, quality: int,
                 keep_png: bool = False) -> tuple[bytes, str, bool, Optional[str]]:
    """Image bytes -> (bytes to store, "jpg"|"png", re-encoded?, what became of a PNG source or None).
    Raises for an undecodable image.

    8-bit JPEGs no larger than max_side are stored unchanged (after a full decode proves them readable). So are
    8-bit PNGs within max_side when keep_png, or when they have transparency ("alpha") or at most PNG_FEW_COLOURS
    colours ("few_colours"), or when their JPEG would not be smaller ("smaller"); other PNGs, photographs, are
    re-encoded once as JPEG at `quality` ("jpeg"). Everything else (larger, 16-bit, other formats) is decoded
    once, shrunk to max_side (bicubic) and saved as JPEG with fixed settings (a PNG: "resized" when it was larger
    than max_side, else "converted").
    """
    im = Image.open(io.BytesIO(data))
    fmt, (w, h) = im.format, im.size
    png = None if fmt != "PNG" else "resized" if max_side and max(w, h) > max_side else "converted"  # 16-bit
    if fmt in ("JPEG", "PNG") and im.mode in _KEEP_MODES and (not max_side or max(w, h) <= max_side):
        if fmt == "JPEG":  # a 1/8-scale decode still reads every scan, so truncation is still detected
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
        im.load()
        if fmt == "JPEG":
            return data, "jpg", False, None
        if keep_png:
            return data, "png", False, "keep_png"
        why = _png_stays(im)
        if why:
            return data, "png", False, why
        payload = _jpeg(im if im.mode in ("RGB", "L") else im.convert("RGB"), quality)
        if len(payload) >= len(data):  # e.g. a tiny or flat image that PNG already compresses well
            return data, "png", False, "smaller"
        return payload, "jpg", True, "jpeg"
    if fmt == "JPEG" and max_side:
        im.draft("RGB" if im.mode not in ("L",) else "L", (max_side, max_side))  # exact scale, never below max_side
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = _to_8bit(im)
    elif im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BICUBIC)
    return _jpeg(im, quality), "jpg", True, png


class _ImageSource:
    """Image bytes for a record: a file read, or one parquet row group at a time (never a whole file)."""

    def __init__(self, parquet_files: list[str]):
        self.parquet_files = parquet_files
        self.files: dict[int, tuple[Any, list[int]]] = {}
        self.group: Optional[tuple[int, int]] = None
        self.column: Any = None

    def read(self, rec: Record) -> bytes:
        if isinstance(rec.loc, str):
            with open(rec.loc, "rb") as f:
                return f.read()
        fi, row = rec.loc
        if fi not in self.files:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.parquet_files[fi])
            starts, n = [], 0
            for g in range(pf.num_row_groups):
                starts.append(n)
                n += pf.metadata.row_group(g).num_rows
            self.files[fi] = (pf, starts)
        pf, starts = self.files[fi]
        g = bisect.bisect_right(starts, row) - 1
        if self.group != (fi, g):
            self.column = pf.read_row_group(g, columns=["image"]).column("image").combine_chunks()
            self.group = (fi, g)
        value = self.column[row - starts[g]].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise ValueError("no image bytes in the parquet row")
        return data


# ----------------------------------------------------------------------------- shard writing


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


_written_in_process = 0  # samples written by this process (for the crash test hook)


def write_shard(task: ShardTask) -> dict:
    """Write one shard atomically and its report to .prepare/<name>.json; returns the report."""
    global _written_in_process
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    out = Path(task.out)
    source = _ImageSource(task.parquet_files)
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


# ----------------------------------------------------------------------------- the whole conversion


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


def is_prepared_name(name: str) -> bool:
    """A shard name prepare() gives: <split>-NNNNN.tar."""
    return _SHARD_NAME.match(name) is not None


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


def clean_out(out: Path, fp: str, planned: set[str], overwrite: bool,
              shard_name: Callable[[str], bool] = is_prepared_name) -> None:
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
    clean_out(out, fp, set(names), opts.overwrite)
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
    shards = [{"name": names[i], "samples": reports[i]["samples"], "bytes": reports[i]["bytes"],
               "sha256": reports[i]["sha256"]} for i in range(len(names)) if reports[i]["samples"]]
    unreadable = [u for i in range(len(names)) for u in reports[i]["unreadable"]]
    modalities: Counter = Counter()
    sources: Counter = Counter()
    by_caption: dict[str, str] = {}
    for i in range(len(names)):
        modalities.update(reports[i]["modalities"])
        sources.update(reports[i]["modality_sources"])
        by_caption.update(reports[i]["caption_modality"])
    filtered = {reason: {"count": len(keys), "keys": [k for k in keys if k][:LISTED_KEYS_CAP]}
                for reason, keys in sorted(listing.filtered.items())}
    filtered["unreadable_image"] = {"count": len(unreadable), "keys": [u["key"] for u in unreadable][:LISTED_KEYS_CAP]}
    selected = resolve_modalities(opts.modality)
    options = {k: v for k, v in asdict(opts).items() if k not in ("out", "workers", "overwrite")}
    png: Counter = Counter()
    for r in reports.values():
        png.update(r.get("png", {}))
    by_key: dict[str, list[Record]] = {}
    for r in listing.records:
        by_key.setdefault(r.key, []).append(r)
    same_id = [{"key": k, "rows": [r.source for r in rs], "same_caption": len({r.caption for r in rs}) == 1}
               for k, rs in by_key.items() if len(rs) > 1]
    by_hash: dict[str, list[str]] = {}
    for i in range(len(names)):
        for key, digest in reports[i].get("image_sha256", {}).items():
            by_hash.setdefault(digest, []).append(key)
    same_bytes = [keys for keys in by_hash.values() if len(keys) > 1]
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
                   "reencoded": sum(r["reencoded"] for r in reports.values()), "unreadable": len(unreadable)},
        "modalities": dict(sorted(modalities.items())),
        "modality_sources": dict(sorted(sources.items())),  # what decided each written sample's modality
        "caption_modality": by_caption,  # every written sample whose modality came from a caption keyword
        "filtered": filtered,
        "unreadable": unreadable[:LISTED_KEYS_CAP],
        # PNG sources: what became of them (jpeg | resized | few_colours | alpha | smaller | keep_png), bytes in/out
        "png": {"sources": sum(png.values()), "fate": dict(sorted(png.items())),
                "bytes_in": sum(r.get("png_bytes_in", 0) for r in reports.values()),
                "bytes_out": sum(r.get("png_bytes_out", 0) for r in reports.values())},
        # rows whose concepts were only a 'nan' placeholder (the hub copy's cui ['nan']): no concept, so the
        # caption keywords decided their modality (counted here by what they decided)
        "no_concept": {"count": len(no_concept), "modality_from_caption": dict(sorted(judged.items())),
                       "keys": no_concept[:LISTED_KEYS_CAP],
                       "listed": len(listing.no_concept)},
        # the hub copy's train split has 4 rows more than the release (59,962 vs 59,958); repeats show here: an image
        # id listed again (the later rows dropped, as filtered.duplicate_key) or one image under several ids (kept)
        "duplicates": {"same_image_id": {"count": sum(len(d["rows"]) - 1 for d in same_id),
                                         "ids": same_id[:LISTED_KEYS_CAP]},
                       "same_image_bytes": {"count": sum(len(g) - 1 for g in same_bytes),
                                            "groups": same_bytes[:LISTED_KEYS_CAP]}},
    }
