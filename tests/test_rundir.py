"""A run directory belongs to one run: other settings, resume=none over checkpoints, a second process, an
unwritable or failed start; each refused in one line with the directory left exactly as it was."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recipes.toy import make_shards
from tests.conftest import DIST_ENV, ROOT, run_entry

TOY = str(ROOT / "recipes" / "toy" / "toy.yaml")


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under `d` with its bytes (the lock file's content is the holder's pid: left out)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def train(run: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_entry("train.py", "--recipe", TOY, f"data.train={shards}", f"run.dir={run}", "train.epochs=null",
                     "train.max_steps=2", *extra, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished toy run (2 steps) and its shards, trained once for the module."""
    root = tmp_path_factory.mktemp("rundir")
    make_shards(root / "shards", 32, 2)
    make_shards(root / "other", 32, 2, seed=1)
    proc = train(root / "run", root / "shards")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.fixture
def finished(trained, tmp_path):
    """A copy of the finished run for one test (it may damage it), with the shards it trained on."""
    import shutil

    shutil.copytree(trained / "run", tmp_path / "run")
    (tmp_path / "other").symlink_to(trained / "other")
    return tmp_path / "run", trained / "shards"


def test_other_settings_or_data_are_refused_and_nothing_is_written(finished, tmp_path):
    run, shards = finished
    before = snapshot(run)
    err = one_error_line(train(run, shards, "train.max_steps=3", "train.grad_accum=1"))
    assert "holds a run with other settings (train.grad_accum: 2 -> 1; train.max_steps: 2 -> 3)" in err
    assert f"--recipe {run / 'config.yaml'}" in err and "run.resume=" in err  # the ways out
    err = one_error_line(train(run, tmp_path / "other"))
    assert "data.train:" in err and "/other'" in err
    assert snapshot(run) == before  # no config.yaml rewrite, no new TensorBoard file


def test_keys_a_resume_may_change_are_accepted(finished):
    run, shards = finished
    proc = train(run, shards, "run.time_budget=1h", "run.log_every=1", "run.stop_at_step=5", "run.keep_last=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "done: finished at step 2" in proc.stdout


def test_resume_none_over_checkpoints_is_refused(finished):
    run, shards = finished
    before = snapshot(run)
    err = one_error_line(train(run, shards, "run.resume=none"))
    assert "already holds a run's checkpoints and run.resume=none would replace them" in err
    assert snapshot(run) == before


def test_a_start_that_fails_before_training_leaves_no_trace(finished, tmp_path):
    run, shards = finished
    fresh = tmp_path / "fresh"
    err = one_error_line(train(fresh, tmp_path / "no-such-shards"))
    assert "shard not found" in err and not fresh.exists()  # not even created
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    (latest / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02truncated")  # a refused checkpoint
    before = snapshot(run)
    err = one_error_line(train(run, shards))
    assert "unreadable or truncated checkpoint file" in err
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_second_process_cannot_train_into_the_same_directory(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards, 64, 2)
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "first.err", "w") as first_err:
        slow = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--recipe", TOY,
                                 f"data.train={shards}", f"run.dir={tmp_path / 'run'}", "train.epochs=null",
                                 "train.max_steps=100000", "model.step_sleep=0.05", "run.save_every=0",
                                 "run.log_every=1"], stdout=subprocess.PIPE, stderr=first_err, text=True, env=env)
    try:
        # Wait on an event, not a clock: its first logged step means it took the lock (taken before training),
        # however long the start takes on a loaded machine. EOF (it died) ends the loop too.
        started = any(line.startswith("step ") for line in slow.stdout)
        assert started, (tmp_path / "first.err").read_text()[-2000:]
        threading.Thread(target=slow.stdout.read, daemon=True).start()  # keep its pipe from filling up
        second = train(tmp_path / "run", shards, "train.max_steps=100000", "model.step_sleep=0.05",
                       "run.save_every=0")
        err = one_error_line(second)
        assert "is in use by training process" in err and f"{slow.pid}" in err
    finally:
        slow.send_signal(signal.SIGTERM)
        slow.wait(timeout=300)
    errs = (tmp_path / "first.err").read_text()
    assert slow.returncode == 0 and "received SIGTERM" in errs  # the first run was not disturbed


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    """A read-only file system (a tmpfs in a private mount namespace, since root may write anywhere else)."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a read-only file system")
    shards = tmp_path / "shards"
    make_shards(shards, 32, 2)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    cmd = (f"mount -t tmpfs -o ro tmpfs {mnt} && {sys.executable} {ROOT / 'launch' / 'train.py'} --recipe {TOY} "
           f"data.train={shards} run.dir={mnt}/run train.epochs=null train.max_steps=1")
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: run.dir={mnt}/run: {mnt} is not writable; choose a "
                                                    "run.dir you can write to")
