"""SLAKE (English): the release's train / validation / test JSON -> the VqaSplit every VQA recipe reads.

Layout (``root``): ``train.json``, ``validate.json`` (the Hugging Face copy names it ``validation.json``: both are
accepted), ``test.json`` and ``imgs/xmlabN/source.jpg``. Each row has ``img_id, img_name, question, answer, q_lang,
location, modality, answer_type, base_type, content_type, triple, qid``. Only English rows (``q_lang`` en) are kept:
4,919 / 1,053 / 1,061 questions on 450 / 96 / 96 images, no image shared between splits. Rows whose answer
normalises to nothing (one training row of the release, qid 1622) are dropped and counted. License: CC BY 4.0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from recipes.common.vqa_rad import (
    VqaDataError,
    VqaDataNotFound,
    VqaRecord,
    VqaSplit,
    _load_json,
    normalize_answer_type,
    normalize_text,
)

SPLIT_FILES = {"train": ("train.json",), "validation": ("validate.json", "validation.json"), "test": ("test.json",)}
IMAGE_DIR = "imgs"
DESCRIPTION = ("SLAKE English (q_lang en): the release's train.json / validate.json / test.json; checkpoints are "
               "selected on validation")


def _find(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise VqaDataNotFound(f"vqa.root: SLAKE needs {' or '.join(names)} in {root}")


def _read(path: Path, image_dir: Path, max_question_words: int) -> tuple[list[VqaRecord], int]:
    """English rows of one split file -> records, and how many were dropped for an empty question or answer."""
    rows = _load_json(path, "SLAKE")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise VqaDataError(f"SLAKE: {path} must hold a JSON list of question records")
    out, dropped = [], 0
    for i, row in enumerate(rows):
        if str(row.get("q_lang", "")).strip().lower() != "en":
            continue  # the Chinese half of the release
        where = f"{path.name} row {i} (qid {row.get('qid')!r})"
        for key in ("img_name", "question", "answer", "answer_type"):
            if key not in row:
                raise VqaDataError(f"SLAKE: {where}: missing field {key!r}")
        rec = VqaRecord(qid=str(row.get("qid", "")), image=str(row["img_name"]).strip(),
                        question=normalize_text(row["question"], max_question_words),
                        answer=normalize_text(row["answer"] if row["answer"] is not None else ""),
                        answer_type=normalize_answer_type(row["answer_type"], f"SLAKE: {where}"),
                        question_raw=str(row["question"]), answer_raw=str(row["answer"]),
                        question_type=str(row.get("content_type", "")).strip(),
                        organ=str(row.get("location", "")).strip())
        if not rec.question or not rec.answer:
            dropped += 1
            continue
        out.append(rec)
    return out, dropped


def load_slake(root: Union[str, Path], max_question_words: int = 35) -> VqaSplit:
    """SLAKE's English train / validation / test questions; every referenced image must exist."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VqaDataNotFound(f"vqa.root: SLAKE folder not found: {root} (it must hold train.json, validate.json, "
                              f"test.json and {IMAGE_DIR}/)")
    image_dir = root / IMAGE_DIR
    if not image_dir.is_dir():
        raise VqaDataNotFound(f"vqa.root: SLAKE image folder not found: {image_dir}")
    paths = {name: _find(root, files) for name, files in SPLIT_FILES.items()}
    parts, notes = {}, []
    for name, path in paths.items():
        parts[name], dropped = _read(path, image_dir, max_question_words)
        if dropped:
            notes.append(f"{dropped} {name} row(s) dropped: empty question or answer after normalisation")
        if not parts[name]:
            raise VqaDataError(f"SLAKE: {path} holds no English questions")
    images = {name: {r.image for r in recs} for name, recs in parts.items()}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        shared = images[a] & images[b]
        if shared:  # the release has none; a re-split that does leaks images into evaluation
            notes.append(f"{len(shared)} image(s) appear in both {a} and {b}, e.g. {sorted(shared)[0]}")
    missing = sorted({r.image for recs in parts.values() for r in recs if not (image_dir / r.image).is_file()})
    if missing:
        raise VqaDataNotFound(f"{image_dir}: {len(missing)} referenced image(s) missing, e.g. {missing[0]}")
    return VqaSplit("official", parts["train"], parts["test"], image_dir, [str(p) for p in paths.values()], notes,
                    validation=parts["validation"], dataset="slake", type_field="content_type",
                    description_text=DESCRIPTION)
