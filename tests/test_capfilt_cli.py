"""launch/capfilt.py: one-line errors, two gloo ranks writing what one process writes, a failure on one rank in one
line, and the precision rules of training on (described) GPUs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tests.capfilt_tiny as tiny
from framework.run_env import PrecisionError
from recipes.medblip.capfilt.bootstrap import run_capfilt
from recipes.medblip.capfilt.models import inference_precision, load_model
from tests.conftest import fake_gpu, load_launch, run_entry


def cli_args(folder: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny.weights(folder)), "--recipe", tiny.RECIPE, "--shards", str(inputs), "--out", str(out),
            "--k", "2", "--batch-size", "3", "--precision", "fp32", "--threshold", str(tiny.THRESHOLD), *extra, *tiny.overrides(folder)]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tiny.shards(tmp_path)
    capfilt = load_launch("capfilt")
    with pytest.raises(SystemExit) as exit_:
        capfilt.main(["--shards", str(inputs), "--out", "x"])
    assert exit_.value.code == 2 and "give --model" in capsys.readouterr().err
    assert capfilt.main(cli_args(tmp_path, inputs, inputs)) == 2
    assert errors(capsys.readouterr().err) == [f"error: --out {inputs} is the folder of the input shards: the output "
                                               "would mix with the input; choose another --out"]
    assert capfilt.main(["--model", str(tmp_path / "nothing.pth"), *cli_args(tmp_path, inputs, tmp_path / "o")[2:]]) == 2
    err = capsys.readouterr().err
    assert len(errors(err)) == 1 and "nothing.pth" in errors(err)[0] and "Traceback" not in err
    assert capfilt.main([*cli_args(tmp_path, inputs, tmp_path / "o"), "--k", "0"]) == 2
    assert errors(capsys.readouterr().err) == ["error: --k must be >= 1, got 0"]


@pytest.mark.slow  # two ranks under the deepspeed launcher (~25 s on 2 cores)
def test_two_ranks_split_the_shards_and_write_what_one_process_writes(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path)  # 3 shards: rank 0 takes 0 and 2, rank 1 takes 1
    alone = run_capfilt(tiny.options(tmp_path, tmp_path / "one", inputs, batch_size=3), log=lambda s: None)
    r = run_entry("capfilt.py", *cli_args(tmp_path, inputs, tmp_path / "two"), ranks=2, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    merged = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [s["sha256"] for s in merged["shards"]] == [s["sha256"] for s in alone["shards"]]
    assert merged["decisions"] == alone["decisions"] and merged["fingerprint"] == alone["fingerprint"]
    assert r.stdout.count("capfilt: 3 shards, 12 images") == 1  # rank 0 speaks for both
    assert "ETA" in r.stdout


@pytest.mark.slow  # two ranks under the deepspeed launcher
def test_a_failure_on_one_rank_is_one_line_and_finished_shards_stay(tmp_path: Path) -> None:
    inputs = tmp_path / "damaged"
    inputs.mkdir()
    for p in sorted(tiny.shards(tmp_path).iterdir()):  # the manifest's counts hide the damage until it is read
        data = p.read_bytes()
        (inputs / p.name).write_bytes(data[: len(data) // 2] if p.name.endswith("0001.tar") else data)
    out = tmp_path / "out"
    r = run_entry("capfilt.py", *cli_args(tmp_path, inputs, out), ranks=2, timeout=300)
    assert r.returncode != 0
    lines = errors(r.stdout + r.stderr)
    assert len(lines) == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert lines[0].startswith("error: rank 1: input shard") and "phantom-train-0001.tar is damaged" in lines[0]
    assert "Traceback" not in r.stderr
    assert (out / "phantom-train-0000.tar").is_file() and (out / ".prepare" / "phantom-train-0000.tar.json").is_file()
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))


@pytest.mark.parametrize("gpu, auto", [("P100", "fp16"), ("T4", "fp16"), ("A100", "bf16"), ("H200", "bf16")])
def test_precision_follows_trainings_rules(monkeypatch, gpu: str, auto: str) -> None:
    fake_gpu(monkeypatch, gpu)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "sm_70", "sm_75", "sm_80", "sm_90"])
    cuda = torch.device("cuda", 0)
    assert inference_precision("auto", cuda).name == auto
    if auto == "fp16":
        with pytest.raises(PrecisionError, match="no native bf16"):
            inference_precision("bf16", cuda)
    assert inference_precision("auto", torch.device("cpu")).name == "fp32"
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])  # a build without kernels for this GPU
    if gpu != "H200":
        with pytest.raises(Exception, match="ships kernels for"):
            inference_precision("auto", cuda)


def test_half_precision_inference_keeps_scores_fp32_and_changes_the_fingerprint(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path, n=5)
    bf16 = run_capfilt(tiny.options(tmp_path, tmp_path / "bf16", inputs, precision="bf16"), log=lambda s: None)
    fp32 = run_capfilt(tiny.options(tmp_path, tmp_path / "fp32", inputs), log=lambda s: None)
    assert bf16["options"]["precision"] == "bf16" and bf16["fingerprint"] != fp32["fingerprint"]
    close = [abs(a["original"]["score"] - b["original"]["score"]) for a, b in zip(bf16["decisions"], fp32["decisions"])]
    assert max(close) < 0.05  # the same model, rounded to bf16
    m = load_model(str(tiny.weights(tmp_path)), recipe=tiny.RECIPE, overrides=tiny.overrides(tmp_path),
                   precision=__import__("framework.run_env", fromlist=["Precision"]).Precision("bf16", torch.bfloat16),
                   log=lambda s: None)
    assert m.model.dtype == torch.bfloat16 and m.model.image_queue.dtype == torch.float32
