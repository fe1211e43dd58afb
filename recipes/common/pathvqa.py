"""PathVQA from its Hugging Face parquet copy -> the VqaSplit every VQA recipe reads.

Layout (``root``): parquet files named by split, ``[data/]train-*.parquet``, ``validation-*.parquet``,
``test-*.parquet`` (or ``train.parquet`` ...), columns ``image`` ({bytes, path}), ``question``, ``answer``:
19,654 / 6,259 / 6,719 questions after the copy's de-duplication. Closed questions are those answered yes or no.
Images are written once into ``root/images/`` (or ``vqa.image_cache``), named by the SHA-1 of their bytes, so one
image asked about several times is one file and one cluster for the bootstrap. The original release's pickles
are refused without being opened: unpickling runs whatever code a file holds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

from recipes.common.vqa_rad import (
    VqaDataError,
    VqaDataNotFound,
    VqaRecord,
    VqaSplit,
    normalize_text,
)

SPLITS = ("train", "validation", "test")
CLOSED_ANSWERS = frozenset({"yes", "no"})
PARQUET_COPY = "flaviagiammarino/path-vqa"
DESCRIPTION = ("PathVQA, the Hugging Face parquet copy's train / validation / test (de-duplicated); closed = yes/no "
               "answers; checkpoints are selected on validation")


def split_files(root: Path, split: str) -> list[Path]:
    """The parquet files of one split under root (any depth), sorted."""
    return sorted({*root.rglob(f"{split}-*.parquet"), *root.rglob(f"{split}.parquet")})


def _refuse_pickles(root: Path) -> None:
    pickles = sorted(root.rglob("*.pkl")) + sorted(root.rglob("*.pickle"))
    if pickles:
        raise VqaDataError(f"PathVQA: {pickles[0]} is a pickle of the original release and is never unpickled (it "
                           f"could run code): use the parquet copy, huggingface.co/datasets/{PARQUET_COPY}")


def _image_bytes(cell: object, where: str) -> bytes:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise VqaDataError(f"PathVQA: {where}: column 'image' holds no image bytes")
    return bytes(data)


def _read(files: list[Path], image_dir: Path, max_question_words: int) -> tuple[list[VqaRecord], int]:
    import pyarrow.parquet as pq

    out, dropped = [], 0
    for path in files:
        try:
            file = pq.ParquetFile(path)
            missing = {"image", "question", "answer"} - set(file.schema_arrow.names)
            if missing:
                raise ValueError(f"no column {sorted(missing)[0]!r}")
            # a few hundred rows at a time: a split's images are hundreds of MB
            rows = (row for b in file.iter_batches(batch_size=256, columns=["image", "question", "answer"])
                    for row in b.to_pylist())
        except (OSError, ValueError, KeyError) as e:  # pyarrow's errors subclass these
            raise VqaDataError(f"PathVQA: {path}: not a parquet file with columns image, question, answer "
                               f"({str(e).splitlines()[0]})") from None
        for i, row in enumerate(rows):
            data = _image_bytes(row["image"], f"{path.name} row {i}")
            name = hashlib.sha1(data).hexdigest()[:20] + ".img"
            target = image_dir / name
            if not target.is_file():
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(target)  # atomic: a concurrent reader never sees half an image
            question = normalize_text(row["question"] or "", max_question_words)
            answer = normalize_text(row["answer"] if row["answer"] is not None else "")
            if not question or not answer:
                dropped += 1
                continue
            out.append(VqaRecord(qid=f"{path.stem}:{i}", image=name, question=question, answer=answer,
                                 answer_type="closed" if answer in CLOSED_ANSWERS else "open",
                                 question_raw=str(row["question"]), answer_raw=str(row["answer"])))
    return out, dropped


def load_pathvqa(root: Union[str, Path], max_question_words: int = 35,
                 image_cache: Optional[Union[str, Path]] = None) -> VqaSplit:
    """PathVQA's train / validation / test questions from parquet; images extracted once into the cache folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VqaDataNotFound(f"vqa.root: PathVQA folder not found: {root} (the parquet copy, {PARQUET_COPY})")
    _refuse_pickles(root)
    files = {s: split_files(root, s) for s in SPLITS}
    for s, found in files.items():
        if not found:
            raise VqaDataNotFound(f"vqa.root: no {s}-*.parquet under {root} (the parquet copy, {PARQUET_COPY})")
    image_dir = Path(image_cache).expanduser() if image_cache else root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    parts, notes = {}, []
    for s in SPLITS:
        parts[s], dropped = _read(files[s], image_dir, max_question_words)
        if dropped:
            notes.append(f"{dropped} {s} row(s) dropped: empty question or answer after normalisation")
    return VqaSplit("official", parts["train"], parts["test"], image_dir,
                    [str(p) for s in SPLITS for p in files[s]], notes, validation=parts["validation"],
                    dataset="pathvqa", type_field="", description_text=DESCRIPTION)
