"""End to end on the real VQA-RAD: a tiny model fine-tunes on the training questions through launch/train.py and is
evaluated on the official test set through launch/evaluate.py; then Table 1, the export, and bad-input handling."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, load_launch, run_entry

RECIPE = str(ROOT / "recipes" / "medblip" / "vqa.yaml")


def tiny_overrides(run_dir, data_root) -> list[str]:
    return [f"run.dir={run_dir}", "run.init_from=null", f"vqa.root={data_root}", "model.preset=tiny",
            "image.size=32", "train.max_steps=6", "train.lr=1e-3", "train.warmup_steps=0", "data.batch_size=8",
            "data.num_workers=0", "train.precision=fp32", "deepspeed={}", "run.save_every=0", "run.eval_every=0",
            "vqa.k_test=4", "vqa.eval_limit=40"]


@pytest.mark.slow
def test_finetune_and_evaluate_on_real_vqa_rad(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    over = tiny_overrides(run_dir, shared_data / "vqa_rad")
    train = run_entry("train.py", "--recipe", RECIPE, *over)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "split 'official'" in train.stdout and "test 451 (272 closed / 179 open)" in train.stdout
    assert (run_dir / "eval" / "step_00000006" / "metrics.json").is_file()  # the final evaluation of training

    # the whole official test set through launch/evaluate.py
    ev = run_entry("evaluate.py", "--recipe", RECIPE, *over, "vqa.eval_limit=null")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "majority per type" in ev.stdout and "451/272/179" in ev.stdout
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["split"]["split"] == "official" and doc["evaluated_questions"] == 451
    assert [doc["scores"][g]["count"] for g in ("overall", "closed", "open")] == [451, 272, 179]
    assert doc["inference"]["mode"] == "rank" and doc["inference"]["k_test"] == 4
    assert doc["baselines"]["majority_per_type"]["answers"] == {"closed": "no", "open": "axial"}
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 451
    assert {"question", "answer_type", "ground_truth", "prediction", "match", "edit_similarity"} <= set(rows[0])
    assert sum(r["match"] for r in rows) == doc["scores"]["overall"]["correct"]
    assert doc["metrics"]["accuracy"] == pytest.approx(sum(r["match"] for r in rows) / 451)

    # the frozen ViT left the engine exactly as it was built; the question encoder learned
    from framework.config import load_config
    from recipes.medblip.vqa import build_model

    fresh = build_model(load_config(RECIPE, over), load_weights=False).state_dict()
    tags = sorted((run_dir / "checkpoints").glob("step_*"))
    trained = torch.load(tags[-1] / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    vision = [k for k in fresh if k.startswith("visual_encoder.")]
    assert vision and all(torch.equal(fresh[k], trained[k]) for k in vision)
    assert not torch.equal(fresh["text_encoder.embeddings.word_embeddings.weight"],
                           trained["text_encoder.embeddings.word_embeddings.weight"])

    # generation mode on a slice, into its own directory
    gen = run_entry("evaluate.py", "--recipe", RECIPE, *over, "vqa.inference=generate", "--out",
                    str(tmp_path / "gen"))
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert json.loads((tmp_path / "gen" / "metrics.json").read_text())["inference"]["mode"] == "generate"

    # Table 1 and the transformers export
    table = run_entry("make_table.py", f"{run_dir}=psd", "--out", str(tmp_path / "table"))
    assert table.returncode == 0, table.stderr
    assert "| DAPT + PSD | official | 451 |" in table.stdout and "0.742" in table.stdout
    assert (tmp_path / "table" / "table1.csv").read_text().startswith("Model,Split,n,")
    export = run_entry("export_hf.py", "--recipe", RECIPE, *over, "--out", str(tmp_path / "hf"))
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _main(script: str):
    """launch/<script>'s main(), imported in-process."""
    return load_launch(script[:-3]).main


def test_entry_points_report_bad_input_in_one_line(tmp_path, capsys):
    # one real process: exit status and stderr as a user sees them
    result = run_entry("evaluate.py", "--recipe", RECIPE, f"run.dir={tmp_path / 'none'}", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no complete checkpoint")
    # the rest in-process through the same main() and run_cli
    cases = [
        ("evaluate.py", ["--recipe", RECIPE, f"run.dir={tmp_path}", "--checkpoint", str(tmp_path),
                         f"vqa.root={tmp_path / 'absent'}"], "vqa.root"),
        ("evaluate.py", ["--recipe", RECIPE, "vqa.split=random"], "vqa.split"),
        ("evaluate.py", ["--recipe", str(tmp_path / "missing.yaml")], "recipe file not found"),
        ("make_table.py", [str(tmp_path / "absent")], "no metrics.json"),
        ("export_hf.py", ["--recipe", RECIPE, f"run.dir={tmp_path / 'none'}", "--out", str(tmp_path / "x")],
         "no complete checkpoint"),
    ]
    for script, args, message in cases:
        assert _main(script)(args) == 2, (script, args)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (script, err)


def test_table_rows_are_named_from_the_run(tmp_path):
    """make_table names a row by its label, else its directory, else what it was fine-tuned from."""
    table = load_launch("make_table")
    cases = [("vqa-psd", "runs/x/checkpoints", None, "DAPT + PSD"),
             ("run1", "runs/medblip-dapt", None, "DAPT"),
             ("run2", "/models/model_base.pth", None, "BLIP baseline"),
             ("run3", None, None, "No pretraining (random weights)"),
             ("run4", "somewhere/else.pth", None, "run4"),
             ("run5", None, "psd", "DAPT + PSD")]
    for name, init, label, expected in cases:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"metrics": {}, "scores": {}, "init_from": init}))
        spec_arg = f"{tmp_path / name}={label}" if label else str(tmp_path / name)
        assert table.read_run(spec_arg)[0] == expected, (name, init, label)
