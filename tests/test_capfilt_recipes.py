"""CapFilt's recipes: the captioner (LM only) and the filter (ITC + ITM) fine-tune from a DAPT run, capfilt takes
them apart or one model for both, and dapt_capfilt.yaml trains on the bootstrapped shards; MedPix shards too."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.capfilt_tiny as tiny
from framework.build import build_run
from framework.config import config_to_dict, flatten, import_recipe, load_config
from framework.distributed import init_distributed
from framework.engine import fit
from framework.run_env import run_env
from recipes.medblip.capfilt.bootstrap import run_capfilt
from recipes.medblip.pretrain import enabled_objectives
from tests.conftest import ROOT

MEDBLIP = ROOT / "recipes" / "medblip"
QUIET = dict(log=lambda s: None)


def test_recipes_load_with_blips_objectives_and_change_only_what_they_say() -> None:
    dapt = flatten(config_to_dict(load_config(MEDBLIP / "dapt.yaml")))
    expected = {"capfilt_captioner.yaml": {"lm"}, "capfilt_filter.yaml": {"itc", "itm"},
                "dapt_capfilt.yaml": {"itc", "itm", "lm"}, "demo/capfilt_captioner.yaml": {"lm"},
                "demo/capfilt_filter.yaml": {"itc", "itm"}}
    for name, objectives in expected.items():
        cfg = load_config(MEDBLIP / name)
        assert enabled_objectives(cfg) == objectives, name
    capfilt = flatten(config_to_dict(load_config(MEDBLIP / "dapt_capfilt.yaml")))
    changed = {k for k in set(dapt) | set(capfilt) if dapt.get(k) != capfilt.get(k)}
    assert changed == {"run.dir", "data.train"} and capfilt["data.train"] == "data/rocov2-capfilt/train"
    for name in ("capfilt_captioner.yaml", "capfilt_filter.yaml"):
        cfg = load_config(MEDBLIP / name)
        assert cfg.run.init_from == "runs/medblip-dapt" and cfg.data.train == dapt["data.train"]  # the same shards


def train(recipe: str, run: Path, shards: Path, folder: Path, *extra: str) -> Path:
    """A few tiny steps of `recipe` in this process (DeepSpeed, fp32, a world of one)."""
    cfg = load_config(MEDBLIP / recipe, [
        f"run.dir={run}", f"data.train={shards}", "data.val=null", "run.resume=none", "run.save_every=0",
        "model.grad_checkpointing_vit=false", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=4",
        "train.grad_accum=1", "train.precision=fp32", "train.epochs=null", "train.max_steps=2",
        "train.warmup_steps=0", "train.lr=1e-3", *tiny.overrides(folder), *extra])
    env = run_env(cfg, init_distributed())
    result = fit(build_run(cfg, import_recipe(cfg.recipe).build(cfg, env), env))
    assert result.step == 2
    return run


def test_captioner_and_filter_from_dapt_then_capfilt_then_dapt_on_its_output(tmp_path: Path, one_rank) -> None:
    shards = tiny.shards(tmp_path, n=12)
    dapt = train("dapt.yaml", tmp_path / "dapt", shards, tmp_path, "run.init_from=null")
    captioner = train("capfilt_captioner.yaml", tmp_path / "captioner", shards, tmp_path, f"run.init_from={dapt}")
    filter_run = train("capfilt_filter.yaml", tmp_path / "filter", shards, tmp_path, f"run.init_from={dapt}")
    # the captioner trained LM only: its ITM head is still DAPT's; the filter's encoder moved, its decoder did not
    two = run_capfilt(tiny.options(tmp_path, tmp_path / "two", shards, captioner=captioner, filter_model=filter_run,
                                   threshold=0.0, recipe=None), **QUIET)
    one = run_capfilt(tiny.options(tmp_path, tmp_path / "one", shards, captioner=dapt, threshold=0.0, recipe=None),
                      **QUIET)
    assert two["models"]["captioner"]["spec"] == str(captioner) and two["models"]["filter"]["spec"] == str(filter_run)
    assert one["models"]["one_model"] and not two["models"]["one_model"]
    syn = lambda m: [[s["caption"] for s in d["synthetic"]] for d in m["decisions"]]  # noqa: E731
    assert syn(one) != syn(two)  # LM fine-tuning changed the captioner
    assert two["totals"]["samples"] > 12
    after = train("dapt_capfilt.yaml", tmp_path / "dapt-capfilt", tmp_path / "two", tmp_path, "run.init_from=null")
    saved = (after / "config.yaml").read_text()
    assert str(tmp_path / "two") in saved


def test_medpix_shards_through_capfilt(shared_data: Path, tmp_path: Path) -> None:
    """Real MedPix pairs (prepare_rocov2's shards: jpg + txt + json with caption-keyword modality) through CapFilt."""
    from corpora.listings import PrepareOptions
    from corpora.rocov2 import prepare

    csv = shared_data / "medpix2_sample" / "sample_captions.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} is not present")
    prepared = tmp_path / "medpix"
    prepare(PrepareOptions(input=str(csv), out=str(prepared), split="all", limit=10, samples_per_shard=5,
                           max_side=64), log=lambda s: None)
    out = tmp_path / "out"
    manifest = run_capfilt(tiny.options(tmp_path, out, prepared, k=1, threshold=0.0), **QUIET)
    source = json.loads((prepared / "manifest.json").read_text())
    assert manifest["totals"]["images"] == source["totals"]["samples"] == 10
    assert {m: c["images"] for m, c in manifest["modalities"].items()} == source["modalities"]
    assert manifest["counts"]["original"]["kept"] == 10  # threshold 0 keeps every original
    originals = {d["key"]: d["original"]["caption"] for d in manifest["decisions"]}
    import webdataset as wds

    for u in sorted(prepared.glob("*.tar")):
        for s in wds.WebDataset(str(u), shardshuffle=False):
            assert originals[s["__key__"]] == s["txt"].decode()
    assert [s["name"] for s in manifest["shards"]] == sorted(p.name for p in prepared.glob("*.tar"))
