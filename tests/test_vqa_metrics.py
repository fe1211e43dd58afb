"""VQA metrics against hand-computed values: exact match after normalisation, edit similarity, closed/open split."""
from __future__ import annotations

import pytest

from recipes.common.vqa_metrics import (
    edit_similarity,
    exact_match,
    flatten,
    format_table,
    levenshtein,
    majority_answers,
    majority_baselines,
    score,
)
from recipes.common.vqa_rad import VqaRecord


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3),
                                   ("same", "same", 0), ("left lung", "right lung", 4), ("no", "yes", 3)])
def test_levenshtein_known_distances(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_edit_similarity_and_match_normalise_first():
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("Yes", "yes") == 1.0
    assert edit_similarity("no", "yes") == 0.0
    assert edit_similarity("left lung", "right lung") == pytest.approx(1 - 4 / 10)
    assert edit_similarity("34 cm", "3.4 cm") == pytest.approx(1 - 1 / 6)  # the decimal point counts
    assert exact_match("CT.", "ct") and exact_match(12, "12") and exact_match("Heart \tlungs", "heart lungs")
    assert not exact_match("3.4 cm", "34 cm")


# (prediction, ground truth, answer type) -> match, edit similarity (by hand)
HANDCRAFTED = [
    ("Yes", "yes", "closed"),             # match, 1
    ("no", "yes", "closed"),              # no match, 1 - 3/3 = 0
    ("left lung", "right lung", "open"),  # no match, 1 - 4/10 = 0.6
    ("CT.", "ct", "open"),                # match after normalisation, 1
    ("34 cm", "3.4 cm", "open"),          # no match, 1 - 1/6
]


def test_score_overall_closed_open_by_hand():
    preds, truths, kinds = zip(*HANDCRAFTED)
    s = score(preds, truths, kinds)
    assert s["closed"] == {"accuracy": 0.5, "edit_similarity": 0.5, "correct": 1, "count": 2}
    assert s["open"]["count"] == 3 and s["open"]["correct"] == 1
    assert s["open"]["accuracy"] == pytest.approx(1 / 3)
    assert s["open"]["edit_similarity"] == pytest.approx((0.6 + 1 + 5 / 6) / 3)
    assert s["overall"]["count"] == 5 and s["overall"]["accuracy"] == pytest.approx(0.4)
    assert s["overall"]["edit_similarity"] == pytest.approx((1 + 0 + 0.6 + 1 + 5 / 6) / 5)
    flat = flatten(s)
    assert flat["accuracy"] == pytest.approx(0.4) and flat["accuracy_closed"] == 0.5
    assert flat["edit_similarity_open"] == pytest.approx((0.6 + 1 + 5 / 6) / 3)
    assert set(flat) == {"accuracy", "accuracy_closed", "accuracy_open", "edit_similarity",
                         "edit_similarity_closed", "edit_similarity_open"}
    table = format_table([("model", s)])
    assert "0.4000" in table and "5/2/3" in table


def test_score_empty_group_and_bad_type():
    s = score(["yes"], ["yes"], ["closed"])
    assert s["open"] == {"accuracy": None, "edit_similarity": None, "correct": 0, "count": 0}
    assert "accuracy_open" not in flatten(s)
    with pytest.raises(ValueError, match="answer type"):
        score(["yes"], ["yes"], ["CLOSED"])
    with pytest.raises(ValueError):  # lengths must agree
        score(["yes", "no"], ["yes"], ["closed"])


def _rec(answer: str, kind: str) -> VqaRecord:
    return VqaRecord(qid="0", image="x.jpg", question="q", answer=answer, answer_type=kind)


def test_majority_baselines_by_hand():
    train = [_rec("no", "closed"), _rec("no", "closed"), _rec("no", "closed"), _rec("yes", "closed"),
             _rec("axial", "open"), _rec("axial", "open"), _rec("brain", "open")]
    assert majority_answers(train) == {"overall": "no", "closed": "no", "open": "axial"}
    test = [_rec("no", "closed"), _rec("yes", "closed"), _rec("axial", "open"), _rec("lung", "open")]
    b = majority_baselines(train, test)
    per_type = b["majority_per_type"]["scores"]
    assert per_type["overall"]["accuracy"] == 0.5 and per_type["closed"]["accuracy"] == 0.5
    assert per_type["open"]["accuracy"] == 0.5
    overall = b["majority_overall"]["scores"]  # "no" for everything
    assert overall["overall"]["accuracy"] == 0.25 and overall["open"]["accuracy"] == 0.0
    # ties break alphabetically: a deterministic baseline
    assert majority_answers([_rec("yes", "closed"), _rec("no", "closed")])["closed"] == "no"


def test_sample_images_show_the_image_and_colour_the_verdict(tmp_path):
    """TensorBoard image summaries of predictions: the image on top, a green line for a match, red otherwise."""
    import numpy as np
    from PIL import Image

    from recipes.common.vqa_eval import sample_images

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "is there a lesion?", "ground_truth": "yes", "prediction": p,
             "match": p == "yes"} for p in ("yes", "no")]
    rows.append({**rows[0], "image": "missing.png"})  # unreadable: skipped, not fatal
    out = sample_images(rows, tmp_path, n=3, side=64)
    assert sorted(out) == ["sample_0", "sample_1"]
    for key, green in (("sample_0", True), ("sample_1", False)):
        img = out[key]
        assert img.shape == (3, 64 + 48, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
        top = (img[:, :64].permute(1, 2, 0).numpy() * 255).round()
        assert np.allclose(top, [200, 10, 10], atol=1)  # the resized image itself
        red, grn, _ = img[:, 64 + 32:].sum(dim=(1, 2)).tolist()  # the prediction line
        assert (grn > 10 * red) if green else (red > 10 * grn), (key, red, grn)
