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
        (tmp_path / name / "metrics.json").write_text(json.dumps({"metrics": {}, "scores": {}, "init_from": init,
                                                                  "split": {"split": "official"}}))
        spec_arg = f"{tmp_path / name}={label}" if label else str(tmp_path / name)
        assert table.read_run(spec_arg)[0] == expected, (name, init, label)


@pytest.mark.slow
def test_a_run_directory_alone_says_how_to_evaluate_it(tmp_path):
    """evaluate.py takes the model's shape from the checkpoint run's config.yaml: --checkpoint RUN alone works, and
    --recipe vqa.yaml (base sizes) with a tiny run no longer fails on shapes; a DAPT run is evaluated with a warning."""
    from corpora.phantoms import PhantomSpec, write_caption_shards, write_vqa

    spec = PhantomSpec(image_size=32, vqa_train_images=8, vqa_test_images=4, questions_per_image=2,
                       samples_per_shard=8)
    write_vqa(tmp_path / "vqa", spec)
    write_caption_shards(tmp_path / "shards", spec, "train", 16)
    run = tmp_path / "run"
    train = run_entry("train.py", "--recipe", RECIPE, *tiny_overrides(run, tmp_path / "vqa"), "train.max_steps=2")
    assert train.returncode == 0, train.stderr[-3000:]
    alone = run_entry("evaluate.py", "--checkpoint", str(run), "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    shaped = run_entry("evaluate.py", "--recipe", RECIPE, "--checkpoint", str(run), f"vqa.root={tmp_path / 'vqa'}",
                       "--out", str(tmp_path / "shaped"))
    assert shaped.returncode == 0, shaped.stderr[-3000:]
    assert f"model: the checkpoint's own shape from {run / 'config.yaml'}" in shaped.stdout
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["scores"] for d in ("alone", "shaped"))
    assert a == b  # the same weights, the same model, the same answers

    dapt = tmp_path / "dapt"
    pre = run_entry("train.py", "--recipe", str(ROOT / "recipes" / "medblip" / "dapt.yaml"), f"run.dir={dapt}",
                    "run.init_from=null", f"data.train={tmp_path / 'shards'}", "data.val=null", "model.preset=tiny",
                    "image.size=32", "model.queue_size=8", "data.batch_size=4", "train.grad_accum=1",
                    "train.epochs=null", "train.max_steps=1", "data.num_workers=0", "train.warmup_steps=0")
    assert pre.returncode == 0, pre.stderr[-3000:]
    ev = run_entry("evaluate.py", "--recipe", RECIPE, "--checkpoint", str(dapt), f"vqa.root={tmp_path / 'vqa'}",
                   "--out", str(tmp_path / "from_dapt"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "is a pretraining run (recipes.medblip.pretrain): its answer decoder was never fine-tuned" in ev.stdout
    refused = run_entry("evaluate.py", "--checkpoint", str(dapt))
    assert refused.returncode == 2 and "evaluate it with --recipe recipes/medblip/vqa.yaml" in refused.stderr
