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
from framework.loader import make_loader
from framework.run_env import run_env
from framework.streams import ShardStream
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


def two_nodes(tmp_path):
    """Two ranks as two nodes would start them (torchrun's variables), each in its own working directory."""
    port = free_port()
    envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)} for r in range(2)]
    cwds = [tmp_path / f"node{r}" for r in range(2)]
    for cwd in cwds:
        cwd.mkdir()
    return envs, cwds


# ----------------------------------------------------------------------------- 5: non-finite loss on one rank

def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    # rank 1's 4th forward alone is NaN: a rank that skipped alone would pair its batches with the other's next
    # and the ranks' collectives would stop matching (a hang)
    envs, cwds = two_nodes(tmp_path)
    (r0, out0, err0), (r1, _, err1) = start_ranks(envs, cwds, toy_args(
        tmp_path, f"run.dir={tmp_path / 'run'}", "model.nan_after=3", "model.nan_count=1", "model.nan_rank=1"))
    assert r0 == r1 == 0, err0[-3000:] + err1[-3000:]
    assert "non-finite loss in mse on rank 1; step skipped on every rank" in err1
    assert "non-finite loss in another rank's batch; step skipped on every rank" in err0
    assert "done: finished" in out0


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
    # a private copy of the environment: what adopt_launcher_env writes must not reach later tests of this process
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in DIST_ENV and not k.startswith(("SLURM_", "OMPI_", "PMI_"))})
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert adopt_launcher_env() is None and "RANK" not in os.environ  # the batch script itself: not an srun task
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

@pytest.mark.slow
def test_ranks_that_do_not_share_run_dir_all_stop_in_one_line(tmp_path):
    envs, cwds = two_nodes(tmp_path)
    results = start_ranks(envs, cwds, toy_args(tmp_path, "run.dir=run"))  # relative: each node its own
    for code, _, err in results:
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: run.dir=run: rank 1"), err[-3000:]
        assert "filesystem they all mount" in last
    assert not (cwds[0] / "run" / "checkpoints").exists()


@pytest.mark.slow
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
    envs, cwds = two_nodes(tmp_path)
    args = toy_args(tmp_path, f"run.dir={tmp_path / 'run'}")  # ZeRO 0: it used to resume silently
    for code, _, err in start_ranks(envs, cwds, (*args, "run.stop_at_step=2")):
        assert code == 0, err[-3000:]
    one = run_entry("train.py", *args, timeout=TIMEOUT)
    last = one.stderr.strip().splitlines()[-1]
    assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert "step_00000002 was written by 2 rank(s) and this run has 1: resume it on 2 rank(s)" in last


# ----------------------------------------------------------------------------- 6: an epoch sees every sample

def uneven_shards(out_dir, sizes):
    """Shards holding `sizes` samples each (keys s000000...), in order."""
    out_dir.mkdir(parents=True)
    k = 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(out_dir / f"u-{s:04d}.tar")) as tar:
            for _ in range(n):
                buf = io.BytesIO()
                np.save(buf, np.full(8, k, np.float32))
                tar.write({"__key__": f"s{k:06d}", "npy": buf.getvalue(), "json": json.dumps({"y": 0.0}).encode()})
                k += 1
    return sorted(str(p) for p in out_dir.glob("*.tar"))


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_trains_every_sample_of_uneven_shards_with_a_bounded_pad(tmp_path, world):
    # 607 samples in 9 uneven shards (8 x 75 + 7), 2 DataLoader workers per rank: shards dealt whole to ranks and
    # workers left 79 samples out of an epoch (2 ranks) and trained 64 twice
    urls = uneven_shards(tmp_path / "shards", [75] * 8 + [7])
    bs, seen, per_rank = 8, [], []
    for rank in range(world):
        s = ShardStream(urls, decode, collate, bs, seed=0, shuffle_buffer=50, rank=rank, world_size=world)
        s.set_epoch(1)
        keys = [k for b in make_loader(s, 2) for k in b["keys"]]
        per_rank.append(len(keys))
        seen += keys
        s.set_epoch(1, skip_batches=5)  # exact resume: the rest of the epoch, in order
        assert [k for b in make_loader(s, 2) for k in b["keys"]] == keys[5 * bs:]
    assert len(set(seen)) == 607  # every sample
    assert per_rank == [len(s) * bs] * world and len(seen) - 607 == s.pad < bs * world  # the pad: < 1 global batch


# ----------------------------------------------------------------------------- 7: losses logged as rank means

def test_logged_losses_are_the_mean_over_ranks(tmp_path):
    # lr 0: the weights stay the initial ones, so one epoch's logged mean loss is the mean over all 64 samples
    # (2 ranks x 8 batches of 4 = 64 exactly, no pad); rank 0 alone saw 32 of them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from recipes.toy import ToyModelConfig, ToyRegressor

    envs, cwds = two_nodes(tmp_path)
    args = toy_args(tmp_path, f"run.dir={tmp_path / 'run'}", "train.lr=0", "train.warmup_lr=0", "train.min_lr=0",
                    "train.grad_accum=1", "run.log_every=8", "train.seed=5")
    for code, _, err in start_ranks(envs, cwds, args):
        assert code == 0, err[-3000:]
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss/mse")}
    assert sorted(logged) == list(range(1, 9))  # every step, written at the log point
    torch.manual_seed(5)
    model = ToyRegressor(ToyModelConfig(), ["mse"])
    samples = [decode(s) for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")),
                                                 shardshuffle=False)]
    with torch.no_grad():
        x = torch.stack([s["x"] for s in samples])
        y = torch.tensor([s["y"] for s in samples])
        expected = float(((model.net(x).squeeze(-1) - y) ** 2).mean())
    assert sum(logged.values()) / 8 == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- 9: refusals up front, one download

def test_deepspeed_overrides_reach_a_deepspeed_file():
    from framework.config import load_config

    stage1 = str(ROOT / "recipes" / "blip2" / "stage1.yaml")  # deepspeed: ../deepspeed/blip2_p100_fp16.yaml
    base = load_config(stage1).deepspeed
    cfg = load_config(stage1, ["deepspeed.zero_optimization.stage=3"])
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert {k: v for k, v in cfg.deepspeed.items() if k != "zero_optimization"} == \
        {k: v for k, v in base.items() if k != "zero_optimization"}  # the file's other keys stay


def test_a_queue_that_does_not_fit_the_global_batch_names_sizes_that_do():
    from framework.config import ConfigError, load_config
    from recipes.medblip.pretrain import check_queue

    cfg = load_config(ROOT / "recipes" / "medblip" / "dapt.yaml")  # queue 256, batch 16
    check_queue(cfg, 2)
    with pytest.raises(ConfigError, match=r"queue_size=256 is not a multiple of the global batch 48 \(data.batch_size "
                                          r"x 3 ranks\).*use model.queue_size=240 or 288$"):
        check_queue(cfg, 3)
    with pytest.raises(ConfigError, match=r"global batch 512 .*use model.queue_size=512$"):
        check_queue(cfg, 32)


def test_zero3_is_refused_before_the_engine_is_built(tmp_path, one_rank, monkeypatch):
    import deepspeed

    from corpora.phantoms import PhantomSpec, write_caption_shards
    from framework.build import build_run
    from framework.config import import_recipe, load_config
    from framework.distributed import init_distributed

    write_caption_shards(tmp_path / "shards", PhantomSpec(image_size=32, samples_per_shard=8), "train", 16)
    cfg = load_config(ROOT / "recipes" / "medblip" / "dapt.yaml", [
        f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}", "data.val=null", "run.init_from=null",
        "model.preset=tiny", "image.size=32", "model.queue_size=16", "model.embed_dim=16", "data.batch_size=4",
        "data.num_workers=0", "train.precision=fp32", "deepspeed.zero_optimization.stage=3"])
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("the ZeRO-3 engine was built"))
    env = run_env(cfg, init_distributed())
    task = import_recipe(cfg.recipe, cfg.source).build(cfg, env)
    with pytest.raises(ValueError, match="momentum encoders need full parameters on every rank: use DeepSpeed ZeRO "
                                         r"stage 0, 1 or 2 \(deepspeed.zero_optimization.stage\), not 3"):
        build_run(cfg, task, env)


FETCH = """
import sys
from framework.distributed import init_distributed, shutdown_distributed
from recipes.medblip.model.weights import fetch, fetch_on_rank0
init_distributed()
fetch_on_rank0(sys.argv[1])
print(fetch(sys.argv[1]).stat().st_size)
shutdown_distributed()
"""


@pytest.mark.slow
def test_rank0_downloads_a_url_once_while_the_other_ranks_wait(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "w.pth").write_bytes(b"x" * 100_000)
    gets = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, url], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**base, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "hub"),
                                   "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        server.shutdown()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.split()[-1] for o, _ in outs] == ["100000", "100000"]
    assert gets == ["/w.pth"]  # one download for the two ranks
