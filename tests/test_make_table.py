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
