"""Bad input to every entry point (train, prepare, evaluate, benchmark): a one-line `error: ...` naming what to
fix, a non-zero exit and no traceback. One table row per case; the table is mirrored in docs/reliability.md.

The train / benchmark / evaluate cases run their entry point's main(argv) one after the other in ONE separate
process (`python tests/test_bad_input.py DATA OUT`): ~10 s of imports once instead of per case, and the process
group DeepSpeed starts stays out of the pytest process. Any exception escaping main() is recorded as a traceback
and fails its row. prepare_rocov2 cases (no process group) run in this process.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

from corpora.phantoms import PhantomSpec, write_caption_shards, write_vqa
from framework.cli import run_cli
from tests.conftest import DIST_ENV, ROOT, load_launch

MEDBLIP = ROOT / "recipes" / "medblip"
DAPT, PSD, VQA = str(MEDBLIP / "dapt.yaml"), str(MEDBLIP / "psd.yaml"), str(MEDBLIP / "vqa.yaml")
TOY = str(ROOT / "recipes" / "toy" / "toy.yaml")
# `error: ...` from run_cli, or argparse's `prog: error: ...` (its usage line comes first)
ERROR_LINE = re.compile(r"^(?:[\w.-]+: )?error: ")


def load_main(script: str) -> Callable[[list[str]], int]:
    return load_launch(script).main


def call(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


def assert_one_line_error(rc: object, err: str, needle: str) -> None:
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert rc not in (0, None), (rc, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert needle in errors[0], (needle, errors[0])


def rows(cases: list[tuple]) -> list:
    """Table rows (id, argv builder, needle[, mark]) as pytest parameters (id, needle)."""
    return [pytest.param(c[0], c[2], id=c[0], marks=c[3:]) for c in cases]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom caption shards (16 samples in 2 shards), a phantom VQA-RAD folder, a junk shard, junk files, a
    checkpoint directory whose files are junk."""
    root = tmp_path_factory.mktemp("bad_input")
    write_caption_shards(root / "shards", PhantomSpec(image_size=32, samples_per_shard=8), "train", 16)
    write_vqa(root / "vqa", PhantomSpec(image_size=32, vqa_train_images=4, vqa_test_images=2, questions_per_image=2))
    from recipes.toy import make_shards

    make_shards(root / "toy_shards", 16, 2)  # the driver trains a toy run, then plants a payload in its checkpoint
    (root / "junk_shards").mkdir()
    (root / "junk_shards" / "x-0000.tar").write_bytes(b"definitely not a tar" * 50)
    (root / "junk.pth").write_bytes(b"not a checkpoint" * 10)
    (root / "bad.yaml").write_text("train: [1\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)  # e.g. a checkpoint passed as --recipe
    (root / "nomodule.yaml").write_text("recipe: recipes.nope\ntrain: {max_steps: 1}\n")
    # a checkpoint directory that looks complete but whose files are junk (e.g. a disk that filled up)
    tag = root / "broken_run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02truncated")
    (tag / "COMPLETE").write_text("1\n")
    (root / "broken_run" / "checkpoints" / "latest").write_text("step_00000001")
    return root


def tiny(d: Path, *extra: str, run: str = "run") -> list[str]:
    """A working tiny DAPT/PSD configuration on the phantom shards, then the case's overrides (which win)."""
    return [f"run.dir={d / run}", f"data.train={d / 'shards'}", "data.val=null", "run.init_from=null",
            "model.preset=tiny", "image.size=32", "model.queue_size=16", "model.embed_dim=16",
            "model.grad_checkpointing_vit=false", "data.batch_size=4", "data.num_workers=0", "train.epochs=null",
            "train.max_steps=1", "train.precision=fp32", "run.resume=none", *extra]


# (id, argv builder given the data folder, text the error line must contain[, mark])
TRAIN_CASES = [
    # files and paths
    ("missing recipe file", lambda d: ["--recipe", str(d / "nope.yaml")], "recipe file not found"),
    ("no --recipe", lambda d: [], "the following arguments are required: --recipe"),
    ("invalid YAML", lambda d: ["--recipe", str(d / "bad.yaml")], "invalid YAML"),
    ("recipe not a mapping", lambda d: ["--recipe", str(d / "list.yaml")], "must be a mapping"),
    ("unknown recipe module", lambda d: ["--recipe", str(d / "nomodule.yaml")], "cannot import 'recipes.nope'"),
    ("missing shard folder", lambda d: ["--recipe", DAPT, *tiny(d, f"data.train={d / 'none'}")], "shard not found"),
    ("no shard matches", lambda d: ["--recipe", DAPT, *tiny(d, f"data.train={d}/none-*.tar")], "no shards matched"),
    ("missing val shards", lambda d: ["--recipe", DAPT, *tiny(d, f"data.val={d / 'none'}")], "shard not found"),
    ("corrupt shard", lambda d: ["--recipe", DAPT, *tiny(d, f"data.train={d / 'junk_shards'}")], "corrupt shard"),
    ("missing init_from", lambda d: ["--recipe", DAPT, *tiny(d, f"run.init_from={d / 'none.pth'}")],
     "checkpoint not found"),
    ("corrupt init_from", lambda d: ["--recipe", DAPT, *tiny(d, f"run.init_from={d / 'junk.pth'}")], "junk.pth"),
    ("missing resume dir", lambda d: ["--recipe", DAPT, *tiny(d, f"run.resume={d / 'none'}")],
     "is not a complete checkpoint directory"),
    ("corrupt checkpoint on resume", lambda d: ["--recipe", DAPT, *tiny(d, "run.resume=auto", run="broken_run")],
     "unreadable or truncated checkpoint file"),
    ("malicious checkpoint on resume", lambda d: ["--recipe", TOY, f"run.dir={d / 'poisoned_run'}",
                                                  f"data.train={d / 'toy_shards'}", "train.epochs=null",
                                                  "train.max_steps=1", "run.resume=auto"],  # its own settings
     "refused: it holds a pickled"),
    ("unknown tokenizer path", lambda d: ["--recipe", DAPT, *tiny(d, f"model.tokenizer={d / 'none'}")],
     "model.tokenizer="),
    ("missing deepspeed file", lambda d: ["--recipe", DAPT, *tiny(d, "deepspeed=nope.json")],
     "deepspeed: file not found"),
    # overrides and types
    ("override without =", lambda d: ["--recipe", DAPT, "train.lr"], "must look like key.path=value"),
    ("unknown key", lambda d: ["--recipe", DAPT, "train.lrate=1"], "unknown key train.lrate"),
    ("unknown section", lambda d: ["--recipe", DAPT, "modle.preset=tiny"], "unknown key modle"),
    ("override into a value", lambda d: ["--recipe", DAPT, "train.lr.peak=1"], "lr is not a section"),
    ("number expected", lambda d: ["--recipe", DAPT, "train.lr=fast"], "train.lr: expected a number"),
    ("integer expected", lambda d: ["--recipe", DAPT, "model.queue_size=abc"], "model.queue_size: expected an integer"),
    ("bool expected", lambda d: ["--recipe", DAPT, "image.augment=maybe"], "image.augment: expected true or false"),
    ("bad duration", lambda d: ["--recipe", DAPT, "run.time_budget=soon"], "run.time_budget: expected"),
    ("bad save_every", lambda d: ["--recipe", DAPT, "run.save_every=often"], "run.save_every: expected"),
    ("no length", lambda d: ["--recipe", DAPT, "train.epochs=null", "train.max_steps=null"],
     "set train.epochs or train.max_steps"),
    ("unknown precision", lambda d: ["--recipe", DAPT, "train.precision=fp8"], "train.precision must be"),
    ("unknown preset", lambda d: ["--recipe", DAPT, *tiny(d, "model.preset=huge")], "unknown preset 'huge'"),
    ("unknown objective", lambda d: ["--recipe", DAPT, "objectives.vqa.weight=1"], "objectives.vqa: unknown objective"),
    ("every objective off", lambda d: ["--recipe", DAPT, *tiny(d, "objectives.itc.enabled=false",
                                                               "objectives.itm.enabled=false",
                                                               "objectives.lm.enabled=false")],
     "every objective is disabled"),
    ("unknown distill mode", lambda d: ["--recipe", PSD, *tiny(d, "distill.mode=bogus")], "distill.mode: unknown mode"),
    ("tau out of range", lambda d: ["--recipe", PSD, *tiny(d, "distill.tau_start=2")], "distill.tau_start must be"),
    # incompatible options
    ("queue vs global batch", lambda d: ["--recipe", DAPT, *tiny(d, "model.queue_size=10")],
     "model.queue_size=10 is not a multiple of the global batch 4"),
    ("grad accumulation 0", lambda d: ["--recipe", DAPT, "train.grad_accum=0"], "train.grad_accum must be >= 1"),
    ("grad accumulation < 0", lambda d: ["--recipe", DAPT, "train.grad_accum=-2"], "train.grad_accum must be >= 1"),
    ("accumulation > epoch", lambda d: ["--recipe", DAPT, *tiny(d, "train.grad_accum=8")],
     "fewer than train.grad_accum=8"),
    ("image size vs patch", lambda d: ["--recipe", DAPT, *tiny(d, "image.size=30")],
     "image.size=30 is not a multiple of model.vit.patch_size=8"),  # the size in effect, by the key set
    ("patch size vs image", lambda d: ["--recipe", DAPT, *tiny(d, "model.vit.patch_size=5")],
     "is not a multiple of model.vit.patch_size=5"),
    ("negative learning rate", lambda d: ["--recipe", DAPT, *tiny(d, "train.lr=-1e-4")], "train.lr must be >= 0"),
    ("unknown weight schedule", lambda d: ["--recipe", DAPT, *tiny(d, "objectives.itm.weight={kind: exp}")],
     "objectives.itm.weight: unknown schedule kind 'exp'; known: constant, linear, cosine"),
    ("patch size vs a larger image", lambda d: ["--recipe", DAPT, *tiny(d, "image.size=64", "model.vit.patch_size=7")],
     "image.size=64 is not a multiple of model.vit.patch_size=7"),  # not the preset's 32
    ("binary recipe file", lambda d: ["--recipe", str(d / "binary.yaml")], "binary.yaml: not a YAML text file"),
    ("ZeRO 3 with EMA teacher", lambda d: ["--recipe", PSD, *tiny(d, "deepspeed.zero_optimization.stage=3")],
     "use DeepSpeed ZeRO stage 0, 1 or 2"),
    ("batch 0", lambda d: ["--recipe", DAPT, "data.batch_size=0"], "data.batch_size must be >= 1"),
    ("batch > data", lambda d: ["--recipe", DAPT, *tiny(d, "data.batch_size=100", "model.queue_size=200")], "cannot fill one batch of 100"),
    ("shards of another kind", lambda d: ["--recipe", DAPT, *tiny(d, f"data.train={d / 'toy_shards'}")],
     "the recipe's decode expects jpg|jpeg|png|webp and txt"),  # (more workers than shards is not an error)
    ("deepspeed optimizer", lambda d: ["--recipe", DAPT, *tiny(d, "deepspeed.optimizer.type=Adam")],
     "deepspeed.optimizer/scheduler are set by train:"),
    ("deepspeed conflict", lambda d: ["--recipe", DAPT, *tiny(d, "deepspeed.gradient_accumulation_steps=3")],
     "conflicts with the recipe's value 4"),
]


@pytest.mark.parametrize("case,needle", rows(TRAIN_CASES))
def test_train(driven, case, needle):
    r = driven[f"train/{case}"]
    assert_one_line_error(r["rc"], r["err"], needle)


def test_malicious_resume_ran_nothing(driven, data):
    """The 'malicious checkpoint on resume' row: its payload (creating a file) never ran."""
    assert "refused" in driven["train/malicious checkpoint on resume"]["err"]
    assert (data / "poisoned_run" / "checkpoints").is_dir() and not (data / "pwned").exists()


@pytest.mark.slow
def test_train_bad_input_in_a_real_process(data, tmp_path):
    """The same contract through the process boundary: stderr's last line, exit status 2, no traceback."""
    from tests.conftest import run_entry

    proc = run_entry("train.py", "--recipe", PSD, *tiny(data, "deepspeed.zero_optimization.stage=3"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: distill: the EMA teacher needs")


def test_bf16_on_a_gpu_without_it(monkeypatch, capsys):
    """A P100 (no native bf16, though torch says bf16 is supported) asked for bf16: one line, use fp16."""
    from framework.run_env import resolve_precision
    from tests.conftest import fake_gpu

    fake_gpu(monkeypatch, "P100")
    rc = run_cli(lambda: resolve_precision("bf16", torch.device("cuda", 0)) and 0)
    assert_one_line_error(rc, capsys.readouterr().err, "Tesla P100-PCIE-16GB (compute capability 6.0) has no "
                                                       "native bf16 (needs >= 8.0); use train.precision=fp16")


def test_gpu_the_pytorch_build_cannot_run(capsys):
    """A P100 on a CUDA 12.8 build (no sm_60 kernels): refused at start-up, naming the build to install."""
    from framework.gpu import GpuFacts
    from framework.preflight import check_gpu_arch

    p100 = GpuFacts("Tesla P100-PCIE-16GB", (6, 0), 17_071_734_784)
    rc = run_cli(lambda: check_gpu_arch(p100, ["sm_75", "sm_80", "sm_90"]) or 0)
    assert_one_line_error(rc, capsys.readouterr().err, "cu126")


BENCHMARK_CASES = [
    ("missing recipe file", lambda d: ["--recipe", str(d / "nope.yaml")], "recipe file not found"),
    ("no --recipe", lambda d: [], "the following arguments are required: --recipe"),
    ("bad --steps", lambda d: ["--recipe", DAPT, "--steps", "many"], "argument --steps: invalid int value"),
    ("type error", lambda d: ["--recipe", DAPT, "train.lr=x"], "train.lr: expected a number"),
    ("missing shards", lambda d: ["--recipe", DAPT, *tiny(d, f"data.train={d / 'none'}")], "shard not found"),
    ("ZeRO 3 with EMA teacher", lambda d: ["--recipe", PSD, *tiny(d, "deepspeed.zero_optimization.stage=3"),
                                           "--estimate-only", "fp16"], "use DeepSpeed ZeRO stage 0, 1 or 2"),
    ("unknown estimate precision", lambda d: ["--recipe", DAPT, *tiny(d), "--estimate-only", "fp8"],
     "--estimate-only"),
]


@pytest.mark.parametrize("case,needle", rows(BENCHMARK_CASES))
def test_benchmark(driven, case, needle):
    r = driven[f"bench/benchmark/{case}"]
    assert_one_line_error(r["rc"], r["err"], needle)


def _table(d: Path) -> Path:
    """image,caption CSV with one real image (tests/test_prepare.py covers the input layouts themselves)."""
    from PIL import Image

    (d / "tb" / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(d / "tb" / "images" / "a.jpg")
    (d / "tb" / "p.csv").write_text("image,caption\na.jpg,hello\n")
    return d / "tb" / "p.csv"


def _junk_csv(d: Path) -> Path:
    _table(d)
    (d / "tb" / "junk.csv").write_bytes(bytes(range(256)) * 4)  # not UTF-8 text
    return d / "tb" / "junk.csv"


def _a_file(d: Path) -> Path:
    (d / "afile").write_text("x")
    return d / "afile"


# What tests/test_prepare.py does not cover already (it covers input not found, unknown modality/split,
# no parquet files / images for a split, missing split/caption column, CUI filter without concepts).
PREPARE_CASES = [
    ("no --input", lambda d: ["--out", str(d / "o")], "the following arguments are required: --input"),
    ("bad int option", lambda d: ["--input", str(_table(d)), "--out", str(d / "o"), "--samples-per-shard", "x"],
     "argument --samples-per-shard: invalid int value"),
    ("samples per shard 0", lambda d: ["--input", str(_table(d)), "--split", "all", "--out", str(d / "o"),
                                       "--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
    ("jpeg quality 500", lambda d: ["--input", str(_table(d)), "--split", "all", "--out", str(d / "o"),
                                    "--jpeg-quality", "500"], "--jpeg-quality in 1..100"),
    ("negative max side", lambda d: ["--input", str(_table(d)), "--split", "all", "--out", str(d / "o"),
                                     "--max-side", "-5"], "--max-side must be >= 0"),
    ("missing image folder", lambda d: ["--input", str(_table(d)), "--split", "all", "--out", str(d / "o"),
                                        "--images", str(d / "none")], "image folder not found"),
    ("unknown image column", lambda d: ["--input", str(_table(d)), "--split", "all", "--out", str(d / "o"),
                                        "--image-column", "img_file"], "no column 'img_file'"),
    ("out is a file", lambda d: ["--input", str(_table(d)), "--split", "all", "--out", str(_a_file(d))],
     "Not a directory"),
    ("table not UTF-8", lambda d: ["--input", str(_junk_csv(d)), "--split", "all", "--out", str(d / "o")],
     "junk.csv"),
    ("CSV read as parquet", lambda d: ["--input", str(_table(d)), "--format", "parquet", "--split", "all", "--out",
                                       str(d / "o")], "parquet"),
]


@pytest.mark.parametrize("case,needle", rows(PREPARE_CASES))
def test_prepare(tmp_path, capsys, case, needle):
    make_argv = next(c[1] for c in PREPARE_CASES if c[0] == case)
    rc = call(load_main("prepare_rocov2"), make_argv(tmp_path))
    assert_one_line_error(rc, capsys.readouterr().err, needle)


def vqa(d: Path, *extra: str) -> list[str]:
    """A working tiny VQA configuration on the phantom VQA-RAD folder, then the case's overrides."""
    return [f"vqa.root={d / 'vqa'}", "model.preset=tiny", "image.size=32", "run.init_from=null", "deepspeed={}",
            f"run.dir={d / 'vqa_run'}", "data.num_workers=0", *extra]


EVALUATE_CASES = [
    ("missing recipe file", lambda d: ["--recipe", str(d / "nope.yaml")], "recipe file not found"),
    ("no --recipe", lambda d: [], "give --recipe (a VQA recipe, e.g. recipes/medblip/vqa.yaml) or --checkpoint RUN"),
    ("checkpoint that does not exist, no recipe", lambda d: ["--checkpoint", str(d / "gone")],
     "checkpoint not found"),
    ("type error", lambda d: ["--recipe", VQA, "train.lr=fast"], "train.lr: expected a number"),
    ("unknown key", lambda d: ["--recipe", VQA, "train.lrate=1"], "unknown key train.lrate"),
    ("not a VQA recipe", lambda d: ["--recipe", DAPT], "is not a VQA recipe"),
    ("missing VQA-RAD folder", lambda d: ["--recipe", VQA, *vqa(d, f"vqa.root={d / 'none'}"), "--checkpoint",
                                          str(d / "junk.pth")], "VQA-RAD folder not found"),
    ("unknown inference mode", lambda d: ["--recipe", VQA, *vqa(d, "vqa.inference=guess")],
     "vqa.inference: unknown mode 'guess'"),
    ("no checkpoint in run.dir", lambda d: ["--recipe", VQA, *vqa(d)], "no complete checkpoint in"),
    ("missing --checkpoint", lambda d: ["--recipe", VQA, *vqa(d), "--checkpoint", str(d / "none.pth")],
     "checkpoint not found"),
    ("corrupt --checkpoint", lambda d: ["--recipe", VQA, *vqa(d), "--checkpoint", str(d / "junk.pth")],
     "junk.pth: not a readable tensors-only checkpoint"),
]


@pytest.mark.parametrize("case,needle", rows(EVALUATE_CASES))
def test_evaluate(driven, case, needle):
    if f"evaluate/{case}" not in driven:
        pytest.skip("launch/evaluate.py is not written yet")
    r = driven[f"evaluate/{case}"]
    assert_one_line_error(r["rc"], r["err"], needle)


# ----------------------------------------------------------------------------- the driver process


def entry_cases() -> dict[str, list[tuple]]:
    cases = {"train": TRAIN_CASES, "bench/benchmark": BENCHMARK_CASES}
    if (ROOT / "launch" / "evaluate.py").is_file():
        cases["evaluate"] = EVALUATE_CASES
    return cases


def plant_payload(d: Path) -> None:
    """A real toy run's checkpoint whose model states carry an object that would create d/pwned when unpickled."""
    import torch

    rc = call(load_main("train"), ["--recipe", TOY, f"run.dir={d / 'poisoned_run'}", f"data.train={d / 'toy_shards'}",
                                   "train.epochs=null", "train.max_steps=1", "run.resume=none"])
    assert rc == 0, "the toy run that the payload is planted in failed"
    states = d / "poisoned_run" / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "payload": _Touch(d / "pwned")}, states)


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def drive(data: Path, out: Path) -> None:
    """Run every train/benchmark/evaluate case in this process; write {entry/case: {rc, err}} as JSON."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plant_payload(data)
    results = {}
    for entry, cases in entry_cases().items():
        main = load_main(entry)
        for case in cases:
            shutil.rmtree(data / "run", ignore_errors=True)  # every case starts afresh (a run dir is one run's)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = call(main, case[1](data))
                except BaseException:  # noqa: BLE001 - what the user would see as a traceback
                    rc = "exception"
                    err.write(f"Traceback (escaped main()):\n{traceback.format_exc()}")
            results[f"{entry}/{case[0]}"] = {"rc": rc, "err": err.getvalue()}
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def driven(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("driven") / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run([sys.executable, __file__, str(data), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    return json.loads(out.read_text())


if __name__ == "__main__":
    drive(Path(sys.argv[1]), Path(sys.argv[2]))
