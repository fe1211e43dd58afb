"""ROCOv2's Hugging Face copy (eltorio/ROCOv2-radiology) as it is: cui ['nan'] rows have no concept, its PNG
photographs become JPEG by default (--keep-png keeps them), and repeated rows are noted in the manifest. On small
parquet files written here, in the copy's schema (image {bytes, path}, image_id, caption, cui list)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from corpora.listings import PrepareOptions
from corpora.rocov2 import prepare
from tests.test_prepare import CT, MRI, cli_main, pixels, read_back, write_parquet


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _scan(seed: int, size: int = 96, mode: str = "L") -> Image.Image:
    """A CT-like slice: a smooth bright ellipse with texture on black (many grey levels, as a radiograph has)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    body = ((x / 0.42) ** 2 + (y / 0.33) ** 2 < 1).astype(float)
    texture = np.clip(120 + 60 * np.sin(9 * x + 5 * y) + rng.normal(0, 8, (size, size)), 0, 255)
    return Image.fromarray((body * texture).astype(np.uint8), "L").convert(mode)


def _line_art(size: int = 96) -> Image.Image:
    """A diagram: black lines and a red arrow on white, a few colours."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((10, 10, 80, 60), outline="black", width=2)
    d.line((20, 80, 70, 20), fill="red", width=3)
    return img


def _transparent(size: int = 64) -> Image.Image:
    img = _scan(7, size, "RGBA")
    img.putalpha(Image.fromarray(np.where(np.arange(size)[None, :].repeat(size, 0) < size // 2, 0, 255)
                                 .astype(np.uint8)))
    return img


def _hub(root: Path, rows: list[dict]) -> Path:
    """Rows in the hub copy's schema (every row has a cui list; ext for the image's path)."""
    return write_parquet(root, [{"ext": r.get("ext", "png"), **r} for r in rows], row_group_size=2)


def _opts(inp: Path, out: Path, **kw) -> PrepareOptions:
    return PrepareOptions(input=str(inp), out=str(out), max_side=512, samples_per_shard=2, **kw)


def test_cui_nan_is_no_concept_and_the_caption_decides(tmp_path: Path) -> None:
    rows = [{"id": "ROCOv2_2023_train_000001", "ext": "jpg", "bytes": _jpeg(1), "caption": "Axial CT of the abdomen",
             "cui": [CT]},
            {"id": "ROCOv2_2023_train_000002", "ext": "jpg", "bytes": _jpeg(2),
             "caption": "Contrast-enhanced computed tomography showing a mass", "cui": ["nan"]},
            {"id": "ROCOv2_2023_train_000003", "ext": "jpg", "bytes": _jpeg(3), "caption": "Figure 2", "cui": ["nan"]},
            {"id": "ROCOv2_2023_train_000004", "ext": "jpg", "bytes": _jpeg(4), "caption": "T2 MRI", "cui": [MRI]}]
    inp = _hub(tmp_path / "hub" / "data", rows)
    m = prepare(_opts(inp, tmp_path / "out"), log=lambda s: None)
    got = read_back(tmp_path / "out")
    meta = {k: got[k]["json"] for k in got}
    assert meta["ROCOv2_2023_train_000002"]["cui"] == [] and meta["ROCOv2_2023_train_000003"]["cui"] == []
    assert (meta["ROCOv2_2023_train_000002"]["modality"], meta["ROCOv2_2023_train_000002"]["modality_source"]) \
        == ("CT", "caption")
    assert meta["ROCOv2_2023_train_000003"]["modality"] is None
    assert not any("NAN" in v["cui"] for v in meta.values())
    assert m["no_concept"]["count"] == 2 and m["no_concept"]["keys"] == ["ROCOv2_2023_train_000002",
                                                                          "ROCOv2_2023_train_000003"]
    assert m["no_concept"]["modality_from_caption"] == {"CT": 1, "none": 1}
    assert m["modality_sources"] == {"caption": 1, "cui": 2, "none": 1}
    # a modality filter keeps the nan row its caption names, as it keeps any row without a modality concept
    ct = prepare(_opts(inp, tmp_path / "ct", modality=["CT"]), log=lambda s: None)
    assert sorted(read_back(tmp_path / "ct")) == ["ROCOv2_2023_train_000001", "ROCOv2_2023_train_000002"]
    assert ct["filtered"]["modality"]["keys"] == ["ROCOv2_2023_train_000003", "ROCOv2_2023_train_000004"]


def test_png_photographs_become_jpeg_and_line_art_stays_png(tmp_path: Path, capsys) -> None:
    scans = {f"scan_{i}": _png(_scan(i, 192, "RGB" if i % 2 else "L")) for i in range(4)}  # RGB-saved and grey
    rows = [{"id": k, "bytes": v, "caption": f"CT slice {k}", "cui": [CT]} for k, v in scans.items()]
    rows += [{"id": "diagram", "bytes": _png(_line_art()), "caption": "Schematic of the approach", "cui": ["nan"]},
             {"id": "overlay", "bytes": _png(_transparent()), "caption": "CT overlay", "cui": [CT]},
             {"id": "photo_jpg", "ext": "jpg", "bytes": _jpeg(9), "caption": "CT", "cui": [CT]},
             {"id": "scan16", "bytes": _png(Image.fromarray(np.asarray(_scan(8), dtype=np.uint16) * 200)),
              "caption": "CT, 16-bit", "cui": [CT]}]
    inp = _hub(tmp_path / "hub" / "data", rows)
    assert cli_main(["--input", str(inp), "--out", str(tmp_path / "out"), "--samples-per-shard", "2",
                     "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "7 PNG images" in err and "4 photographs re-encoded as JPEG (quality 90)" in err and "--keep-png" in err
    assert "1 16-bit or other modes converted to JPEG" in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    got = read_back(tmp_path / "out")
    src = {r["id"]: r["bytes"] for r in rows}
    for k in scans:  # same picture, JPEG, at most a few grey levels off on average
        assert got[k]["ext"] == "jpg" and got[k]["image"][:2] == b"\xff\xd8"
        assert np.abs(pixels(got[k]["image"]).astype(float) - pixels(src[k])).mean() < 4
    for k in ("diagram", "overlay", "photo_jpg"):  # line art, transparency and JPEGs are stored as they came
        assert got[k]["image"] == src[k]
    assert m["png"]["fate"] == {"alpha": 1, "converted": 1, "few_colours": 1, "jpeg": 4}
    assert got["scan16"]["ext"] == "jpg"  # 16-bit: 8-bit JPEG, as before
    png_in = sum(len(src[k]) for k in (*scans, "diagram", "overlay", "scan16"))
    assert m["png"]["bytes_in"] == png_in
    assert m["png"]["bytes_out"] == png_in - sum(len(src[k]) - len(got[k]["image"]) for k in (*scans, "scan16"))
    assert sum(len(got[k]["image"]) for k in scans) < 0.7 * sum(len(src[k]) for k in scans)  # measured: 0.53
    assert m["totals"]["reencoded"] == 5

    # --keep-png: every PNG byte for byte; the shards are larger
    assert cli_main(["--input", str(inp), "--out", str(tmp_path / "keep"), "--samples-per-shard", "2",
                     "--workers", "1", "--keep-png"]) == 0
    assert "stored as they are (--keep-png), except 1 larger than --max-side or 16-bit" in capsys.readouterr().err
    kept = read_back(tmp_path / "keep")
    assert all(kept[r["id"]]["image"] == r["bytes"] for r in rows if r["id"] != "scan16")
    k = json.loads((tmp_path / "keep" / "manifest.json").read_text())
    assert k["png"]["fate"] == {"converted": 1, "keep_png": 6} and k["totals"]["reencoded"] == 1
    assert k["totals"]["bytes"] > m["totals"]["bytes"]


def test_repeated_rows_are_noted_in_the_manifest(tmp_path: Path, capsys) -> None:
    same = _jpeg(5)
    rows = [{"id": "a", "ext": "jpg", "bytes": same, "caption": "CT head", "cui": [CT]},
            {"id": "b", "ext": "jpg", "bytes": _jpeg(6), "caption": "CT chest", "cui": [CT]},
            {"id": "c", "ext": "jpg", "bytes": same, "caption": "CT head, again", "cui": [CT]},  # a's image
            {"id": "b", "ext": "jpg", "bytes": _jpeg(7), "caption": "CT chest", "cui": [CT]},  # b's id again
            {"id": "d", "ext": "jpg", "bytes": _jpeg(8), "caption": "MRI knee", "cui": [MRI]}]
    inp = _hub(tmp_path / "hub" / "data", rows)
    assert cli_main(["--input", str(inp), "--out", str(tmp_path / "out"), "--samples-per-shard", "2",
                     "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "1 rows repeat an earlier image id" in err and "1 samples have the image bytes of another" in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(read_back(tmp_path / "out")) == ["a", "b", "c", "d"]
    assert m["filtered"]["duplicate_key"]["keys"] == ["b"]
    dup = m["duplicates"]
    assert dup["same_image_id"]["count"] == 1
    assert dup["same_image_id"]["ids"] == [{"key": "b", "rows": ["train-00000-of-00002.parquet#1",
                                                                 "train-00001-of-00002.parquet#1"],
                                            "same_caption": True}]
    assert dup["same_image_bytes"] == {"count": 1, "groups": [["a", "c"]]}
