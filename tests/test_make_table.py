"""launch/make_table.py: one row per run; two runs under one row name are refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_launch

main = load_launch("make_table").main


def _run(root: Path, name: str, init: str | None = None) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps({"metrics": {}, "scores": {}, "split": {"split": "official"},
                                                            "init_from": init}))
    return root / name


@pytest.mark.parametrize("specs", [
    lambda t: [f"{_run(t, 'a')}=dapt", f"{_run(t, 'b')}=dapt"],  # the same label given twice
    lambda t: [str(_run(t, "vqa-dapt")), f"{_run(t, 'other')}=DAPT"],  # guessed from the name, then given
    lambda t: [str(_run(t / "x", "run1", init="w.pth")), str(_run(t / "y", "run1", init="v.pth"))],  # same name
])
def test_two_runs_under_one_row_name_are_refused(tmp_path, capsys, specs):
    args = specs(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {args[0]} and {args[1]} both make the row"), err
    assert "give each run its own label" in err[0]


# ----------------------------------------------------------------------------- statistics in the table


def _write_run(root: Path, name: str, matches: list[bool], seed: int = 0, dataset: str = "vqa_rad",
               blank: bool = False) -> Path:
    """A run directory as launch/evaluate.py leaves it: metrics.json (via write_results) + predictions.jsonl."""
    from recipes.common.vqa_eval import write_results
    from recipes.common.vqa_metrics import flatten, score

    kinds = ["closed" if i % 2 else "open" for i in range(len(matches))]
    preds = [{"qid": str(i), "image": f"img{i // 2}.jpg", "question": f"q{i}", "answer_type": kinds[i],
              "question_type": "PRES" if i % 3 else "POS", "ground_truth": "yes",
              "prediction": "yes" if m else "no", "match": m, "edit_similarity": 1.0 if m else 0.0}
             for i, m in enumerate(matches)]
    scores = score([p["prediction"] for p in preds], ["yes"] * len(preds), kinds)
    majority = {"answers": {"closed": "no", "open": "yes"}, "scores": scores}
    doc = {"split": {"split": "official", "dataset": dataset, "evaluated": "test", "test": len(preds),
                     "description": "the test split"},
           "evaluated_questions": len(preds), "scores": scores, "metrics": flatten(scores),
           "inference": {"mode": "rank"}, "seed": seed, "init_from": None, "blank_image": blank,
           "baselines": {"majority_per_type": majority, "majority_overall": majority,
                         "question_majority": {"unseen_questions": 3, "scores": scores}}}
    return write_results(root / name, doc, preds)


def _table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in text.splitlines() if line.startswith("| "))}


def test_table_gives_intervals_and_the_paired_mcnemar_p(tmp_path, capsys):
    # 20 questions; B gets 6 right that A got wrong and 1 wrong that A got right: McNemar p = 0.125 by hand
    a = [True] * 8 + [False] * 12
    b = [True] * 7 + [False] + [True] * 6 + [False] * 6
    ra, rb = _write_run(tmp_path, "vqa-dapt", a), _write_run(tmp_path, "vqa-psd", b)
    assert main([f"{ra}=dapt", f"{rb}=psd", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    psd, dapt = rows["DAPT + PSD"], rows["DAPT"]
    assert psd[-2] == "0.125" and dapt[-2] == "-"  # the first row is the reference
    acc = json.loads((rb / "metrics.json").read_text())["intervals"]["groups"]["overall"]["accuracy"]
    assert psd[3] == f"0.650 [{acc[0]:.3f}, {acc[1]:.3f}]" and acc[0] < 0.65 < acc[1]
    assert psd[4] == "0.742"  # the study's row beside ours
    assert rows["Question-only majority (3 unseen questions)"][1] == "official"
    assert "| question_type | DAPT acc (n) | DAPT + PSD acc (n) |" in out  # the per-type breakdown
    assert "bootstrap over images" in out and (tmp_path / "t" / "table1.csv").is_file()


def test_seeds_of_one_label_are_aggregated_and_one_seed_twice_is_refused(tmp_path, capsys):
    runs = [_write_run(tmp_path / f"s{s}", "vqa-psd", [True] * k + [False] * (10 - k), seed=s)
            for s, k in ((1, 6), (2, 7), (3, 8))]
    assert main([str(r) for r in runs]) == 0
    row = _table_rows(capsys.readouterr().out)["DAPT + PSD"]
    assert row[3] == "0.700 ± 0.100 (n=3)"  # mean 0.7, sd of 0.6/0.7/0.8 = 0.1
    again = _write_run(tmp_path / "again", "vqa-psd", [True] * 10, seed=2)
    assert main([str(runs[1]), str(again)]) == 2
    assert "both make the row 'DAPT + PSD'" in capsys.readouterr().err


def test_other_data_sets_never_get_the_studys_numbers(tmp_path, capsys):
    slake = _write_run(tmp_path, "slake-psd", [True, False] * 5, dataset="slake")
    blank = _write_run(tmp_path / "b", "blank_image", [False] * 10, dataset="slake", blank=True)
    assert main([f"{slake}=psd", str(blank)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows["DAPT + PSD"][1] == "SLAKE test" and rows["DAPT + PSD"][4] == "-"
    assert rows["Blank image (fine-tuned model, constant grey image)"][-2] == "0.062"  # McNemar b=0, c=5: 2/32
