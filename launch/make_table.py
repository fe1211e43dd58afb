#!/usr/bin/env python
"""Assemble VQA runs into the study's Table 1 (Markdown + CSV), the paper's numbers beside ours:
`python launch/make_table.py RUN_DIR[=LABEL] ... [--out DIR]`.

Each RUN_DIR holds the metrics.json written by launch/evaluate.py (or by the final evaluation of training).
LABEL is baseline | dapt | psd (DAPT+PSD) to put the paper's row beside it (or scratch: random weights; dapt-noisy /
dapt-capfilt: DAPT on noisy vs CapFilt-bootstrapped captions; blank: evaluate.py --blank-image, the fine-tuned model
with every image replaced by a constant one; no paper row); without one it is guessed from the run directory name.
The majority-answer and question-only baselines of the first run's split are added as reference rows.

Statistics: each of our cells gives a 95% interval by bootstrap over images (from metrics.json, or computed from
predictions.jsonl beside it); the last two columns give paired tests of each run against the first run on the same
questions (exact McNemar for accuracy, paired bootstrap over images for edit similarity). Runs that share a label
and differ in train.seed are one row: mean, sd and n over the seeds. A per-type table follows (VQA-RAD question_type,
SLAKE content_type).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.common.vqa_document import questions_sha256  # noqa: E402  (evaluate.py's digest, without torch)

# The reference study's Table 1. Fields it does not report are None.
PAPER: dict[str, dict[str, Optional[float]]] = {
    "baseline": {"accuracy": 0.662, "accuracy_closed": 0.782, "accuracy_open": 0.492, "edit_similarity": 0.754},
    "dapt": {"accuracy": 0.723, "accuracy_closed": None, "accuracy_open": None, "edit_similarity": 0.806},
    "psd": {"accuracy": 0.742, "accuracy_closed": 0.845, "accuracy_open": 0.597, "edit_similarity": 0.828},
}
ROW_NAMES = {"baseline": "BLIP baseline", "dapt": "DAPT", "psd": "DAPT + PSD",
             "scratch": "No pretraining (random weights)",  # not in the paper: a lower bound of ours
             # not in the paper: DAPT on noisy captions vs on their CapFilt bootstrap (demo --compare, docs/capfilt.md)
             "dapt-noisy": "DAPT on noisy captions", "dapt-capfilt": "DAPT on CapFilt-bootstrapped captions",
             # not in the paper: evaluate.py --blank-image, how much of the score the image earns
             "blank": "Blank image (fine-tuned model, constant grey image)"}
ALIASES = {"baseline": "baseline", "blip": "baseline", "dapt": "dapt", "psd": "psd", "dapt+psd": "psd",
           "scratch": "scratch", "dapt-noisy": "dapt-noisy", "dapt-capfilt": "dapt-capfilt", "blank": "blank"}
COLUMNS = [("accuracy", "Acc"), ("accuracy_closed", "Closed"), ("accuracy_open", "Open"),
           ("edit_similarity", "Edit sim")]
CAVEAT = ("Paper numbers: the reference study (BLIP base, image 224, frozen ViT, one P100). Its split is not "
          "stated; 66.2/74.2 fit the 450-question MEVF-style test set better than the official 451-question one. "
          "It reports edit similarity overall only, and DAPT's closed/open accuracy not at all (shown as -).")


STATS_NOTE = ("Ours: value [95% interval, bootstrap over images, 2000 resamples, seed 0], or mean ± sd (n seeds) when "
              "runs share a label. p: paired test against the first row on the same questions; a difference "
              "whose p is above 0.05 is within what re-drawing the test images would change (docs/vqa.md).")


class TableError(ValueError):
    """A run directory without usable results."""


def guess_label(run_dir: Path, doc: dict[str, Any]) -> Optional[str]:
    """baseline | dapt | psd from the directory name, else from run.init_from (scratch when it is empty);
    None when unclear."""
    if doc.get("blank_image"):
        return "blank"
    name = run_dir.name.lower()
    for key in ("psd", "dapt", "baseline"):
        if key in name:
            return key
    init = str(doc.get("init_from") or "").lower()
    if "psd" in init:
        return "psd"
    if "dapt" in init:
        return "dapt"
    if init.endswith("model_base.pth"):
        return "baseline"
    if not init or init in ("none", "null"):
        return "scratch"  # fine-tuned from random weights
    return None


def read_run(spec: str) -> tuple[str, Optional[str], dict[str, Any]]:
    """'DIR' or 'DIR=LABEL' -> (display name, paper label or None, metrics.json contents)."""
    where, _, label = spec.partition("=")
    run_dir = Path(where)
    path = run_dir / "metrics.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no metrics.json (run launch/evaluate.py on it first)")
    try:
        doc = json.loads(path.read_text())
        doc["metrics"], doc["scores"], doc["split"]["split"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):  # a binary file too: name the path
        raise TableError(f"{path}: not a VQA metrics.json (expected the keys 'metrics', 'scores' and "
                         "'split')") from None
    key = ALIASES.get(label.lower()) if label else guess_label(path.parent, doc)
    if label and key is None:
        raise TableError(f"{spec}: unknown label {label!r}; use baseline, dapt, psd, scratch, dapt-noisy, "
                         "dapt-capfilt or blank")
    preds = path.parent / "predictions.jsonl"
    if preds.is_file():  # per-question results: intervals for older metrics.json files and the paired tests
        try:
            doc["_predictions"] = [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TableError(f"{preds}: not JSON lines (re-run launch/evaluate.py)") from None
        if "questions_sha256" not in doc:  # written before the key: the same digest from the predictions
            with contextlib.suppress(AttributeError):
                doc["questions_sha256"] = questions_sha256(doc["_predictions"])
    name = ROW_NAMES.get(key, path.parent.name) if key else path.parent.name
    return name, key, doc


def group_runs(specs: list[str], runs: list[tuple[str, Optional[str], dict[str, Any]]]
               ) -> list[tuple[str, Optional[str], list[dict[str, Any]]]]:
    """Runs under one row name become one row when they are seeds of one configuration (distinct train.seed, same
    number of questions); otherwise two runs under one name would be two rows nobody can tell apart: refuse."""
    groups: dict[str, tuple[Optional[str], list[dict[str, Any]], list[str]]] = {}
    for spec, (name, key, doc) in zip(specs, runs):
        if name in groups:
            _, docs, given = groups[name]
            seeds = [d.get("seed") for d in docs]
            if doc.get("seed") is None or doc.get("seed") in seeds or None in seeds:
                raise TableError(f"{given[0]} and {spec} both make the row {name!r}: give each run its own label "
                                 "(DIR=baseline|dapt|psd|scratch) or leave one out (runs of one label with different "
                                 "train.seed are aggregated)")
            if _count(doc) != _count(docs[0]):
                raise TableError(f"{given[0]} and {spec}: seeds of one row must answer the same questions "
                                 f"({_count(docs[0])} vs {_count(doc)})")
            docs.append(doc)
            given.append(spec)
        else:
            groups[name] = (key, [doc], [spec])
    return [(name, key, docs) for name, (key, docs, _) in groups.items()]


def check_distinct(specs: list[str], runs: list[tuple[str, Optional[str], dict[str, Any]]]) -> None:
    """Refuse two runs under one row name unless they are seeds of one configuration (see group_runs)."""
    group_runs(specs, runs)


def _count(doc: dict[str, Any]) -> int:
    return int(doc.get("evaluated_questions", (doc.get("split") or {}).get("test", 0)))


def check_same_questions(specs: list[str], runs: list[tuple[str, Optional[str], dict[str, Any]]]) -> None:
    """Two runs under one split name but evaluated on different questions (another VQA-RAD copy, an eval_limit)
    would be compared as equals: refuse, naming both."""
    seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for spec, (_, _, doc) in zip(specs, runs):
        digest = doc.get("questions_sha256")
        if not digest:
            continue
        name, dataset = doc["split"]["split"], doc["split"].get("dataset", "vqa_rad")
        split = (dataset, name)  # VQA-RAD and SLAKE share split names
        if split in seen and seen[split][1]["questions_sha256"] != digest:
            other, odoc = seen[split]
            raise TableError(f"{other} and {spec} were evaluated on different questions of split {name!r} ({dataset}) "
                             f"({odoc.get('evaluated_questions')} and {doc.get('evaluated_questions')} questions): "
                             "not comparable; evaluate both on the same test set")
        seen.setdefault(split, (spec, doc))


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def _p(v: Optional[float]) -> str:
    return "-" if v is None else ("<0.001" if v < 0.001 else f"{v:.3f}")


def _group_field(metric: str) -> tuple[str, str]:
    """accuracy_closed -> (closed, accuracy); edit_similarity -> (overall, edit_similarity)."""
    group = metric.split("_")[-1] if metric.startswith("accuracy_") else "overall"
    return group, "edit_similarity" if metric.startswith("edit") else "accuracy"


def intervals(doc: dict[str, Any]) -> dict[str, Any]:
    """The run's 95% intervals per group: metrics.json's, else computed from predictions.jsonl, else none."""
    from recipes.common.stats import prediction_intervals

    if "intervals" in doc:
        return doc["intervals"].get("groups", {})
    preds = doc.get("_predictions")
    if preds and all(k in preds[0] for k in ("image", "match", "edit_similarity")):
        doc["intervals"] = {"groups": prediction_intervals(preds)}
        return doc["intervals"]["groups"]
    return {}


def cell(docs: list[dict[str, Any]], metric: str) -> str:
    """One run: the value and its 95% interval; several seeds: mean +- sd (n)."""
    from recipes.common.stats import seed_aggregate

    if len(docs) > 1:
        agg = seed_aggregate([d["metrics"].get(metric) for d in docs])
        if agg["mean"] is None:
            return "-"
        return f"{agg['mean']:.3f} ± {agg['sd']:.3f} (n={agg['n']})"
    value = docs[0]["metrics"].get(metric)
    group, field = _group_field(metric)
    ci = intervals(docs[0]).get(group, {}).get(field)
    return _fmt(value) if value is None or not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _questions(doc: dict[str, Any]) -> Optional[list[tuple[str, str]]]:
    preds = doc.get("_predictions")
    return [(str(p.get("qid")), str(p.get("question"))) for p in preds] if preds else None


def paired(reference: list[dict[str, Any]], docs: list[dict[str, Any]]) -> tuple[Optional[float], Optional[float]]:
    """p-values of one run against the reference run (exact McNemar on accuracy, paired bootstrap over images on
    edit similarity); None when either is a seed aggregate or they did not answer the same questions."""
    from recipes.common.stats import paired_accuracy_test, paired_bootstrap_test

    if len(reference) != 1 or len(docs) != 1 or reference[0] is docs[0]:
        return None, None
    qa, qb = _questions(reference[0]), _questions(docs[0])
    if qa is None or qa != qb:
        return None, None
    a, b = reference[0]["_predictions"], docs[0]["_predictions"]
    acc = paired_accuracy_test([p["match"] for p in a], [p["match"] for p in b])["p"]
    edit = paired_bootstrap_test([p["edit_similarity"] for p in a], [p["edit_similarity"] for p in b],
                                 [p["image"] for p in a])["p"]
    return acc, edit


def build_rows(runs: list[tuple[str, Optional[str], Any]],
               data: str = "VQA-RAD") -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, split (with the data set when it is not VQA-RAD), n, then (ours with its 95%
    interval, paper) per metric, then the paired p-values against the first run."""
    groups = [(name, key, docs if isinstance(docs, list) else [docs]) for name, key, docs in runs]
    header = ["Model", "Split", "n"]
    for _, title in COLUMNS:
        header += [f"{title} (ours)", f"{title} (paper)"]
    header += [f"p acc vs {groups[0][0]} (McNemar)", f"p edit vs {groups[0][0]} (bootstrap)"]
    rows = []

    def dataset(doc: dict[str, Any]) -> str:
        return (doc.get("split") or {}).get("dataset", "vqa_rad")

    def split(doc: dict[str, Any]) -> str:
        sp = doc["split"]
        if dataset(doc) != "vqa_rad":  # SLAKE / PathVQA: the release's split, and which part was scored
            from recipes.common.vqa_rad import DATASET_NAMES

            return f"{DATASET_NAMES.get(dataset(doc), dataset(doc))} {sp.get('evaluated', 'test')}"
        return sp["split"] if data == "VQA-RAD" else f"{data}, {sp['split']} layout"

    for name, key, docs in groups:
        doc = docs[0]
        row = [name, split(doc), str(_count(doc))]
        # the study's numbers are VQA-RAD's: never beside another data set's
        paper = PAPER.get(key or "", {}) if dataset(doc) == "vqa_rad" else {}
        for metric, _ in COLUMNS:
            row += [cell(docs, metric), _fmt(paper.get(metric))]
        row += [_p(v) for v in paired(groups[0][2], docs)]
        rows.append(row)
    first = groups[0][2][0]
    base = first["baselines"]["majority_per_type"]
    answers = base["answers"]
    rows.append(_baseline_row(f"Majority answer per type ({answers['closed']!r} / {answers['open']!r})",
                              split(first), base["scores"]))
    qm = first["baselines"].get("question_majority")
    if qm:  # the question alone: the training answer most often given to the same question
        rows.append(_baseline_row(f"Question-only majority ({qm['unseen_questions']} unseen questions)",
                                  split(first), qm["scores"]))
    return header, rows


def _baseline_row(label: str, where: str, scores: dict[str, Any]) -> list[str]:
    """A baseline's table row: its scores, no paper figure, no interval or p-value."""
    row = [label, where, str(scores["overall"]["count"])]
    for metric, _ in COLUMNS:
        group, field = _group_field(metric)
        row += [_fmt(scores[group][field]), "-"]
    return row + ["-", "-"]


def type_table(runs: list[tuple[str, Optional[str], list[dict[str, Any]]]]) -> Optional[str]:
    """Accuracy per question type (VQA-RAD question_type, SLAKE content_type) of each single run, as Markdown."""
    with_types = [(name, docs[0]["by_type"]) for name, _, docs in runs if len(docs) == 1 and "by_type" in docs[0]]
    if not with_types:
        return None
    field = with_types[0][1].get("field", "question_type")
    types = list(with_types[0][1]["groups"])
    header = [field] + [f"{name} acc (n)" for name, _ in with_types]
    rows = []
    for t in types:
        cells = []
        for _, by in with_types:
            g = by["groups"].get(t)
            cells.append(f"{g['accuracy']:.3f} ({g['count']})" if g else "-")
        rows.append([t] + cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.json files), optionally =LABEL")
    parser.add_argument("--out", default=None, help="write table1.md and table1.csv into this directory")
    parser.add_argument("--data", default="VQA-RAD",
                        help="what the questions are when not VQA-RAD (the demo: phantoms); named in the table")
    args = parser.parse_args(argv)
    try:
        singles = [read_run(spec) for spec in args.runs]
        check_same_questions(args.runs, singles)
        runs = group_runs(args.runs, singles)
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise TableError(f"--out {args.out} is a file: name a folder for table1.md and table1.csv")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header, rows = build_rows(runs, args.data)
    # a split is the data set's and the part scored: SLAKE's 'official' test is not VQA-RAD's 'official' test
    splits = sorted({" ".join(x for x in (doc["split"].get("dataset", ""), doc["split"]["split"],
                                          doc["split"].get("evaluated", "")) if x and x not in ("vqa_rad", "test"))
                     for _, _, doc in singles})
    if len(splits) > 1:
        first = f"Warning: the runs use different splits ({', '.join(splits)}); their numbers are not comparable."
    elif args.data == "VQA-RAD":
        first = f"Split: {splits[0]} ({singles[0][2]['split']['description']})."
    else:  # not VQA-RAD: say so, and that only the file layout and the split rules are VQA-RAD's
        first = (f"Data: {args.data}, not VQA-RAD. The questions are in VQA-RAD's file layout and split by the rules "
                 f"of its '{splits[0]}' split ({singles[0][2]['split']['description']}). The paper's columns are BLIP "
                 "base on the real VQA-RAD, shown for the layout only: not comparable with these rows.")
    notes = [first, "Inference: " + "; ".join(f"{name}: {docs[0]['inference']['mode']}" for name, _, docs in runs)
             + ".", STATS_NOTE, CAVEAT]
    text = markdown(header, rows, notes)
    types = type_table(runs)
    if types:
        text += "\n" + types
    print(text, end="")
    if args.out:
        out = Path(args.out)
        buf = io.StringIO()
        csv.writer(buf).writerows([header] + rows)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "table1.md").write_text(text)
            (out / "table1.csv").write_text(buf.getvalue())
        except OSError as e:  # a read-only folder, a full disk: one line naming the path
            print(f"error: --out {out}: cannot write {e.filename or out} ({e.strerror})", file=sys.stderr)
            return 2
        print(f"wrote {out / 'table1.md'} and {out / 'table1.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
