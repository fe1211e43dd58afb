"""VQA scoring: exact match on normalised text and normalised edit similarity, overall / closed / open, with counts.

Both compare `normalize_text(prediction)` with `normalize_text(ground truth)` (the normaliser training uses).
Edit similarity = 1 - Levenshtein(pred, truth) / max(len(pred), len(truth)) over characters (1.0 when both are
empty), averaged over questions.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Optional

from recipes.common.vqa_rad import ANSWER_TYPES, VqaRecord, normalize_text

GROUPS = ("overall",) + ANSWER_TYPES


def levenshtein(a: str, b: str) -> int:
    """Minimum number of single-character insertions, deletions and substitutions turning a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(prediction: Any, truth: Any) -> float:
    """1 - Levenshtein / max length on normalised text, in [0, 1]."""
    p, t = normalize_text(prediction), normalize_text(truth)
    longest = max(len(p), len(t))
    return 1.0 if longest == 0 else 1.0 - levenshtein(p, t) / longest


def exact_match(prediction: Any, truth: Any) -> bool:
    """Equal after normalisation."""
    return normalize_text(prediction) == normalize_text(truth)


def score_one(prediction: Any, truth: Any) -> dict[str, Any]:
    """{"prediction": normalised, "match": bool, "edit_similarity": float} for one question."""
    return {"prediction": normalize_text(prediction), "match": exact_match(prediction, truth),
            "edit_similarity": edit_similarity(prediction, truth)}


def score(predictions: Iterable[Any], truths: Iterable[Any], answer_types: Iterable[str]) -> dict[str, dict]:
    """{"overall"|"closed"|"open": {"accuracy", "edit_similarity", "correct", "count"}} (a group without
    questions has count 0 and None values)."""
    sums: dict[str, Counter] = {g: Counter() for g in GROUPS}
    for pred, truth, kind in zip(predictions, truths, answer_types, strict=True):
        if kind not in ANSWER_TYPES:
            raise ValueError(f"answer type {kind!r} is neither of {', '.join(ANSWER_TYPES)}")
        one = score_one(pred, truth)
        for g in ("overall", kind):
            sums[g]["count"] += 1
            sums[g]["correct"] += int(one["match"])
            sums[g]["edit"] += one["edit_similarity"]
    out = {}
    for g, s in sums.items():
        n = s["count"]
        out[g] = {"accuracy": s["correct"] / n if n else None, "edit_similarity": s["edit"] / n if n else None,
                  "correct": s["correct"], "count": n}
    return out


def flatten(scores: dict[str, dict], prefix: str = "") -> dict[str, float]:
    """Scores -> flat scalars for TensorBoard: accuracy, accuracy_closed, accuracy_open, edit_similarity, ..."""
    flat = {}
    for g in GROUPS:
        suffix = "" if g == "overall" else f"_{g}"
        for metric in ("accuracy", "edit_similarity"):
            value = scores[g][metric]
            if value is not None:
                flat[f"{prefix}{metric}{suffix}"] = float(value)
    return flat


def majority_answers(train: list[VqaRecord]) -> dict[str, str]:
    """Most frequent normalised training answer per answer type and overall (ties: alphabetical)."""
    def top(records: list[VqaRecord]) -> str:
        counts = Counter(r.answer for r in records)
        return min(counts, key=lambda a: (-counts[a], a)) if counts else ""

    out = {"overall": top(train)}
    for kind in ANSWER_TYPES:
        out[kind] = top([r for r in train if r.answer_type == kind])
    return out


def question_majority(train: list[VqaRecord], test: list[VqaRecord]) -> tuple[list[str], int]:
    """Question-only answers: the most frequent training answer to the same normalised question (ties:
    alphabetical), else the answer type's majority; returns (answers, how many test questions were unseen)."""
    by_question: dict[str, Counter] = {}
    for r in train:
        by_question.setdefault(r.question, Counter())[r.answer] += 1
    fallback = majority_answers(train)
    answers, unseen = [], 0
    for r in test:
        counts = by_question.get(r.question)
        if counts:
            answers.append(min(counts, key=lambda a: (-counts[a], a)))
        else:
            unseen += 1
            answers.append(fallback[r.answer_type])
    return answers, unseen


def majority_baselines(train: list[VqaRecord], test: list[VqaRecord]) -> dict[str, Any]:
    """Scores of answering every test question with the majority training answer (per answer type; overall) and
    with the question-only majority (the answer most often given to the same question in training)."""
    answers = majority_answers(train)
    truths, kinds = [r.answer for r in test], [r.answer_type for r in test]
    by_question, unseen = question_majority(train, test)
    return {"majority_per_type": {"answers": {k: answers[k] for k in ANSWER_TYPES},
                                  "scores": score([answers[k] for k in kinds], truths, kinds)},
            "majority_overall": {"answers": {"overall": answers["overall"]},
                                 "scores": score([answers["overall"]] * len(test), truths, kinds)},
            "question_majority": {"unseen_questions": unseen, "scores": score(by_question, truths, kinds)}}


def score_by_type(rows: Iterable[dict], field: str = "question_type") -> dict[str, dict[str, Any]]:
    """Accuracy and edit similarity per question category (VQA-RAD question_type, SLAKE content_type), most
    questions first; a question with several comma-separated types ("PRES, POS") counts under each of them."""
    sums: dict[str, Counter] = {}
    for row in rows:
        for kind in {t.strip().upper() for t in str(row.get(field) or "").split(",") if t.strip()}:
            s = sums.setdefault(kind, Counter())
            s["count"] += 1
            s["correct"] += int(row["match"])
            s["edit"] += float(row["edit_similarity"])
    order = sorted(sums, key=lambda k: (-sums[k]["count"], k))
    return {k: {"accuracy": sums[k]["correct"] / sums[k]["count"],
                "edit_similarity": sums[k]["edit"] / sums[k]["count"],
                "correct": sums[k]["correct"], "count": sums[k]["count"]} for k in order}


def format_table(rows: list[tuple[str, dict[str, dict]]], title: Optional[str] = None) -> str:
    """A plain-text table: one row per (name, scores), accuracy and edit similarity per group, with counts."""
    head = f"{'':<22} {'acc':>7} {'closed':>7} {'open':>7}   {'edit':>7} {'closed':>7} {'open':>7}   counts"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def fmt(v: Optional[float]) -> str:
        return f"{v:7.4f}" if v is not None else f"{'-':>7}"

    for name, s in rows:
        acc = " ".join(fmt(s[g]["accuracy"]) for g in GROUPS)
        edit = " ".join(fmt(s[g]["edit_similarity"]) for g in GROUPS)
        counts = "/".join(str(s[g]["count"]) for g in GROUPS)
        lines.append(f"{name:<22} {acc}   {edit}   {counts}")
    return "\n".join(lines)
