"""launch/prepare_rocov2.py + corpora/rocov2.py: every input layout -> shards that read back sample for
sample; modality filter; corrupt/empty inputs reported; interrupted and repeated runs give identical shards."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA, load_launch
from PIL import Image

from corpora.listings import PrepareOptions
from corpora.modalities import resolve_modalities
from corpora.rocov2 import CRASH_ENV, prepare
from corpora.shard_writer import PrepareError
from framework.shards import expand_shards, verify_checksums
from framework.streams import ShardStream
from recipes.common.image_text import ImageConfig, make_decode

cli_main = load_launch("prepare_rocov2").main
CT, MRI, XRAY, US = "C0040405", "C0024485", "C1306645", "C0041618"
OTHER = "C0817096"  # chest: not a modality


def _image(seed: int, size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _items() -> list[dict]:
    """Eight pairs: six good ones (one large, one greyscale PNG), a corrupt image, an empty caption."""
    good_jpeg = _image(99, (40, 30), "JPEG")
    return [
        {"id": "img_0", "ext": "jpg", "bytes": _image(0, (40, 30), "JPEG"), "caption": "Axial CT of the chest.",
         "cui": [CT, OTHER]},
        {"id": "img_1", "ext": "png", "bytes": _image(1, (32, 48), "PNG"), "caption": "MRI, T2: lesion (arrow)",
         "cui": [MRI]},
        {"id": "img_2", "ext": "jpg", "bytes": _image(2, (120, 90), "JPEG"), "caption": "Chest x-ray, PA view",
         "cui": [XRAY, OTHER]},  # larger than max_side 64: re-encoded
        {"id": "img_3", "ext": "png", "bytes": _image(3, (36, 36), "PNG", "L"), "caption": "Ultrasound of liver",
         "cui": [US]},
        {"id": "img_4", "ext": "jpg", "bytes": _image(4, (50, 40), "JPEG"), "caption": "  Héad CT — no bleed  ",
         "cui": [CT]},
        {"id": "img_5", "ext": "jpg", "bytes": _image(5, (30, 30), "JPEG"), "caption": "Unlabelled figure",
         "cui": [OTHER]},
        {"id": "img_6", "ext": "jpg", "bytes": good_jpeg[: len(good_jpeg) // 2], "caption": "Truncated file CT",
         "cui": [CT]},
        {"id": "img_7", "ext": "jpg", "bytes": _image(7, (30, 30), "JPEG"), "caption": "   ", "cui": [MRI]},
    ]


GOOD = ["img_0", "img_1", "img_2", "img_3", "img_4", "img_5"]


def write_parquet(root: Path, items: list[dict], split: str = "train", row_group_size: int = 3) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "image": [{"bytes": it["bytes"], "path": f"{it['id']}.{it['ext']}"} for it in items],
        "image_id": [it["id"] for it in items],
        "caption": [it["caption"] for it in items],
        "cui": [it["cui"] for it in items],
    })
    half = len(items) // 2  # two files, small row groups: shards span files and row groups
    pq.write_table(table.slice(0, half), root / f"{split}-00000-of-00002.parquet", row_group_size=row_group_size)
    pq.write_table(table.slice(half), root / f"{split}-00001-of-00002.parquet", row_group_size=row_group_size)
    return root


def write_rocov2(root: Path, items: list[dict]) -> Path:
    (root / "train").mkdir(parents=True)
    with open(root / "train_captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Caption"])
        for it in items:
            w.writerow([it["id"], it["caption"]])
            (root / "train" / f"{it['id']}.{it['ext']}").write_bytes(it["bytes"])
        w.writerow(["img_missing", "caption without an image"])
    with open(root / "train_concepts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "CUIs"])
        for it in items:
            w.writerow([it["id"], ";".join(it["cui"])])
    return root


def write_roco(root: Path, items: list[dict]) -> Path:
    d = root / "data" / "train" / "radiology"
    (d / "images").mkdir(parents=True)
    lines, cuis = [], []
    for it in items:
        (d / "images" / f"{it['id']}.{it['ext']}").write_bytes(it["bytes"])
        lines.append(f"{it['id']}\t {it['caption']}")
        cuis.append("\t".join([it["id"], *it["cui"]]))
    (d / "captions.txt").write_text("\n".join(lines) + "\n")
    (d / "cuis.txt").write_text("\n".join(cuis) + "\n")
    return root


def write_table(root: Path, items: list[dict], kind: str) -> Path:
    (root / "images").mkdir(parents=True)
    for it in items:
        (root / "images" / f"{it['id']}.{it['ext']}").write_bytes(it["bytes"])
    if kind == "csv":
        path = root / "pairs.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "caption", "cui"])
            for it in items:
                w.writerow([f"{it['id']}.{it['ext']}", it["caption"], ";".join(it["cui"])])
    else:
        path = root / "pairs.jsonl"
        path.write_text("".join(json.dumps({"image": f"{it['id']}.{it['ext']}", "caption": it["caption"],
                                            "cui": it["cui"]}) + "\n" for it in items))
    return path


def read_back(out: Path) -> dict[str, dict]:
    """All samples through the framework's ShardStream (raw bytes kept), keyed by __key__."""
    urls = expand_shards(str(out))

    def raw(sample: dict) -> dict:
        ext = "jpg" if "jpg" in sample else "png"
        return {"key": sample["__key__"], "ext": ext, "image": sample[ext], "txt": sample["txt"].decode(),
                "json": json.loads(sample["json"]), "sample": sample}

    stream = ShardStream(urls, raw, lambda xs: {"items": xs}, batch_size=1, shuffle_buffer=0)
    got = {}
    for batch in stream:
        for item in batch["items"]:
            assert item["key"] not in got, "duplicate sample"
            got[item["key"]] = item
    return got


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_round_trip(out: Path, items: list[dict], keys: list[str], max_side: int = 64) -> dict:
    got = read_back(out)
    assert sorted(got) == sorted(keys)
    decode = make_decode(ImageConfig(size=32, augment=False), train=False)
    by_id = {it["id"]: it for it in items}
    for key in keys:
        src, item = by_id[key], got[key]
        assert item["txt"] == src["caption"].strip()
        assert item["json"]["image_id"] == key and item["json"]["cui"] == [c.upper() for c in src["cui"]]
        orig = pixels(src["bytes"])
        back = pixels(item["image"])
        if max(orig.shape[:2]) <= max_side and src["ext"] == "png" and item["ext"] == "jpg":
            # a PNG of many colours (a photograph; here img_1's RGB noise) is re-encoded once as JPEG, same size
            assert item["image"] == png_as_jpeg(src["bytes"])
        elif max(orig.shape[:2]) <= max_side:  # stored unchanged
            assert item["image"] == src["bytes"]
            np.testing.assert_array_equal(back, orig)
            # the training pipeline's decode sees exactly the source image
            a = decode(item["sample"])["image"]
            b = decode({"__key__": key, src["ext"]: src["bytes"], "txt": src["caption"].encode()})["image"]
            assert torch_equal(a, b)
        else:  # re-encoded once: longer side = max_side, same picture
            assert max(back.shape[:2]) == max_side and item["ext"] == "jpg"
            small = np.asarray(Image.fromarray(orig).resize(back.shape[1::-1], Image.BICUBIC), dtype=float)
            assert np.abs(small - back).mean() < 20  # JPEG of noise: still far below unrelated images (~85)
    manifest = json.loads((out / "manifest.json").read_text())
    verify_checksums(expand_shards(str(out)))  # sizes and sha256 in the manifest match the files
    assert manifest["totals"]["samples"] == len(keys)
    return manifest


def png_as_jpeg(data: bytes, quality: int = 90) -> bytes:
    """What the default stores for a PNG photograph: the decoded image saved once as JPEG at `quality`."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def opts(inp: Path, out: Path, **kw) -> PrepareOptions:
    kw.setdefault("max_side", 64)
    kw.setdefault("samples_per_shard", 3)
    return PrepareOptions(input=str(inp), out=str(out), **kw)


LAYOUTS = {
    "parquet": lambda root, items: write_parquet(root / "hub" / "data", items).parent,
    "rocov2": lambda root, items: write_rocov2(root / "rocov2", items),
    "roco": lambda root, items: write_roco(root / "roco", items),
    "csv": lambda root, items: write_table(root / "table", items, "csv"),
    "jsonl": lambda root, items: write_table(root / "table", items, "jsonl"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_round_trips(tmp_path: Path, layout: str) -> None:
    items = _items()
    inp = LAYOUTS[layout](tmp_path, items)
    split = "all" if layout in ("csv", "jsonl") else "train"
    manifest = prepare(opts(inp, tmp_path / "out", split=split), log=lambda s: None)
    m = check_round_trip(tmp_path / "out", items, GOOD)
    assert m == manifest
    assert m["filtered"]["empty_caption"]["keys"] == ["img_7"]
    assert [u["key"] for u in m["unreadable"]] == ["img_6"] and "truncated" in m["unreadable"][0]["error"]
    assert m["filtered"]["unreadable_image"]["count"] == 1
    assert m["totals"]["reencoded"] == 2  # img_2 (larger than max_side) and img_1 (an RGB PNG photograph)
    assert m["png"]["fate"] == {"jpeg": 1, "smaller": 1}  # img_3's grey PNG is smaller than its JPEG: kept
    # 7 planned, 3 per shard: the third holds only the unreadable img_6, so no third file is written
    assert [(s["name"], s["samples"]) for s in m["shards"]] == [("train-00000.tar", 3), ("train-00001.tar", 3)] \
        or layout in ("csv", "jsonl")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [s["name"] for s in m["shards"]]
    assert [s["samples"] for s in m["shards"]] == [3, 3]
    assert m["modalities"] == {"CT": 2, "MRI": 1, "X-ray": 1, "none": 1, "ultrasound": 1}
    if layout == "rocov2":
        assert m["filtered"]["missing_image"]["keys"] == ["img_missing"]


@pytest.mark.parametrize("modality,expected", [
    (["CT"], ["img_0", "img_4"]),
    (["mri", "X-ray"], ["img_1", "img_2"]),
    (["CT,ultrasound"], ["img_0", "img_3", "img_4"]),
    ([XRAY.lower()], ["img_2"]),  # a raw CUI
    (["all"], ["img_0", "img_1", "img_2", "img_3", "img_4"]),  # img_5 has no modality concept
])
def test_modality_filter_keeps_exactly(tmp_path: Path, modality: list[str], expected: list[str]) -> None:
    items = _items()
    inp = write_parquet(tmp_path / "pq", items)
    m = prepare(opts(inp, tmp_path / "out", modality=modality), log=lambda s: None)
    assert sorted(read_back(tmp_path / "out")) == expected
    selected = set(resolve_modalities(modality))
    dropped = [it["id"] for it in items if it["caption"].strip() and not selected & set(it["cui"])]
    assert sorted(m["filtered"]["modality"]["keys"]) == dropped  # img_7 (empty caption) counts there instead
    assert set(m["modality_filter"]) == selected


def _tree(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_rocov2.py"), *args],
                          capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_finishes_identically(tmp_path: Path, workers: int) -> None:
    items = _items()
    inp = write_parquet(tmp_path / "pq", items)
    args = ["--input", str(inp), "--max-side", "64", "--samples-per-shard", "2", "--workers", str(workers)]
    ref = _run_cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    crashed = _run_cli(*args, "--out", str(out), env={CRASH_ENV: "3"})  # a writer dies mid-shard
    assert crashed.returncode != 0
    assert list(out.glob("*.tmp")), "the killed writer should leave a partial .tmp shard"
    assert not (out / "manifest.json").exists()
    partial = _tree(out)
    assert 1 <= len(partial) < len(_tree(tmp_path / "ref"))
    again = _run_cli(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr
    assert not list(out.glob("*.tmp")) and not list((out / ".prepare").glob("*.tmp"))
    assert _tree(out) == _tree(tmp_path / "ref")  # byte-identical shards, none duplicated or truncated
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
    check_round_trip(out, items, GOOD)


def test_rerun_is_idempotent_and_other_options_refused(tmp_path: Path) -> None:
    items = _items()
    inp = write_parquet(tmp_path / "pq", items)
    out = tmp_path / "out"
    first = prepare(opts(inp, out), log=lambda s: None)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs: list[str] = []
    assert prepare(opts(inp, out, workers=2), log=logs.append) == first  # workers do not change the output
    assert any("up to date" in s for s in logs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare(opts(inp, out, samples_per_shard=4), log=lambda s: None)
    second = prepare(opts(inp, out, samples_per_shard=4, overwrite=True), log=lambda s: None)
    assert [s["samples"] for s in second["shards"]] == [4, 2]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-00000.tar", "train-00001.tar"]


@pytest.mark.parametrize("make_args,needle", [
    (lambda t: ["--input", str(t / "nope")], "input not found"),
    (lambda t: ["--input", str(write_parquet(t / "pq", _items())), "--modality", "PETCT"], "unknown modality"),
    (lambda t: ["--input", str(write_parquet(t / "pq", _items())), "--split", "test"], "no parquet files for split"),
    (lambda t: ["--input", str(write_parquet(t / "pq", _items())), "--split", "holdout"], "--split"),
    (lambda t: ["--input", str(_empty_rocov2(t))], "no images matched"),
    (lambda t: ["--input", str(write_table(t / "tb", _items(), "csv")), "--split", "train"], "split column"),
    (lambda t: ["--input", str(write_table(t / "tb", _items(), "csv")), "--split", "all",
                "--caption-column", "text"], "no column 'text'"),
    (lambda t: ["--input", str(_no_cui_table(t)), "--split", "all", "--modality", OTHER], "needs UMLS concepts"),
    (lambda t: ["--input", str(_no_cui_table(t)), "--split", "all", "--modality", "CT"], "no samples left"),
])
def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, make_args, needle: str) -> None:
    rc = cli_main([*make_args(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def _empty_rocov2(t: Path) -> Path:
    root = write_rocov2(t / "r", _items())
    for p in (root / "train").iterdir():
        p.unlink()
    return root


def _no_cui_table(t: Path) -> Path:
    (t / "nc" / "images").mkdir(parents=True)
    (t / "nc" / "images" / "a.jpg").write_bytes(_image(0, (8, 8), "JPEG"))
    (t / "nc" / "p.csv").write_text("image,caption\na.jpg,hello\n")
    return t / "nc" / "p.csv"


def test_medpix_sample_converts(tmp_path: Path) -> None:
    csv_path = SHARED_DATA / "medpix2_sample" / "sample_captions.csv"
    if not csv_path.is_file():
        pytest.skip("../shared/data/medpix2_sample is not present")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    out = tmp_path / "medpix"
    m = prepare(PrepareOptions(input=str(csv_path), out=str(out), split="all", samples_per_shard=100, workers=2),
                log=lambda s: None)
    assert m["totals"]["samples"] == len(rows) == 607 and m["totals"]["unreadable"] == 0
    got = read_back(out)
    assert len(got) == 607
    for row in rows:
        assert got[Path(row["file_name"]).stem]["txt"] == row["caption"].strip()
    for row in rows[::60]:  # a spread of images: unchanged, PNG photographs as JPEG, or shrunk to --max-side 512
        data = (csv_path.parent / "images" / row["file_name"]).read_bytes()
        src, item = pixels(data), got[Path(row["file_name"]).stem]
        back = pixels(item["image"])
        if max(src.shape[:2]) <= 512 and data[:4] == b"\x89PNG" and item["ext"] == "jpg":
            assert item["image"] == png_as_jpeg(data)
            assert np.abs(back.astype(float) - src).mean() < 3  # the same picture
        elif max(src.shape[:2]) <= 512:
            np.testing.assert_array_equal(back, src)
        else:
            assert max(back.shape[:2]) == 512


# ----------------------------------------------------------------------------- ROCO v1: caption-keyword modality

from corpora.modalities import caption_modality  # noqa: E402


@pytest.mark.parametrize("caption,expected", [
    ("Axial T2-weighted image of the brain", "MRI"),
    ("T2 hyperintense lesion (arrow)", "MRI"),
    ("FLAIR sequence shows oedema", "MRI"),
    ("MR angiography of the circle of Willis", "MRI"),  # the first modality named decides
    ("CT angiography of the aorta", "CT"),
    ("Coronary angiogram, right anterior oblique view", "angiography"),
    ("Fused PET/CT, FDG avid node", "PET"),
    ("US-guided biopsy of the thyroid", "ultrasound"),
    ("Transthoracic echocardiography: severe MR", "ultrasound"),  # MR here is mitral regurgitation, named later
    ("Chest X-ray, PA view", "X-ray"),
    ("Postoperative radiographs of the knee", "X-ray"),
    ("Computerized tomography of the chest", "CT"),
    ("Mr. Smith was referred to us after the fall", None),  # neither "Mr." nor "us" names a modality
    ("Fracture of the T12 vertebra, intact cortex", None),  # T12 is not T1/T2; "intact" holds no "ct"
    ("Acute spectrum of findings; pet owner", "PET"),  # whole-word rule: "pet" counts, "acute"/"spectrum" do not
    ("Histology, haematoxylin and eosin", None),
])
def test_caption_keywords_by_hand(caption, expected):
    assert caption_modality(caption) == expected


ROCO_ITEMS = [  # ROCO v1: cuis.txt (QuickUMLS on the caption) rarely holds a modality concept, never MRI's
    ("ROCO_00001", "Axial T2-weighted MRI of the brain showing a lesion", [OTHER]),
    ("ROCO_00002", "Sagittal MR image of the lumbar spine", []),
    ("ROCO_00003", "Computed tomography of the chest with contrast", [OTHER]),
    ("ROCO_00004", "Chest radiograph, PA view", [XRAY]),  # decided by its concept
    ("ROCO_00005", "Follow-up MRI after the CT-guided biopsy", [CT]),  # the concept wins over the caption
    ("ROCO_00006", "Intraoperative photograph of the wound", []),  # no modality at all
]


def write_roco_v1(root: Path, split: str = "validation", pmc_names: bool = False, dlinks: bool = True) -> Path:
    """ROCO's release layout <split>/radiology/{captions,cuis,dlinks}.txt + images/ (ROCO ids or PMC names)."""
    d = root / "data" / split / "radiology"
    (d / "images").mkdir(parents=True)
    caps, cuis, links = [], [], []
    for n, (rid, caption, cui) in enumerate(ROCO_ITEMS):
        pmc, fig = f"PMC{1000 + n}", f"fig{n}.jpg"
        name = f"{pmc}_{fig}" if pmc_names else f"{rid}.jpg"
        (d / "images" / name).write_bytes(_image(n, (24, 20), "JPEG"))
        caps.append(f"{rid}\t {caption}")
        cuis.append("\t".join([rid, "", *cui]))  # the release has an empty field after the id
        links.append(f"{rid}\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/00/00/{pmc}.tar.gz "
                     f"-P /path/to/Dir\t{fig}")
    (d / "captions.txt").write_text("\n".join(caps) + "\n")
    (d / "cuis.txt").write_text("\n".join(cuis) + "\n")
    if dlinks:
        (d / "dlinks.txt").write_text("\n".join(links) + "\n")
    return root / "data"


@pytest.mark.parametrize("modality,kept", [
    (["MRI"], {"ROCO_00001": "caption", "ROCO_00002": "caption"}),
    (["CT"], {"ROCO_00003": "caption", "ROCO_00005": "cui"}),
    (["X-ray"], {"ROCO_00004": "cui"}),
    ([], {"ROCO_00001": "caption", "ROCO_00002": "caption", "ROCO_00003": "caption", "ROCO_00004": "cui",
          "ROCO_00005": "cui", "ROCO_00006": None}),
])
def test_roco_modality_from_concepts_else_caption_keywords(tmp_path, modality, kept):
    inp = write_roco_v1(tmp_path / "roco")
    m = prepare(opts(inp, tmp_path / "out", split="valid", modality=modality), log=lambda s: None)
    got = read_back(tmp_path / "out")
    assert {k: v["json"]["modality_source"] for k, v in got.items()} == kept
    by_caption = {k: v["json"]["modality"] for k, v in got.items() if v["json"]["modality_source"] == "caption"}
    assert m["caption_modality"] == by_caption  # the manifest names every sample a caption keyword decided
    assert sum(m["modality_sources"].values()) == len(kept)
    assert m["modality_sources"].get("cui", 0) == sum(v == "cui" for v in kept.values())


@pytest.mark.parametrize("where", ["data", "data/validation", "data/validation/radiology"])
def test_roco_input_may_be_the_release_the_split_or_the_radiology_folder(tmp_path, where):
    write_roco_v1(tmp_path / "roco")
    prepare(opts(tmp_path / "roco" / where, tmp_path / "out", split="valid"), log=lambda s: None)
    assert len(read_back(tmp_path / "out")) == 6


def test_roco_split_folder_of_another_split_says_which(tmp_path):
    write_roco_v1(tmp_path / "roco")
    with pytest.raises(PrepareError, match="is ROCO's 'validation' split, not 'train': pass --split validation"):
        prepare(opts(tmp_path / "roco" / "data" / "validation" / "radiology", tmp_path / "out"), log=lambda s: None)


def test_roco_pmc_image_names_match_through_dlinks(tmp_path):
    inp = write_roco_v1(tmp_path / "roco", pmc_names=True)  # fetch.py before 2022: <PMC id>_<figure>.jpg
    prepare(opts(inp, tmp_path / "out", split="valid"), log=lambda s: None)
    got = read_back(tmp_path / "out")
    assert sorted(got) == [r[0] for r in ROCO_ITEMS]
    assert got["ROCO_00003"]["image"] == (inp / "validation/radiology/images/PMC1002_fig2.jpg").read_bytes()


def test_roco_unmatched_image_names_say_what_was_expected_and_found(tmp_path):
    inp = write_roco_v1(tmp_path / "roco", pmc_names=True, dlinks=False)
    with pytest.raises(PrepareError) as e:
        prepare(opts(inp, tmp_path / "out", split="valid"), log=lambda s: None)
    msg = str(e.value)
    assert msg.startswith("no images matched") and "6 captions without an image file" in msg
    assert "looked for e.g. " in msg and "images/ROCO_00001.jpg" in msg and "found e.g. PMC1000_fig0.jpg" in msg
    assert "dlinks.txt" in msg


# ----------------------------------------------------------------------------- --out: where shards may go


def _table_input(t: Path) -> Path:
    return write_table(t / "table", _items(), "csv")


@pytest.mark.parametrize("out", ["roco/data", "roco/data/shards", "roco/data/validation/radiology/images/x"])
def test_out_inside_the_input_is_refused(tmp_path, capsys, out):
    inp = write_roco_v1(tmp_path / "roco")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = cli_main(["--input", str(inp), "--split", "valid", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is inside the input folder" in err[0] and "choose an --out" in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_out_beside_a_table_or_among_its_images_is_refused(tmp_path):
    table = _table_input(tmp_path)
    for out in (table.parent, table.parent / "images" / "shards"):
        with pytest.raises(PrepareError, match="would be written into the data"):
            prepare(opts(table, out, split="all"), log=lambda s: None)
    prepare(opts(table, tmp_path / "elsewhere", split="all"), log=lambda s: None)  # outside: fine


def test_second_conversion_into_the_same_out_is_refused_while_one_runs(tmp_path):
    import fcntl

    table, out = _table_input(tmp_path), tmp_path / "out"
    prepare(opts(table, out, split="all"), log=lambda s: None)
    with open(out / ".prepare" / "lock", "a") as f:  # what a running conversion holds
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PrepareError, match="another conversion is writing into"):
            prepare(opts(table, out, split="all", samples_per_shard=2, overwrite=True), log=lambda s: None)
    assert [s["samples"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [3, 3]  # untouched


def _in_mount_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` (sh) as root of a private mount namespace, where it can mount a tmpfs; skip where impossible."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a read-only or full filesystem")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)


def test_read_only_out_is_one_line(tmp_path):
    table, mnt = _table_input(tmp_path), tmp_path / "ro"
    mnt.mkdir()
    cli = f"{sys.executable} {ROOT / 'launch' / 'prepare_rocov2.py'} --input {table} --split all --workers 1"
    r = _in_mount_namespace(f"mount -t tmpfs -o ro tmpfs {mnt} && {cli} --out {mnt}/shards; echo rc=$?", tmp_path)
    err = r.stderr.strip().splitlines()
    assert "rc=2" in r.stdout and len(err) == 1, r.stderr
    assert err[0].startswith(f"error: --out {mnt}/shards: cannot write in {mnt} (read-only"), err


def test_full_disk_is_one_line_and_leaves_no_partial_shard(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    big = tmp_path / "big"  # a table whose images do not fit into a 256 KiB filesystem
    (big / "images").mkdir(parents=True)
    rows = []
    for i in range(8):
        (big / "images" / f"b{i}.png").write_bytes(_image(i, (200, 200), "PNG"))
        rows.append(f"b{i}.png,caption {i}")
    (big / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    cli = f"{sys.executable} {ROOT / 'launch' / 'prepare_rocov2.py'} --input {big / 'pairs.csv'} --split all " \
          f"--max-side 0 --samples-per-shard 2 --workers 1"
    r = _in_mount_namespace(f"mount -t tmpfs -o size=256k tmpfs {mnt} && {cli} --out {mnt}/shards; echo rc=$?; "
                            f"ls -a {mnt}/shards", tmp_path)
    err = [line for line in r.stderr.strip().splitlines() if not line.startswith("prepare: ")]
    assert "rc=2" in r.stdout and len(err) == 1, r.stderr
    assert err[0].startswith(f"error: writing into --out {mnt}/shards failed: No space left on device"), err
    assert "re-run the same command (finished shards are kept)" in err[0]
    listed = r.stdout.split()
    assert not [n for n in listed if n.endswith(".tmp")] and "manifest.json" not in listed, r.stdout


def test_default_shard_size_leaves_small_inputs_eight_shards(tmp_path):
    (tmp_path / "t" / "images").mkdir(parents=True)
    rows = []
    for i in range(20):
        (tmp_path / "t" / "images" / f"a{i}.jpg").write_bytes(_image(i, (8, 8), "JPEG"))
        rows.append(f"a{i}.jpg,caption {i}")
    (tmp_path / "t" / "p.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    m = prepare(PrepareOptions(input=str(tmp_path / "t" / "p.csv"), out=str(tmp_path / "o"), split="all"),
                log=lambda s: None)
    assert [s["samples"] for s in m["shards"]] == [2] * 10  # 20 // 8 = 2 per shard: 10 shards, not 1 of 1000
    assert m["options"]["samples_per_shard"] == 2


def test_files_no_conversion_wrote_are_never_deleted(tmp_path):
    table, out = _table_input(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp").write_text("mine")
    (out / "backup.tar").write_bytes(b"mine too")
    for overwrite in (False, True):
        with pytest.raises(PrepareError, match="holds backup.tar, which no conversion wrote"):
            prepare(opts(table, out, split="all", overwrite=overwrite), log=lambda s: None)
    assert sorted(p.name for p in out.iterdir() if p.name != ".prepare") == ["backup.tar", "notes.tmp"]
    (out / "backup.tar").unlink()
    prepare(opts(table, out, split="all"), log=lambda s: None)
    assert (out / "notes.tmp").read_text() == "mine"  # only a conversion's own .tmp files are cleaned up


@pytest.mark.parametrize("extra,needle", [
    (["--limit", "-1"], "--limit and --workers must be >= 1"),
    (["--workers", "0"], "--limit and --workers must be >= 1"),
])
def test_counts_below_one_are_refused(tmp_path, capsys, extra, needle):
    rc = cli_main(["--input", str(_table_input(tmp_path)), "--split", "all", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_jsonl_lines_that_are_not_objects_are_named(tmp_path):
    path = tmp_path / "t" / "pairs.jsonl"
    (tmp_path / "t" / "images").mkdir(parents=True)
    path.write_text('{"image": "a.jpg", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(PrepareError, match=r"pairs.jsonl:2: expected one JSON object per line"):
        prepare(opts(path, tmp_path / "o", split="all"), log=lambda s: None)
