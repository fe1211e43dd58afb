#!/usr/bin/env python
"""Assemble VQA runs into the study's Table 1 (Markdown + CSV), the paper's numbers beside ours:
`python launch/make_table.py RUN_DIR[=LABEL] ... [--out DIR]`.

Each RUN_DIR holds the metrics.json written by launch/evaluate.py (or by the final evaluation of training).
LABEL is baseline | dapt | psd (DAPT+PSD) to put the paper's row beside it (or scratch: random weights; dapt-noisy /
dapt-capfilt: DAPT on noisy vs CapFilt-bootstrapped captions, no paper row); without one it is guessed from the run
directory name. The majority-answer baseline of the first run's split is added as a reference row.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

# The reference study's Table 1 (DESIGN.md section 4). Fields it does not report are None.
PAPER: dict[str, dict[str, Optional[float]]] = {
    "baseline": {"accuracy": 0.662, "accuracy_closed": 0.782, "accuracy_open": 0.492, "edit_similarity": 0.754},
    "dapt": {"accuracy": 0.723, "accuracy_closed": None, "accuracy_open": None, "edit_similarity": 0.806},
    "psd": {"accuracy": 0.742, "accuracy_closed": 0.845, "accuracy_open": 0.597, "edit_similarity": 0.828},
}
ROW_NAMES = {"baseline": "BLIP baseline", "dapt": "DAPT", "psd": "DAPT + PSD",
             "scratch": "No pretraining (random weights)",  # not in the paper: a lower bound of ours
             # not in the paper: DAPT on noisy captions vs on their CapFilt bootstrap (demo --compare, docs/capfilt.md)
             "dapt-noisy": "DAPT on noisy captions", "dapt-capfilt": "DAPT on CapFilt-bootstrapped captions"}
ALIASES = {"baseline": "baseline", "blip": "baseline", "dapt": "dapt", "psd": "psd", "dapt+psd": "psd",
           "scratch": "scratch", "dapt-noisy": "dapt-noisy", "dapt-capfilt": "dapt-capfilt"}
COLUMNS = [("accuracy", "Acc"), ("accuracy_closed", "Closed"), ("accuracy_open", "Open"),
           ("edit_similarity", "Edit sim")]
CAVEAT = ("Paper numbers: the reference study (BLIP base, image 224, frozen ViT, one P100). Its split is not "
          "stated; 66.2/74.2 fit the 450-question MEVF-style test set better than the official 451-question one. "
          "It reports edit similarity overall only, and DAPT's closed/open accuracy not at all (shown as -).")


class TableError(ValueError):
    """A run directory without usable results."""


def guess_label(run_dir: Path, doc: dict[str, Any]) -> Optional[str]:
    """baseline | dapt | psd from the directory name, else from run.init_from (scratch when it is empty);
    None when unclear."""
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
    if "questions_sha256" not in doc and (path.parent / "predictions.jsonl").is_file():  # written before the key
        try:
            rows = [json.loads(line) for line in (path.parent / "predictions.jsonl").read_text().splitlines()]
            doc["questions_sha256"] = questions_sha256(rows)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass  # unknown questions: compared by split name only, as before
    key = ALIASES.get(label.lower()) if label else guess_label(path.parent, doc)
    if label and key is None:
        raise TableError(f"{spec}: unknown label {label!r}; use baseline, dapt, psd, scratch, dapt-noisy or "
                         "dapt-capfilt")
    name = ROW_NAMES.get(key, path.parent.name) if key else path.parent.name
    return name, key, doc


def check_distinct(specs: list[str], runs: list[tuple[str, Optional[str], dict[str, Any]]]) -> None:
    """Two runs under one row name (e.g. both labelled dapt) would be two rows nobody can tell apart: refuse."""
    first: dict[str, str] = {}
    for spec, (name, _, _) in zip(specs, runs):
        if name in first:
            raise TableError(f"{first[name]} and {spec} both make the row {name!r}: give each run its own label "
                             "(DIR=baseline|dapt|psd|scratch) or leave one out")
        first[name] = spec


def questions_sha256(predictions: list[dict]) -> str:
    """recipes.common.vqa_eval.questions_sha256 (the same digest; kept here so make_table needs no torch)."""
    keys = sorted(json.dumps([str(p.get(k, "")) for k in ("qid", "image", "question", "ground_truth")])
                  for p in predictions)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def check_same_questions(specs: list[str], runs: list[tuple[str, Optional[str], dict[str, Any]]]) -> None:
    """Two runs under one split name but evaluated on different questions (another VQA-RAD copy, an eval_limit)
    would be compared as equals: refuse, naming both."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec, (_, _, doc) in zip(specs, runs):
        digest = doc.get("questions_sha256")
        if not digest:
            continue
        split = doc["split"]["split"]
        if split in seen and seen[split][1]["questions_sha256"] != digest:
            other, odoc = seen[split]
            raise TableError(f"{other} and {spec} were evaluated on different questions of split {split!r} "
                             f"({odoc.get('evaluated_questions')} and {doc.get('evaluated_questions')} questions): "
                             "not comparable; evaluate both on the same test set")
        seen.setdefault(split, (spec, doc))


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def build_rows(runs: list[tuple[str, Optional[str], dict[str, Any]]],
               data: str = "VQA-RAD") -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, split (with the data set when it is not VQA-RAD), n, then (ours, paper) per metric."""
    header = ["Model", "Split", "n"]
    for _, title in COLUMNS:
        header += [f"{title} (ours)", f"{title} (paper)"]
    rows = []

    def split(doc: dict[str, Any]) -> str:
        return doc["split"]["split"] if data == "VQA-RAD" else f"{data}, {doc['split']['split']} layout"

    for name, key, doc in runs:
        row = [name, split(doc), str(doc.get("evaluated_questions", doc["split"]["test"]))]
        paper = PAPER.get(key or "", {})
        for metric, _ in COLUMNS:
            row += [_fmt(doc["metrics"].get(metric)), _fmt(paper.get(metric))]
        rows.append(row)
    first = runs[0][2]
    base = first["baselines"]["majority_per_type"]
    answers = base["answers"]
    row = [f"Majority answer per type ({answers['closed']!r} / {answers['open']!r})", split(first),
           str(base["scores"]["overall"]["count"])]
    for metric, _ in COLUMNS:
        group = metric.split("_")[-1] if metric.startswith("accuracy_") else "overall"
        field = "edit_similarity" if metric.startswith("edit") else "accuracy"
        row += [_fmt(base["scores"][group][field]), "-"]
    rows.append(row)
    return header, rows


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
        runs = [read_run(spec) for spec in args.runs]
        check_distinct(args.runs, runs)
        check_same_questions(args.runs, runs)
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise TableError(f"--out {args.out} is a file: name a folder for table1.md and table1.csv")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header, rows = build_rows(runs, args.data)
    splits = sorted({doc["split"]["split"] for _, _, doc in runs})
    if len(splits) > 1:
        first = f"Warning: the runs use different splits ({', '.join(splits)}); their numbers are not comparable."
    elif args.data == "VQA-RAD":
        first = f"Split: {splits[0]} ({runs[0][2]['split']['description']})."
    else:  # not VQA-RAD: say so, and that only the file layout and the split rules are VQA-RAD's
        first = (f"Data: {args.data}, not VQA-RAD. The questions are in VQA-RAD's file layout and split by the rules "
                 f"of its '{splits[0]}' split ({runs[0][2]['split']['description']}). The paper's columns are BLIP "
                 "base on the real VQA-RAD, shown for the layout only: not comparable with these rows.")
    notes = [first, "Inference: " + "; ".join(f"{name}: {doc['inference']['mode']}" for name, _, doc in runs) + ".",
             CAVEAT]
    text = markdown(header, rows, notes)
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
