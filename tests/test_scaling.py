"""Scaling out on several ranks and nodes (gloo on the CPU): launchers, a shared run.dir, resume, non-finite losses,
epochs that see every sample, losses averaged over ranks."""
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from framework.checkpoint import find_resume_tag
from framework.data import ShardStream, make_loader
from recipes.toy import collate, decode, make_shards
from tests.conftest import DIST_ENV, ROOT, free_port, run_entry

TOY = str(ROOT / "recipes" / "toy" / "toy.yaml")
TIMEOUT = 240  # a hang fails the test instead of blocking the suite


def toy_args(tmp_path, *more):
    make_shards(tmp_path / "shards", 64, 4)
    return ("--recipe", TOY, f"data.train={tmp_path / 'shards'}", "train.epochs=1", "run.save_every=0", *more)


def start_ranks(envs, cwds, args, timeout=TIMEOUT):
    """Start launch/train.py once per env (as a launcher would: the env says the place), wait for all; on a timeout
    every process is killed and the test fails. Returns [(returncode, stdout, stderr)] in rank order."""
    base = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith(("SLURM_", "OMPI_"))}
    base |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], env={**base, **env},
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for env, cwd in zip(envs, cwds)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"ranks still running after {timeout}s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return results


# ----------------------------------------------------------------------------- 5: non-finite loss on one rank

def test_a_nonfinite_loss_on_one_rank_skips_the_micro_batch_on_every_rank(tmp_path):
    # rank 1's 4th forward alone is NaN: a rank that skipped alone would pair its batches with the other's next
    # and the ranks' collectives would stop matching (a hang)
    proc = run_entry("train.py", *toy_args(tmp_path, f"run.dir={tmp_path / 'run'}", "model.nan_after=3",
                                           "model.nan_count=1", "model.nan_rank=1"), ranks=2, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss in mse on rank 1; micro-batch skipped on every rank" in proc.stderr
    assert "non-finite loss in another rank's batch; micro-batch skipped on every rank" in proc.stderr
    assert "done: finished" in proc.stdout


# ----------------------------------------------------------------------------- 2: srun and mpirun

def test_srun_tasks_form_one_run_from_slurm_variables(tmp_path):
    # srun sets SLURM_* and no RANK: each task must find its place (rank, world, local rank, rank 0's host)
    port = free_port()
    envs = [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(r),
             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
             "MASTER_PORT": str(port)} for r in range(2)]
    results = start_ranks(envs, [ROOT, ROOT], toy_args(tmp_path, f"run.dir={tmp_path / 'run'}"))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "2 rank(s)" in results[0][1] and "done: finished" in results[0][1]
    tag = find_resume_tag(tmp_path / "run" / "checkpoints")
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / tag).glob("rank_*.pt")} == {"rank_00000.pt",
                                                                                             "rank_00001.pt"}


def test_launcher_variables_map_or_refuse_in_one_line(monkeypatch):
    from framework.distributed import LauncherError, adopt_launcher_env, first_host

    assert first_host("gpu[07-09,12],cpu1") == "gpu07" and first_host("node3,node4") == "node3"
    for k in [*DIST_ENV, *[k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_"))]]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[07-08]")
    assert adopt_launcher_env() == "srun"
    assert [os.environ[k] for k in DIST_ENV] == ["3", "4", "1", "gpu07", str(20000 + 123)]
    for k in [*DIST_ENV, *[k for k in os.environ if k.startswith("SLURM_")]]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    with pytest.raises(LauncherError, match="mpirun: set MASTER_ADDR"):
        adopt_launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert adopt_launcher_env() == "mpirun" and (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("1", "1")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(LauncherError, match="LOCAL_RANK is not"):  # every process of a node would take GPU 0
        adopt_launcher_env()


# ----------------------------------------------------------------------------- 3: a run.dir every rank sees

def two_nodes(tmp_path):
    """Two ranks as two nodes would start them (torchrun's variables), each in its own working directory."""
    port = free_port()
    envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)} for r in range(2)]
    cwds = [tmp_path / f"node{r}" for r in range(2)]
    for cwd in cwds:
        cwd.mkdir()
    return envs, cwds


def test_ranks_that_do_not_share_run_dir_all_stop_in_one_line(tmp_path):
    envs, cwds = two_nodes(tmp_path)
    results = start_ranks(envs, cwds, toy_args(tmp_path, "run.dir=run"))  # relative: each node its own
    for code, _, err in results:
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: run.dir=run: rank 1"), err[-3000:]
        assert "filesystem they all mount" in last
    assert not (cwds[0] / "run" / "checkpoints").exists()


def test_ranks_disagreeing_on_the_resume_tag_all_stop_in_one_line(tmp_path):
    envs, cwds = two_nodes(tmp_path)
    args = toy_args(tmp_path, "run.dir=run")
    alone = run_entry("train.py", *args, "run.stop_at_step=2", cwd=cwds[0])  # node 0 alone has a checkpoint
    assert alone.returncode == 0, alone.stderr[-3000:]
    results = start_ranks(envs, cwds, args)
    for code, _, err in results:
        last = err.strip().splitlines()[-1]
        assert code == 2 and "ranks disagree on the checkpoint to resume" in last, err[-3000:]
        assert "rank 0 (" in last and "finds step_00000002, rank 1 (" in last and "finds none" in last


# ----------------------------------------------------------------------------- 4: another world size

@pytest.mark.slow
def test_resuming_on_another_number_of_ranks_is_refused_in_one_line(tmp_path):
    args = toy_args(tmp_path, f"run.dir={tmp_path / 'run'}", "deepspeed.zero_optimization.stage=2")
    two = run_entry("train.py", *args, "run.stop_at_step=2", ranks=2, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_entry("train.py", *args, timeout=TIMEOUT)
    last = one.stderr.strip().splitlines()[-1]
    assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert "step_00000002 was written by 2 rank(s) and this run has 1: resume it on 2 rank(s)" in last
