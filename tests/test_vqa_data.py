"""VQA-RAD loading: the normaliser, quirks on a handcrafted release, errors, and counts on the real release."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from recipes.common.image_text import ImageConfig
from recipes.common.text import pre_question
from recipes.common.vqa_rad import (
    OFFICIAL_JSON,
    VqaDataError,
    VqaDataNotFound,
    VqaDataset,
    answer_list,
    load_split,
    normalize_text,
    read_answer_list,
)


def test_normalize_text_is_pre_question_plus_answer_safety():
    for q in ["Are regions of the brain infarcted?", "Is this (T1) MRI: axial; or coronal?", "what is \"this\"!"]:
        assert normalize_text(q) == pre_question(q)  # BLIP's behaviour where it is sound
    assert normalize_text(12) == "12"  # integer answers
    assert normalize_text("Heart \tlungs") == "heart lungs"  # tabs and runs of spaces
    assert normalize_text(" superficial to the patient's skin") == "superficial to the patient's skin"
    assert normalize_text("On the right shoulder.") == "on the right shoulder"
    assert normalize_text("3.4 cm") == "3.4 cm"  # a decimal point is kept (pre_question would say "34 cm")
    assert normalize_text("L2-3, T2-MRI") == "l2-3, t2-mri"
    assert normalize_text("a b c d", max_words=2) == "a b"


def _write_release(root: Path, rows: list[dict], images: list[str]) -> None:
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    for name in images:
        Image.new("RGB", (40, 30), (120, 60, 30)).save(root / "VQA_RAD Image Folder" / name)
    (root / OFFICIAL_JSON).write_text(json.dumps(rows))


ROWS = [  # the real release's quirks: string/int qids, "CLOSED ", integer answer, tabs, mixed case, '.'
    {"qid": "0", "phrase_type": "freeform", "image_name": "a.jpg", "question": "Is there a mass?",
     "answer": "Yes", "answer_type": "CLOSED"},
    {"qid": 1, "phrase_type": "para", "image_name": "a.jpg", "question": "How many  ribs?", "answer": 12,
     "answer_type": "OPEN"},
    {"qid": 2, "phrase_type": "freeform", "image_name": "b.jpg", "question": "Infectious process?",
     "answer": "Maybe", "answer_type": "CLOSED "},
    {"qid": 3, "phrase_type": "test_freeform", "image_name": "b.jpg", "question": "Which organs?",
     "answer": "Heart \tlungs.", "answer_type": "OPEN"},
    {"qid": 4, "phrase_type": "test_para", "image_name": "a.jpg", "question": "IS THIS NORMAL?", "answer": "no",
     "answer_type": "closed"},
    {"qid": 5, "phrase_type": "freeform", "image_name": "a.jpg", "question": "Empty?", "answer": " . ",
     "answer_type": "OPEN"},  # normalises to nothing: dropped and counted
]


def test_handcrafted_release_quirks(tmp_path):
    _write_release(tmp_path, ROWS, ["a.jpg", "b.jpg"])
    split = load_split(tmp_path)
    assert [r.qid for r in split.train] == ["0", "1", "2"] and [r.qid for r in split.test] == ["3", "4"]
    by_qid = {r.qid: r for r in split.train + split.test}
    assert by_qid["1"].answer == "12" and by_qid["1"].question == "how many ribs?"
    assert by_qid["2"].answer_type == "closed" and by_qid["2"].answer == "maybe"
    assert by_qid["3"].answer == "heart lungs" and by_qid["3"].answer_raw == "Heart \tlungs."
    assert by_qid["4"].question == "is this normal?"
    s = split.summary()
    assert (s["train"], s["test"], s["test_closed"], s["test_open"]) == (3, 2, 1, 1)
    assert any("1 rows dropped" in n for n in s["notes"])
    assert "official" in split.describe()
    assert answer_list(split.train) == ["12", "maybe", "yes"]  # one each: alphabetical


def test_dataset_items(tmp_path):
    _write_release(tmp_path, ROWS, ["a.jpg", "b.jpg"])
    split = load_split(tmp_path)
    ds = VqaDataset(split.train, split.image_dir, ImageConfig(size=32), train=True)
    item = ds[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["question"] == "how many ribs?" and item["answers"] == ["12"] and item["weights"] == [1.0]
    assert item["answer_type"] == "open" and len(ds) == 3
    test = VqaDataset(split.test, split.image_dir, ImageConfig(size=32), train=False)
    assert torch.equal(test[0]["image"], test[0]["image"])  # evaluation decoding is deterministic


def test_evaluation_images_are_decoded_whole(tmp_path):
    """image.draft speeds up training only: a VQA test image is BLIP's full decode + bicubic resize."""
    import io

    import numpy as np

    y, x = np.mgrid[0:480, 0:640]
    arr = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)  # detail a reduced decode loses
    _write_release(tmp_path, ROWS, ["b.jpg"])
    Image.fromarray(arr).save(tmp_path / "VQA_RAD Image Folder" / "a.jpg", quality=95)
    split = load_split(tmp_path)
    test = VqaDataset(split.test, split.image_dir, ImageConfig(size=48, draft=True), train=False)
    train = VqaDataset(split.train, split.image_dir, ImageConfig(size=48, draft=True), train=True)
    data = (tmp_path / "VQA_RAD Image Folder" / "a.jpg").read_bytes()
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((48, 48), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(test.load_image("a.jpg"), (pixels - mean[:, None, None]) / std[:, None, None],
                               rtol=0, atol=1e-6)
    assert test.min_side == 0 and train.min_side == 68  # 48 / sqrt(0.5), rounded up


def test_errors_name_what_to_fix(tmp_path):
    with pytest.raises(VqaDataNotFound, match="vqa.root"):
        load_split(tmp_path / "absent")
    _write_release(tmp_path, ROWS, ["a.jpg"])  # b.jpg is referenced but missing
    with pytest.raises(VqaDataNotFound, match="b.jpg"):
        load_split(tmp_path)
    with pytest.raises(VqaDataError, match="unknown split"):
        load_split(tmp_path, "random")
    with pytest.raises(VqaDataNotFound, match="trainset.json"):
        load_split(tmp_path, "mevf")
    bad = tmp_path / "bad"
    _write_release(bad, [dict(ROWS[0], answer_type="MAYBE")], ["a.jpg"])
    with pytest.raises(VqaDataError, match="answer_type 'MAYBE'"):
        load_split(bad)
    (bad / OFFICIAL_JSON).write_text("{not json")
    with pytest.raises(VqaDataError, match="not valid JSON"):
        load_split(bad)
    (tmp_path / "answers.json").write_text(json.dumps(["Yes", "yes", 12, "CT."]))
    assert read_answer_list(tmp_path / "answers.json") == ["yes", "12", "ct"]


# ----------------------------------------------------------------------------- the real release


def test_official_split_counts(shared_data):
    root = shared_data / "vqa_rad"
    split = load_split(root, "official")
    assert len(split.train) + len(split.test) == 2248  # every row kept
    assert len(split.test) == 451 and len(split.train) == 1797
    kinds = Counter(r.answer_type for r in split.test)
    assert kinds == {"closed": 272, "open": 179}
    assert Counter(r.phrase_type for r in split.test) == {"test_freeform": 308, "test_para": 143}
    assert {r.phrase_type for r in split.train} == {"freeform", "para"}
    assert len({r.image for r in split.test}) == 203
    # quirks of the real file: "CLOSED " rows, integer answers
    assert sum(r.answer_type == "closed" for r in split.train + split.test) == 1297 + 2
    assert {"4", "2", "12"} <= {r.answer for r in split.train + split.test}
    candidates = answer_list(split.train)
    assert candidates[:2] == ["no", "yes"] and len(candidates) == len(set(candidates))


def test_mevf_split_counts(shared_data):
    root = shared_data / "vqa_rad"
    mevf = load_split(root, "mevf")
    assert len(mevf.train) == 3064 and len(mevf.test) == 451
    assert Counter(r.answer_type for r in mevf.test) == {"closed": 272, "open": 179}
    assert any("frame" in n for n in mevf.notes)  # the known leakage is stated
    official = load_split(root, "official")
    assert {(r.question, r.image) for r in mevf.test} == {(r.question, r.image) for r in official.test}
