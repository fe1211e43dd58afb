"""SLAKE and PathVQA loaders on small files written in the releases' layouts; the question-only baseline and the
per-type breakdown; the config switch vqa.dataset."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from recipes.common.image_text import ImageConfig
from recipes.common.pathvqa import load_pathvqa
from recipes.common.slake import load_slake
from recipes.common.vqa_metrics import majority_baselines, question_majority, score_by_type
from recipes.common.vqa_rad import VqaDataError, VqaDataNotFound, VqaDataset, VqaRecord


def _slake_row(qid, image, question, answer, kind, lang="en", content="Organ"):
    return {"img_id": int(image.split("/")[0][5:]), "img_name": image, "question": question, "answer": answer,
            "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": kind, "base_type": "vqa",
            "content_type": content, "triple": ["vhead", "_", "_"], "qid": qid}


def write_slake(root: Path, validation_name: str = "validate.json") -> None:
    """A SLAKE release in miniature: English and Chinese rows, an empty answer, imgs/xmlabN/source.jpg."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train.json": [_slake_row(1, "xmlab0/source.jpg", "Is this a CT?", "Yes", "CLOSED", content="Modality"),
                       _slake_row(2, "xmlab0/source.jpg", "这是CT吗?", "是", "CLOSED", lang="zh"),
                       _slake_row(3, "xmlab1/source.jpg", "Which organ is abnormal?", "Lung", "OPEN"),
                       _slake_row(1622, "xmlab1/source.jpg", "What is the mass?", "", "OPEN"),  # the release's one
                       _slake_row(4, "xmlab1/source.jpg", "Is this a CT?", "No", "CLOSED", content="Modality")],
        validation_name: [_slake_row(10, "xmlab2/source.jpg", "Is this a CT?", "Yes", "CLOSED",
                                     content="Modality")],
        "test.json": [_slake_row(20, "xmlab3/source.jpg", "Which organ is abnormal?", "Heart", "OPEN"),
                      _slake_row(21, "xmlab3/source.jpg", "Where is the liver?", "Left", "OPEN",
                                 content="Position"),
                      _slake_row(22, "xmlab3/source.jpg", "是否正常?", "否", "CLOSED", lang="zh")],
    }
    for name, rows in splits.items():
        (root / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for n in range(4):
        (root / "imgs" / f"xmlab{n}").mkdir(parents=True)
        Image.new("RGB", (20, 20), (n * 40, 0, 0)).save(root / "imgs" / f"xmlab{n}" / "source.jpg")


@pytest.mark.parametrize("validation_name", ["validate.json", "validation.json"])
def test_slake_english_rows_splits_and_empty_answer(tmp_path, validation_name):
    write_slake(tmp_path, validation_name)
    split = load_slake(tmp_path)
    assert [r.qid for r in split.train] == ["1", "3", "4"]  # Chinese row and the empty answer (qid 1622) left out
    assert [r.qid for r in split.validation] == ["10"] and [r.qid for r in split.test] == ["20", "21"]
    assert any("1 train row(s) dropped" in n for n in split.notes)
    assert split.train[1].answer == "lung" and split.train[1].answer_type == "open"
    assert split.test[1].question_type == "Position" and split.type_field == "content_type"
    s = split.summary()
    assert (s["dataset"], s["train"], s["validation"], s["test"], s["test_images"]) == ("slake", 3, 1, 2, 1)
    assert split.describe().startswith("SLAKE split 'official'")
    # training evaluates on validation, never on test
    sel = split.for_selection()
    assert [r.qid for r in sel.test] == ["10"] and sel.evaluated == "validation"
    item = VqaDataset(split.test, split.image_dir, ImageConfig(size=16, augment=False), train=False)[0]
    assert item["image"].shape == (3, 16, 16) and item["answers"] == ["heart"]


def test_slake_errors_name_what_to_fix(tmp_path):
    with pytest.raises(VqaDataNotFound, match="SLAKE folder not found"):
        load_slake(tmp_path / "absent")
    write_slake(tmp_path)
    (tmp_path / "validate.json").unlink()
    with pytest.raises(VqaDataNotFound, match="validate.json or validation.json"):
        load_slake(tmp_path)
    write_slake(tmp_path / "b")
    (tmp_path / "b" / "imgs" / "xmlab3" / "source.jpg").unlink()
    with pytest.raises(VqaDataNotFound, match="1 referenced image"):
        load_slake(tmp_path / "b")


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def write_pathvqa(root: Path) -> None:
    """The Hugging Face parquet copy in miniature: data/{split}-0000N-of-0000M.parquet, image {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    rows = {"train": [(red, "Is this tissue necrotic?", "yes"), (red, "What stains the nuclei?", "hematoxylin"),
                      (blue, "Is this tissue necrotic?", "no"), (blue, "Is this tissue necrotic?", "yes")],
            "validation": [(blue, "What organ is this?", "liver")],
            "test": [(red, "Is this tissue necrotic?", "No"), (blue, "What organ is this?", "Kidney")]}
    (root / "data").mkdir(parents=True)
    for split, items in rows.items():
        table = pa.table({"image": [{"bytes": b, "path": None} for b, _, _ in items],
                          "question": [q for _, q, _ in items], "answer": [a for _, _, a in items]})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")


def test_pathvqa_parquet(tmp_path):
    write_pathvqa(tmp_path)
    split = load_pathvqa(tmp_path)
    assert (len(split.train), len(split.validation), len(split.test)) == (4, 1, 2)
    assert [r.answer_type for r in split.train] == ["closed", "open", "closed", "closed"]  # closed = yes/no
    assert [r.answer_type for r in split.test] == ["closed", "open"] and split.test[0].answer == "no"
    assert len({r.image for r in split.train}) == 2  # one file per distinct image: the bootstrap's clusters
    assert all((split.image_dir / r.image).is_file() for r in split.train + split.test)
    assert load_pathvqa(tmp_path).test == split.test  # a second load reuses the written images


def test_pathvqa_pickles_are_refused_unopened(tmp_path):
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (Path(tmp_path / "ran").write_text, ("unpickled",))

    (tmp_path / "qas" / "train").mkdir(parents=True)
    (tmp_path / "qas" / "train" / "train_qa.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(VqaDataError) as e:
        load_pathvqa(tmp_path)
    assert "never unpickled" in str(e.value) and "parquet" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(VqaDataNotFound, match="no train-"):
        load_pathvqa(tmp_path / "empty")
    write_pathvqa(tmp_path / "bad")
    (tmp_path / "bad" / "data" / "test-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(VqaDataError, match="test-00000-of-00001.parquet: not a parquet file"):
        load_pathvqa(tmp_path / "bad")


def _rec(q, a, kind, image="i.jpg"):
    return VqaRecord(qid="", image=image, question=q, answer=a, answer_type=kind)


def test_question_only_majority_by_hand():
    train = [_rec("is it ct?", "yes", "closed"), _rec("is it ct?", "yes", "closed"), _rec("is it ct?", "no", "closed"),
             _rec("is it mri?", "no", "closed"), _rec("which organ?", "lung", "open")]
    test = [_rec("is it ct?", "yes", "closed"), _rec("is it mri?", "yes", "closed"), _rec("what size?", "lung", "open")]
    answers, unseen = question_majority(train, test)
    assert answers == ["yes", "no", "lung"] and unseen == 1  # unseen question -> the type's majority answer
    b = majority_baselines(train, test)["question_majority"]
    assert b["unseen_questions"] == 1 and b["scores"]["overall"]["correct"] == 2


def test_per_type_breakdown_counts_multi_type_questions_under_each():
    rows = [{"question_type": "PRES", "match": True, "edit_similarity": 1.0},
            {"question_type": "PRES, POS", "match": False, "edit_similarity": 0.5},
            {"question_type": "POS", "match": True, "edit_similarity": 1.0},
            {"question_type": "Organ", "match": False, "edit_similarity": 0.0}]
    out = score_by_type(rows)
    assert list(out) == ["POS", "PRES", "ORGAN"]
    assert out["PRES"] == {"accuracy": 0.5, "edit_similarity": 0.75, "correct": 1, "count": 2}
    assert out["ORGAN"]["count"] == 1


def test_config_names_the_dataset(tmp_path):
    from conftest import ROOT

    from framework.config import ConfigError, load_config

    cfg = load_config(ROOT / "recipes" / "medblip" / "vqa_slake.yaml")
    assert cfg.vqa.dataset == "slake"
    with pytest.raises(ConfigError, match="vqa.dataset: unknown data set 'slak'"):
        load_config(ROOT / "recipes" / "medblip" / "vqa.yaml", ["vqa.dataset=slak"])
    with pytest.raises(ConfigError, match="slake has one split"):
        load_config(ROOT / "recipes" / "blip2" / "vqa_slake.yaml", ["vqa.split=mevf"])


def test_real_vqa_rad_per_type_and_question_only(shared_data):
    from recipes.common.vqa_rad import load_split

    split = load_split(shared_data / "vqa_rad")
    b = majority_baselines(split.train, split.test)["question_majority"]
    assert b["scores"]["overall"]["count"] == 451 and 0 <= b["unseen_questions"] <= 451
    rows = [{"question_type": r.question_type, "match": True, "edit_similarity": 1.0} for r in split.test]
    out = score_by_type(rows)
    assert out["PRES"]["count"] == 163 + 2 + 2 + 1 + 1 + 1 + 1  # PRES alone plus every combination holding it
