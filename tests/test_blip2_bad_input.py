"""BLIP-2's share of issue 22: a typo or a list in a tower size, export and evaluation of a BLIP-2 run with the wrong
tool or recipe, missing weight files, transformers' Q-Former embedding warning: one line each, naming what to fix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from framework.config import ConfigError, config_to_dict, load_config
from recipes.blip2.build import build_model
from recipes.medblip.model.weights import CheckpointError
from tests.conftest import ROOT, load_launch, run_entry

DEMO = ROOT / "recipes" / "blip2" / "demo"


@pytest.mark.parametrize("override, says", [
    ("model.vision.hiden_size=64", "model.vision.hiden_size: unknown key (Blip2VisionConfig has no such field; "
                                   "did you mean hidden_size?)"),
    ("model.qformer.num_hiden_layers=2", "model.qformer.num_hiden_layers: unknown key"),
    ("model.text.ffn_dimm=64", "model.text.ffn_dimm: unknown key (OPTConfig"),
    ("model.vision.hidden_size=[64]", "model.vision.hidden_size: expected int, got [64]"),
    ("model.qformer.num_hidden_layers=[2]", "model.qformer.num_hidden_layers: expected int, got [2]"),
    ("model.vision.qkv_bias=1", "model.vision.qkv_bias: expected bool, got 1"),
    ("model.vision.layer_norm_eps=abc", "model.vision.layer_norm_eps: expected float, got 'abc'"),
])
def test_tower_keys_and_types_are_checked_at_load(override: str, says: str):
    """transformers keeps an unknown keyword as a silent attribute (the typo trained the default size), and a list
    reached its strict dataclass validation as a traceback."""
    with pytest.raises(ConfigError) as e:
        load_config(DEMO / "stage1.yaml", [override])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_tower_numbers_written_as_integers_or_yaml_strings_become_floats():
    cfg = load_config(DEMO / "stage1.yaml", ["model.vision.layer_norm_eps=1e-6", "model.qformer.layer_norm_eps=1"])
    assert cfg.model.vision["layer_norm_eps"] == 1e-6 and cfg.model.qformer["layer_norm_eps"] == 1.0
    for recipe in ("stage1", "stage2", "vqa", "lm"):  # every shipped recipe passes the checks
        load_config(DEMO / f"{recipe}.yaml")
    for recipe in ("stage1", "stage2", "vqa"):
        load_config(ROOT / "recipes" / "blip2" / f"{recipe}.yaml")
    load_config(ROOT / "recipes" / "blip2" / "vqa.yaml", ["model.preset=blip2-flan-t5-xl"])


@pytest.mark.slow
def test_a_list_for_a_size_ends_train_py_in_one_line():
    r = run_entry("train.py", "--recipe", str(DEMO / "stage1.yaml"), "model.vision.hidden_size=[64]")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "model.vision.hidden_size: expected int, got [64]" in r.stderr + r.stdout


def test_missing_blip2_weights_name_the_key_and_say_nothing_is_downloaded(tmp_path):
    cfg = load_config(ROOT / "recipes" / "blip2" / "stage1.yaml",
                      ["run.init_from=null", f"model.vision_weights={tmp_path / 'eva_vit_g.pth'}"])
    with pytest.raises(CheckpointError) as e:
        build_model(cfg, stage="stage1")
    msg = str(e.value)
    assert msg.startswith(f"model.vision_weights: checkpoint not found: {tmp_path / 'eva_vit_g.pth'}")
    assert "nothing is downloaded" in msg and "model.vision_weights=null" in msg and "\n" not in msg
    cfg = load_config(ROOT / "recipes" / "blip2" / "stage1.yaml", ["model.vision_weights=null"])  # init_from missing
    with pytest.raises(CheckpointError, match=r"^run\.init_from: checkpoint not found: checkpoints/blip2/"):
        build_model(cfg, stage="stage1")
    troubleshooting = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert "| `model.vision_weights: checkpoint not found" in troubleshooting


def _fake_run(root: Path, recipe: Path) -> Path:
    """A run directory as training leaves it (config.yaml + checkpoints/), enough for evaluate/export to judge it."""
    run = root / recipe.parent.parent.name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(recipe))))
    return run


@pytest.mark.parametrize("trained, evaluated", [("blip2", "medblip"), ("medblip", "blip2")])
def test_evaluating_a_run_with_the_other_familys_recipe_names_the_run_s_recipe(tmp_path, capsys, trained, evaluated):
    """It said "unknown key model.end_text" and blamed the recipe given, not the mismatch."""
    run = _fake_run(tmp_path, ROOT / "recipes" / trained / "demo" / "vqa.yaml")
    rc = load_launch("evaluate").main(["--recipe", str(ROOT / "recipes" / evaluated / "demo" / "vqa.yaml"),
                                       "--checkpoint", str(run)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert f"was trained with recipes.{trained}.vqa" in err and "unknown key" not in err


def test_export_of_a_blip2_run_is_refused_in_one_line(tmp_path, capsys):
    """export_hf.py writes BlipForQuestionAnswering (MedBLIP); a BLIP-2 run ended in an AttributeError ('vit')."""
    run = _fake_run(tmp_path, DEMO / "vqa.yaml")
    rc = load_launch("export_hf").main(["--checkpoint", str(run), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "exports MedBLIP VQA models" in err and "recipes.blip2.vqa" in err
    assert not (tmp_path / "out").exists()


def test_the_qformer_embedding_warning_is_silenced_and_nothing_else():
    """transformers warned "Blip2QFormerModel does not expose input embeddings" on every command with
    model.grad_checkpointing (the full-size recipes): our embeddings live outside the Q-Former. Run in a fresh
    process: transformers prints a warning once per process."""
    code = ("import logging; from tests.blip2_tiny import stage1; m = stage1(grad_checkpointing=True); "
            "lg = logging.getLogger('transformers.modeling_utils'); assert not lg.filters, lg.filters; "
            "from transformers.utils import logging as tl; tl.get_logger('transformers.modeling_utils')"
            ".warning('does not expose input embeddings (another caller)')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Blip2QFormerModel does not expose input embeddings" not in r.stderr + r.stdout
    assert "(another caller)" in r.stderr  # the filter is gone after the build: other warnings still print
