"""Issue 22 (second contact): nothing of the user's deleted or replaced without a flag, results not lost at the end,
one line instead of a traceback."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from corpora import phantoms as ph
from tests.conftest import load_launch, run_entry

SMALL = ph.PhantomSpec(seed=3, train_captions=16, val_captions=8, samples_per_shard=8, vqa_train_images=8,
                       vqa_test_images=4, questions_per_image=2, image_size=16)


def _user_data(folder: Path) -> dict[Path, bytes]:
    """A user's corpus in `folder` (what `--data data` would hold): returns what must survive, path -> bytes."""
    files = {folder / "rocov2" / "train-000000.tar": b"user shard", folder / "vqa_rad" / "VQA_RAD.json": b"[]"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _one_line_error(proc, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


# --- item 1: user data deleted -------------------------------------------------------------------------------------

def test_demo_data_never_deletes_a_folder_it_did_not_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    kept = _user_data(data)
    with pytest.raises(ValueError, match="holds no demo data"):
        ph.write_demo_data(data, SMALL)
    with pytest.raises(ValueError, match="holds no demo data"):
        ph.write_demo_data(data, SMALL, force=True)
    (data / "phantoms.json").write_text("{}")  # a stamp alone does not make the user's files demo data
    with pytest.raises(ValueError):
        ph.write_demo_data(data, SMALL)
    assert all(p.read_bytes() == b for p, b in kept.items())
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ValueError):
        ph.write_demo_data(afile, SMALL)
    assert afile.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]  # no data.tmpPID left either
    # an empty folder, and demo data it wrote itself (another spec), are fine to replace
    (tmp_path / "empty").mkdir()
    assert not ph.write_demo_data(tmp_path / "empty", SMALL)["reused"]
    assert not ph.write_demo_data(tmp_path / "empty", replace(SMALL, val_captions=4))["reused"]


def test_failed_demo_data_generation_leaves_no_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ph, "write_vqa", full_disk)  # fails after the caption shards were written into the tmp
    with pytest.raises(OSError):
        ph.write_demo_data(tmp_path / "demo", SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_and_gpu_check_refuse_a_data_folder_holding_user_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    kept = _user_data(data)
    demo = run_entry("demo.py", "--data", str(data), "--runs", str(tmp_path / "runs"), timeout=120)
    _one_line_error(demo, str(data), "holds no demo data")
    args = ["--rehearse", "--only", "dapt-fp32", "--steps", "4", "--work", str(tmp_path), "--json",
            str(tmp_path / "g.json")]
    _one_line_error(run_entry("gpu_check.py", *args, timeout=300), "not written by gpu_check")  # not its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    gpu_check = load_launch("gpu_check")
    gpu_check.claim_folder(tmp_path, gpu_check.WORK_MARKER, "gpu_check's")  # its folder, a user's files in data/
    _one_line_error(run_entry("gpu_check.py", *args, timeout=300), "holds no demo data")
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", gpu_check.WORK_MARKER])


def test_demo_refuses_a_runs_folder_holding_user_files_and_reuses_its_own(tmp_path: Path) -> None:
    """The demo replaces its stage folders (dapt, psd, ...), logs and tables in --runs: a folder it did not write is
    refused before anything is written; one it marked, or one with an earlier version's demo.json, is its own."""
    demo = load_launch("demo")
    runs = tmp_path / "runs"
    kept = {runs / "dapt" / "checkpoints" / "weights.pt": b"a user's DAPT run", runs / "dapt.log": b"their log"}
    for path, data in kept.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    proc = run_entry("demo.py", "--data", str(tmp_path / "data"), "--runs", str(runs), timeout=120)
    _one_line_error(proc, f"--runs {runs}", "not written by the demo")
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no data generated either
    (runs / "demo.json").write_text("{}")  # what an earlier version of the demo wrote at its end
    demo.check_runs(runs)
    mine = tmp_path / "mine"
    demo.check_runs(mine)  # absent
    demo.claim_runs(mine)
    (mine / "dapt.log").write_text("the demo's log")
    demo.check_runs(mine)  # marked
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        demo.check_runs(tmp_path / "file")


@pytest.mark.slow
def test_demo_names_a_negative_seed_and_refuses_zero_threads(tmp_path: Path) -> None:
    for args, word in ((["--seed", "-1"], "--seed"), (["--threads", "0"], "--threads")):
        proc = run_entry("demo.py", "--data", str(tmp_path / "d"), "--runs", str(tmp_path / "r"), *args, timeout=120)
        _one_line_error(proc, word)
    assert list(tmp_path.iterdir()) == []


def _tiny_vqa():
    from recipes.common.tokenizer import load_tokenizer
    from recipes.medblip.model.blip_vqa import MedBlipVqa
    from recipes.medblip.model.config import ModelConfig

    torch.manual_seed(0)
    return MedBlipVqa(ModelConfig(preset="tiny"), freeze_vision=True, tokenizer=load_tokenizer("bundled")).eval()


def test_export_keeps_another_models_files_and_writes_shareable_files(tmp_path: Path) -> None:
    from recipes.common.image_text import ImageConfig
    from recipes.medblip.model.to_transformers import ExportError, export_vqa

    model = _tiny_vqa()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ExportError, match="--overwrite"):
        export_vqa(model, other, ImageConfig(size=32))
    assert (other / "config.json").read_text() == '{"model_type": "bert"}'
    afile = tmp_path / "model.bin"
    afile.write_bytes(b"x")
    with pytest.raises(ExportError, match="is a file"):
        export_vqa(model, afile, ImageConfig(size=32))
    assert afile.read_bytes() == b"x"
    old = os.umask(0o022)
    try:
        out = export_vqa(model, tmp_path / "hf", ImageConfig(size=32))
        again = export_vqa(model, other, ImageConfig(size=32), overwrite=True)
    finally:
        os.umask(old)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert json.loads((again / "config.json").read_text())["model_type"] == "blip"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# --- item 2: results lost ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_checks_its_json_before_any_stage(tmp_path: Path) -> None:
    work = tmp_path / "work"
    for target, word in ((tmp_path, "is a folder"), (tmp_path / "no" / "g.json", "does not exist")):
        proc = run_entry("gpu_check.py", "--rehearse", "--only", "dapt-fp32", "--steps", "4", "--work", str(work),
                         "--json", str(target), timeout=300)
        _one_line_error(proc, "--json", word)
        assert not (work / "data").exists()  # refused before the data, let alone a stage


def test_gpu_check_removes_its_temporary_folder_when_it_fails(tmp_path: Path, monkeypatch) -> None:
    gc = load_launch("gpu_check")

    def fails(work: Path, steps: int, rehearse: bool) -> Path:
        (work / "data").mkdir()
        raise ValueError("data could not be written")

    monkeypatch.setattr(gc, "write_data", fails)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert gc.main(["--rehearse", "--only", "dapt-fp32", "--steps", "4", "--json", str(tmp_path / "g.json")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_rehearsal_writes_its_json_outside_the_checkout(tmp_path: Path) -> None:
    gc = load_launch("gpu_check")
    assert gc.json_path(None, str(tmp_path), rehearse=True) == tmp_path / "gpu_check.json"
    assert gc.json_path(None, None, rehearse=True).parent == Path(tempfile.gettempdir())
    assert gc.json_path(None, None, rehearse=False) == Path("gpu_check.json")  # a real check: where it is asked
    assert gc.json_path("x.json", None, rehearse=True) == Path("x.json")


# --- item 3 and 4: make_table ----------------------------------------------------------------------------------------

def _metrics(run: Path, questions: list[str], split: str = "official", reverse: bool = False) -> Path:
    """A run evaluated (as recipes.common.vqa_eval.write_results writes it) on `questions` of `split`."""
    from recipes.common.vqa_eval import write_results

    preds = [{"qid": i, "image": f"img{i}.jpg", "question": q, "ground_truth": "yes", "prediction": "yes",
              "match": 1.0} for i, q in enumerate(questions)]
    preds = preds[::-1] if reverse else preds
    scores = {g: {"accuracy": 1.0, "edit_similarity": 1.0, "count": len(questions)}
              for g in ("overall", "closed", "open")}
    base = {"answers": {"closed": "yes", "open": "x", "overall": "yes"}, "scores": scores}
    doc = {"split": {"split": split, "test": len(questions), "description": "d"}, "scores": scores,
           "metrics": {"accuracy": 1.0}, "inference": {"mode": "rank"}, "evaluated_questions": len(questions),
           "baselines": {"majority_per_type": base, "majority_overall": base}, "init_from": None}
    write_results(run, doc, preds)
    return run


def test_make_table_refuses_runs_on_different_questions_under_one_split_name(tmp_path: Path, capsys) -> None:
    main = load_launch("make_table").main
    a = _metrics(tmp_path / "a", ["is this normal?", "is there a mass?"])
    b = _metrics(tmp_path / "b", ["is this normal?", "is the heart enlarged?"])
    c = _metrics(tmp_path / "c", ["is this normal?", "is there a mass?"], reverse=True)  # in another order
    assert main([f"{a}=dapt", f"{c}=psd"]) == 0
    capsys.readouterr()
    assert main([f"{a}=dapt", f"{b}=psd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different questions of split 'official'" in err[0] and str(b) in err[0]
    # a metrics.json written before the digest: its predictions.jsonl says which questions were asked
    for run in (a, b):
        doc = json.loads((run / "metrics.json").read_text())
        doc.pop("questions_sha256")
        (run / "metrics.json").write_text(json.dumps(doc))
    assert main([f"{a}=dapt", f"{b}=psd"]) == 2


def test_make_table_names_the_file_it_cannot_read_or_write(tmp_path: Path, capsys) -> None:
    main = load_launch("make_table").main
    good = _metrics(tmp_path / "good", ["q1?"])
    nosplit = tmp_path / "nosplit.json"
    nosplit.write_text(json.dumps({"metrics": {}, "scores": {}}))
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)))
    afile = tmp_path / "table.md"
    afile.write_text("mine")
    cases = [([str(nosplit)], str(nosplit)), ([str(binary)], str(binary)),
             ([str(good), "--out", str(afile)], "is a file"),
             ([str(good), "--out", str(afile / "sub")], str(afile))]  # a folder that cannot be made
    for args, word in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    assert afile.read_text() == "mine"


def test_make_tables_digest_is_the_evaluations(tmp_path: Path) -> None:
    from recipes.common.vqa_eval import questions_sha256

    rows = [{"qid": 3, "image": "a.jpg", "question": "where?", "ground_truth": "lung"}, {"qid": 1, "image": "b.jpg"}]
    assert load_launch("make_table").questions_sha256(rows) == questions_sha256(rows) == questions_sha256(rows[::-1])


# --- item 2: a full disk during a checkpoint save ------------------------------------------------------------------

_FULL_DISK = """
import os, runpy, sys
import torch
real_save = torch.save

def save(obj, f, *args, **kwargs):  # every file of the step-4 checkpoint lands on /dev/full: writes fail ENOSPC
    if isinstance(f, (str, os.PathLike)) and "step_00000004" in str(f):
        f = "/dev/full"
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fail writes with ENOSPC")
def test_a_full_disk_during_a_save_ends_in_one_line_and_the_last_checkpoint_loads(tmp_path: Path) -> None:
    import subprocess
    import sys

    from framework.checkpoint import find_resume_tag
    from recipes.toy import make_shards
    from tests.conftest import ROOT

    make_shards(tmp_path / "shards", 64, 4)
    args = [str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "recipes" / "toy" / "toy.yaml"),
            f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}", "train.epochs=null",
            "train.max_steps=6", "run.save_every=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, "-c", _FULL_DISK, *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left writing ") and "step_00000004" in last, last
    ckpt = tmp_path / "run" / "checkpoints"
    assert find_resume_tag(ckpt) == "step_00000002" and not (ckpt / "step_00000004").exists()
    resumed = run_entry("train.py", *args[1:], timeout=300)  # space again: it resumes from step 2 and finishes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert find_resume_tag(ckpt) == "step_00000006" and "resum" in resumed.stdout + resumed.stderr


# --- item 4: tracebacks -> one line ----------------------------------------------------------------------------------

def test_a_caption_over_csvs_field_limit_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na.jpg,hello\nb.jpg," + "x" * 200_000 + "\n")  # 200 KB > csv's 128 KiB
    proc = run_entry("prepare_rocov2.py", "--input", str(table), "--split", "all", "--out", str(tmp_path / "out"),
                     timeout=120)
    _one_line_error(proc, f"{table}: the row from line 3", "unbalanced quote")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, word", [("base: 5\n", "base: expected a recipe file"),
                                        ("base: [null]\n", "base: expected a recipe file"),
                                        ("base: toy.yaml\ndeepspeed:\n  zero_optimization: [0]\n",
                                         "deepspeed.zero_optimization: expected a mapping")])
def test_malformed_base_or_deepspeed_section_is_one_line(tmp_path: Path, text: str, word: str) -> None:
    from framework.config import ConfigError, load_config
    from tests.conftest import ROOT

    (tmp_path / "toy.yaml").write_text((ROOT / "recipes" / "toy" / "toy.yaml").read_text())
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=word):
        load_config(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization"):
        load_config(ROOT / "recipes" / "toy" / "toy.yaml", ["deepspeed.zero_optimization=[0]"])


def test_device_typos_and_missing_gpus_are_one_line(tmp_path: Path) -> None:
    from framework.gpu import user_device

    assert user_device("cpu") == torch.device("cpu")
    for spec in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
            user_device(spec)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            user_device("cuda:9")
    else:
        with pytest.raises(ValueError, match="GPU"):
            user_device(f"cuda:{torch.cuda.device_count()}")
    run = tmp_path / "run"
    proc = run_entry("evaluate.py", "--checkpoint", str(run), "--device", "gpu", timeout=120)
    _one_line_error(proc, "--device 'gpu'")
    proc = run_entry("capfilt.py", "--model", str(run), "--shards", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--device", "cuda:9", timeout=120)
    _one_line_error(proc, "--device cuda:9")


def test_capfilt_refuses_an_out_inside_the_models_run_directory(tmp_path: Path) -> None:
    from recipes.medblip.capfilt.bootstrap import CapFiltOptions

    run = tmp_path / "runs" / "dapt"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: recipes.medblip.pretrain\n")
    for out in (run, run / "capfilt"):
        with pytest.raises(ValueError, match="lies in the run directory of --captioner"):
            CapFiltOptions(shards=[str(tmp_path / "s")], out=str(out), captioner=str(run), filter=str(run)).check()
    CapFiltOptions(shards=[str(tmp_path / "s")], out=str(tmp_path / "runs" / "clean"), captioner=str(run),
                   filter=str(run)).check()  # beside the run: fine
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


# --- item 8: console noise -------------------------------------------------------------------------------------------

def test_the_vit_is_built_for_image_size_and_a_conflicting_vit_size_is_refused(capsys) -> None:
    import pytest

    from framework.config import ConfigError, load_config
    from recipes.medblip.pretrain import model_config
    from tests.conftest import ROOT

    recipe = ROOT / "recipes" / "medblip" / "dapt.yaml"
    quiet = model_config(load_config(recipe, ["model.preset=tiny", "image.size=64"]))  # the preset's 32: no note
    assert quiet.vit.image_size == 64 and "image_size" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"model.vit.image_size=48 conflicts with image.size=64: the ViT is built "
                                          "for the images it is fed; set image.size alone"):
        load_config(recipe, ["model.preset=tiny", "image.size=64", "model.vit.image_size=48"])
    # a saved config.yaml of an earlier version held the preset's size beside image.size: it still loads
    saved = load_config(recipe, ["model.preset=tiny", "image.size=64", "model.vit.image_size=32"])
    assert saved.model.vit.image_size == 64 and "model.vit.image_size" in capsys.readouterr().out


def test_tensorboard_sample_text_keeps_its_spaces_and_whole_words() -> None:
    from recipes.common.vqa_eval import fit_text, label_font

    font = label_font()
    assert font.getlength("is this") - font.getlength("isthis") >= 3  # a visible space (was ~0.6 px at 10 px)
    long = "Q: is there evidence of a small bright lesion in the left hemisphere of the brain?"
    cut = fit_text(long, font, 248)
    assert font.getlength(cut) <= 248 and cut.endswith(" ...") and long.startswith(cut[:-4] + " ")
    assert fit_text("Q: is this normal?", font, 248) == "Q: is this normal?"


def test_demo_console_lines_are_not_cut_mid_word() -> None:
    shown = load_launch("demo").console_line
    line = "step 10/40 " + " ".join(f"loss_{i} 0.{i:03d}" for i in range(30)) + "\n"
    out = shown(line)
    assert len(out) <= 160 and out.endswith(" ...") and line.startswith(out[:-4]) and line[len(out) - 4] == " "
    assert shown("eval step 2: itm_acc 0.75\n") == "eval step 2: itm_acc 0.75"


def test_no_deepspeed_accelerator_warning_on_a_machine_without_an_nvidia_driver(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    import glob

    if os.path.exists("/proc/driver/nvidia") or glob.glob("/dev/nvidia*"):
        pytest.skip("an NVIDIA driver is loaded here: DeepSpeed detects the GPU itself")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import framework, deepspeed\n"
                           "from deepspeed.accelerator import get_accelerator\nprint(get_accelerator()._name)"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr[-2000:]
    assert "Setting accelerator to CPU" not in proc.stderr


# --- item 8: a small real-data recipe ----------------------------------------------------------------------------------

def test_the_small_real_data_recipe_loads_and_trains_a_few_steps(tmp_path: Path) -> None:
    from framework.config import load_config
    from tests.conftest import ROOT

    recipe = ROOT / "recipes" / "medblip" / "dapt_small.yaml"
    cfg = load_config(recipe)
    assert cfg.model.preset == "tiny" and cfg.run.init_from is None and cfg.train.lr >= 1e-4  # rates that learn
    assert cfg.image.size == 128 and cfg.model.tokenizer == "bundled"  # real captions, BERT's vocabulary
    shards = ph.write_caption_shards(tmp_path / "shards", replace(SMALL, image_size=32), "train", 16)
    assert shards["total_samples"] == 16
    proc = run_entry("train.py", "--recipe", str(recipe), f"run.dir={tmp_path / 'run'}",
                     f"data.train={tmp_path / 'shards'}", "train.epochs=null", "train.max_steps=2",
                     "data.batch_size=8", "model.queue_size=16", "data.num_workers=0", "train.warmup_steps=1",
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: finished at step 2" in proc.stdout
    assert "ViT built for" not in proc.stdout  # the recipe's sizes agree with each other


def test_psd_from_a_vqa_run_warns_that_its_itc_and_itm_heads_start_random(tmp_path: Path, capsys) -> None:
    from framework.config import load_config
    from recipes.medblip.pretrain import build_model
    from tests.conftest import ROOT

    vqa = _tiny_vqa()
    torch.save({"model": vqa.state_dict()}, tmp_path / "vqa.pth")  # what a VQA run's weights hold: no ITC/ITM heads
    over = ["model.preset=tiny", "image.size=32", "model.queue_size=8"]
    cfg = load_config(ROOT / "recipes" / "medblip" / "psd.yaml", over + [f"run.init_from={tmp_path / 'vqa.pth'}"])
    build_model(cfg)
    out = capsys.readouterr().out
    assert "holds no ITC / ITM head" in out and "start(s) from random weights" in out
    pre = build_model(load_config(ROOT / "recipes" / "medblip" / "psd.yaml", over + ["run.init_from=null"]),
                      load_weights=False)
    torch.save({"model": pre.state_dict()}, tmp_path / "dapt.pth")
    capsys.readouterr()
    build_model(load_config(ROOT / "recipes" / "medblip" / "psd.yaml", over + [f"run.init_from={tmp_path / 'dapt.pth'}"]))
    assert "holds no" not in capsys.readouterr().out


def test_a_partial_evaluation_leaves_the_runs_metrics_json_as_it_is(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    ph.write_vqa(tmp_path / "vqa", SMALL)
    torch.save({"model": _tiny_vqa().state_dict()}, tmp_path / "w.pth")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"the": "full test set"}\n')
    proc = run_entry("evaluate.py", "--recipe", str(ROOT / "recipes" / "medblip" / "vqa.yaml"), "--checkpoint",
                     str(tmp_path / "w.pth"), f"run.dir={run}", f"vqa.root={tmp_path / 'vqa'}", "model.preset=tiny",
                     "image.size=32", "vqa.eval_limit=3", "data.num_workers=0", "vqa.k_test=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.json").read_text() == '{"the": "full test set"}\n'
    assert json.loads((run / "eval" / "limit_3" / "metrics.json").read_text())["evaluated_questions"] == 3
    assert "the run's metrics.json is left as it is" in proc.stdout
