"""Images as shards store them: 8-bit JPEGs and PNGs within --max-side kept byte for byte, the rest re-encoded once
with fixed settings; and the image bytes of a Record (a file, or a row of a parquet file)."""
from __future__ import annotations

import bisect
import io
from typing import Any, Optional

from PIL import Image

from corpora.listings import Record

_KEEP_MODES = ("L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "YCbCr")  # 8-bit images every reader decodes alike
# PNGs within --max-side with at most this many colours (diagrams, line art, annotated drawings) stay PNG: JPEG
# blurs their edges and seldom saves bytes. Radiographs and photographs use far more (an 8-bit CT: ~200 grey levels).
PNG_FEW_COLOURS = 64


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


class ImageSource:
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
