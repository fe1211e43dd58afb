"""VQA-RAD: the official release and the MEVF/MUMC preprocessed split -> normalised records, a map-style Dataset.

Layouts read (``root`` is the folder holding them):
- official release: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/`` (or ``images/``, the MUMC name).
  Split "official": test = phrase_type test_freeform + test_para (451 questions: 272 closed / 179 open),
  train = freeform + para (1797).
- MEVF/MUMC split "mevf": ``trainset.json`` / ``testset.json`` in ``root/standard_splits/`` or ``root/``
  (3064 train entries incl. 1267 templated "frame" questions, some of which rephrase test questions; 451 test),
  images from the same image folder.

Real-data quirks handled: answer types with trailing spaces ("CLOSED "), integer answers (4, 12), a string qid,
tabs and mixed case in answers. Questions and answers go through one normaliser, `normalize_text`, both for
training and for scoring.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset

from recipes.common.image_text import (
    ImageConfig,
    draft_side,
    image_transform,
    open_image,
)

OFFICIAL_JSON = "VQA_RAD Dataset Public.json"
IMAGE_DIRS = ("VQA_RAD Image Folder", "images")  # the OSF release's name, the MUMC/MEVF repositories' name
MEVF_FILES = ("trainset.json", "testset.json")
TEST_PHRASE_TYPES = frozenset({"test_freeform", "test_para"})
SPLITS = ("official", "mevf")
ANSWER_TYPES = ("closed", "open")

SPLIT_DESCRIPTIONS = {
    "official": "VQA-RAD official split: test = phrase_type test_freeform + test_para, train = freeform + para",
    "mevf": "MEVF/MUMC preprocessed split: trainset.json (freeform + para + frame rephrasings, some of "
            "test questions) / testset.json",
}


class VqaDataError(ValueError):
    """A VQA-RAD file that cannot be used as it is (bad JSON, unknown answer type, missing field)."""


class VqaDataNotFound(FileNotFoundError):
    """A VQA-RAD file or folder that is not where the configuration says."""


# ----------------------------------------------------------------------------- normalisation

_PUNCT = re.compile(r"[!\"()*#:;~]")  # BLIP's pre_question set, minus '.', which is handled on its own
_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a '.' that is not a decimal point ("3.4 cm" keeps its)
_SPACE = re.compile(r"\s+")


def normalize_text(text: Any, max_words: Optional[int] = None) -> str:
    """BLIP's pre_question, made safe for answers: str() (integer answers), lowercase, delete . ! " ( ) * # : ; ~
    (a decimal point survives), every whitespace run (tabs, newlines) -> one space, strip, keep max_words.

    Used for questions and answers alike, in training and in scoring.
    """
    s = str(text).lower()
    s = _PUNCT.sub("", s)
    s = _DOT.sub("", s)
    s = _SPACE.sub(" ", s).strip()
    if max_words is not None:
        words = s.split(" ")
        if len(words) > max_words:
            s = " ".join(words[:max_words])
    return s


def normalize_answer_type(value: Any, where: str) -> str:
    """'CLOSED', 'CLOSED ', 'open' ... -> 'closed' | 'open'; anything else is an error naming the row."""
    t = str(value).strip().lower()
    if t not in ANSWER_TYPES:
        raise VqaDataError(f"{where}: answer_type {value!r} is neither CLOSED nor OPEN")
    return t


# ----------------------------------------------------------------------------- records and splits


@dataclass(frozen=True)
class VqaRecord:
    """One question: normalised question and answer, 'closed'|'open', the image file name, and the raw text."""

    qid: str
    image: str
    question: str
    answer: str
    answer_type: str
    question_raw: str = ""
    answer_raw: str = ""
    phrase_type: str = ""
    question_type: str = ""
    organ: str = ""


DATASET_NAMES = {"vqa_rad": "VQA-RAD", "slake": "SLAKE", "pathvqa": "PathVQA"}


@dataclass
class VqaSplit:
    """A train/test split of a VQA data set (VQA-RAD, SLAKE, PathVQA) with the image folder it refers to; SLAKE and
    PathVQA also bring a validation split, the one checkpoints are selected on."""

    name: str  # official | mevf (VQA-RAD); official (SLAKE, PathVQA: the release's own split)
    train: list[VqaRecord]
    test: list[VqaRecord]
    image_dir: Path
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    validation: list[VqaRecord] = field(default_factory=list)
    dataset: str = "vqa_rad"
    type_field: str = "question_type"  # the release's field behind VqaRecord.question_type (SLAKE: content_type)
    evaluated: str = "test"  # which questions `test` holds: "validation" when selecting checkpoints
    description_text: str = ""

    @property
    def description(self) -> str:
        return self.description_text or SPLIT_DESCRIPTIONS[self.name]

    def for_selection(self) -> "VqaSplit":
        """The split whose `test` is the validation questions (when there are any): what training evaluates, so
        checkpoints are chosen without looking at the test set."""
        import dataclasses

        return dataclasses.replace(self, test=self.validation, evaluated="validation") if self.validation else self

    def summary(self) -> dict[str, Any]:
        """Counts and provenance, printed at start-up and saved with every result."""
        test_types = Counter(r.answer_type for r in self.test)
        train_types = Counter(r.answer_type for r in self.train)
        return {"split": self.name, "dataset": self.dataset, "description": self.description,
                "sources": self.sources, "train": len(self.train), "train_closed": train_types["closed"],
                "train_open": train_types["open"], "validation": len(self.validation), "evaluated": self.evaluated,
                "test": len(self.test), "test_closed": test_types["closed"], "test_open": test_types["open"],
                "test_images": len({r.image for r in self.test}), "type_field": self.type_field,
                "notes": self.notes}

    def describe(self) -> str:
        s = self.summary()
        val = f", validation {s['validation']}" if s["validation"] else ""
        what = "test" if self.evaluated == "test" else "evaluated on validation"
        return (f"{DATASET_NAMES.get(self.dataset, self.dataset)} split '{s['split']}' ({s['description']}): train "
                f"{s['train']} questions ({s['train_closed']} closed / {s['train_open']} open){val}, {what} "
                f"{s['test']} ({s['test_closed']} closed / {s['test_open']} open) on {s['test_images']} images")


def _load_json(path: Path, what: str) -> object:
    """Parsed JSON of `path`; a missing file or bad JSON raises one line naming `what` the file is."""
    if not path.is_file():
        raise VqaDataNotFound(f"{what}: file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VqaDataError(f"{what}: {path} is not valid JSON ({str(e).splitlines()[0]})") from None


def _read_json_list(path: Path) -> list[dict]:
    rows = _load_json(path, "VQA-RAD")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise VqaDataError(f"{path}: expected a JSON list of question records")
    return rows


def find_image_dir(root: Path) -> Path:
    """The release's image folder under root ('VQA_RAD Image Folder' or 'images')."""
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise VqaDataNotFound(f"{root}: no image folder ({' or '.join(repr(n) for n in IMAGE_DIRS)})")


def _record(row: dict, where: str, max_question_words: int) -> VqaRecord:
    for key in ("image_name", "question", "answer", "answer_type"):
        if row.get(key) is None:
            raise VqaDataError(f"{where}: missing field {key!r}")
    return VqaRecord(qid=str(row.get("qid", "")), image=str(row["image_name"]).strip(),
                     question=normalize_text(row["question"], max_question_words),
                     answer=normalize_text(row["answer"]),
                     answer_type=normalize_answer_type(row["answer_type"], where),
                     question_raw=str(row["question"]), answer_raw=str(row["answer"]),
                     phrase_type=str(row.get("phrase_type", "")).strip(),
                     question_type=str(row.get("question_type", "")).strip(),
                     organ=str(row.get("image_organ", "")).strip())


def _records(rows: list[dict], source: Path, max_question_words: int) -> tuple[list[VqaRecord], int]:
    """Rows -> records; rows whose question or answer normalises to nothing are dropped (and counted)."""
    out, dropped = [], 0
    for i, row in enumerate(rows):
        rec = _record(row, f"{source.name} row {i} (qid {row.get('qid')!r})", max_question_words)
        if not rec.question or not rec.answer:
            dropped += 1
            continue
        out.append(rec)
    return out, dropped


def _find_mevf_dir(root: Path) -> Path:
    for d in (root / "standard_splits", root):
        if all((d / f).is_file() for f in MEVF_FILES):
            return d
    raise VqaDataNotFound(f"{root}: split 'mevf' needs {' and '.join(MEVF_FILES)} in {root / 'standard_splits'} "
                          f"or {root}")


def load_split(root: Union[str, Path], split: str = "official", max_question_words: int = 35) -> VqaSplit:
    """Read VQA-RAD from `root` into normalised train/test records; every referenced image must exist."""
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise VqaDataError(f"vqa.split: unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not root.is_dir():
        raise VqaDataNotFound(f"vqa.root: VQA-RAD folder not found: {root} (it must hold {OFFICIAL_JSON!r} and "
                              f"{IMAGE_DIRS[0]!r})")
    image_dir = find_image_dir(root)
    notes: list[str] = []
    if split == "official":
        path = root / OFFICIAL_JSON
        records, dropped = _records(_read_json_list(path), path, max_question_words)
        train = [r for r in records if r.phrase_type not in TEST_PHRASE_TYPES]
        test = [r for r in records if r.phrase_type in TEST_PHRASE_TYPES]
        sources = [str(path)]
    else:
        d = _find_mevf_dir(root)
        train, dropped_train = _records(_read_json_list(d / MEVF_FILES[0]), d / MEVF_FILES[0], max_question_words)
        test, dropped_test = _records(_read_json_list(d / MEVF_FILES[1]), d / MEVF_FILES[1], max_question_words)
        dropped = dropped_train + dropped_test
        sources = [str(d / f) for f in MEVF_FILES]
        frames = sum(r.phrase_type == "frame" for r in train)
        if frames:
            notes.append(f"{frames} training questions are templated 'frame' rephrasings made from every row, "
                         "test rows included: known leakage of this split")
    if dropped:
        notes.append(f"{dropped} rows dropped: empty question or answer after normalisation")
    if not test:
        raise VqaDataError(f"{root}: split {split!r} has no test questions")
    if not train:
        raise VqaDataError(f"{root}: split {split!r} has no training questions")
    missing = sorted({r.image for r in train + test if not (image_dir / r.image).is_file()})
    if missing:
        raise VqaDataNotFound(f"{image_dir}: {len(missing)} referenced image(s) missing, e.g. {missing[0]}")
    return VqaSplit(split, train, test, image_dir, sources, notes)


def answer_list(records: list[VqaRecord]) -> list[str]:
    """Distinct normalised answers, most frequent first (ties alphabetical): the candidates of rank inference."""
    counts = Counter(r.answer for r in records)
    return sorted(counts, key=lambda a: (-counts[a], a))


def read_answer_list(path: Union[str, Path]) -> list[str]:
    """A JSON list of answers (e.g. MUMC's answer_all_list.json), normalised and de-duplicated in order."""
    path = Path(path).expanduser()
    values = _load_json(path, "vqa.answer_list")
    if isinstance(values, dict):  # {answer: index} maps
        values = list(values)
    if not isinstance(values, list):
        raise VqaDataError(f"vqa.answer_list: {path} must hold a JSON list of answers")
    out = list(dict.fromkeys(a for a in (normalize_text(v) for v in values) if a))
    if not out:
        raise VqaDataError(f"vqa.answer_list: {path} holds no answers")
    return out


# ----------------------------------------------------------------------------- torch dataset


class VqaDataset(Dataset):
    """Map-style: item i -> {"image": Tensor[3,S,S], "question": str, "answers": [str], "weights": [float],
    "answer_type": str, "qid": str, "index": int}. One answer of weight 1 per VQA-RAD question."""

    def __init__(self, records: list[VqaRecord], image_dir: Union[str, Path], image: ImageConfig, train: bool):
        self.records = list(records)
        self.image_dir = Path(image_dir)
        self.transform: Callable = image_transform(image, train)
        # training may decode JPEGs at reduced size, never below what the crop needs; evaluation decodes them whole
        self.min_side = draft_side(image, train)  # VQA-RAD images are up to 2321 px
        self._bytes: dict[str, bytes] = {}  # the whole release is ~16 MB: read each file once

    def __len__(self) -> int:
        return len(self.records)

    def _image_bytes(self, name: str) -> bytes:
        data = self._bytes.get(name)
        if data is None:
            data = self._bytes[name] = (self.image_dir / name).read_bytes()
        return data

    def load_image(self, name: str) -> torch.Tensor:
        return self.transform(open_image(self._image_bytes(name), self.min_side))

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"image": self.load_image(r.image), "question": r.question, "answers": [r.answer],
                "weights": [1.0], "answer_type": r.answer_type, "qid": r.qid, "index": i}
