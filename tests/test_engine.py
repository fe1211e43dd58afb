"""The engine with real DeepSpeed on the CPU: ranks, ZeRO, accumulation, plugins, exact resume, logging, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import find_resume_tag
from framework.schedules import warmup_cosine
from recipes.toy import make_shards
from tests.conftest import DIST_ENV, ROOT, run_entry

TOY = str(ROOT / "recipes" / "toy" / "toy.yaml")


def final_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    tag = find_resume_tag(ckpt)
    return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)


def train(run_dir: Path, *overrides: str, ranks: int = 0):
    proc = run_entry("train.py", "--recipe", TOY, f"run.dir={run_dir}", *overrides, ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_two_ranks_match_one_rank_with_double_batch(tmp_path, zero):
    common = ["model.dataset_size=64", "train.max_steps=4", "train.grad_accum=2", f"deepspeed.zero_optimization.stage={zero}",
              "run.save_every=0", "train.epochs=null"]
    train(tmp_path / "one", *common, "data.batch_size=8")
    train(tmp_path / "two", *common, "data.batch_size=4", ranks=2)
    one, two = final_state(tmp_path / "one")["module"], final_state(tmp_path / "two")["module"]
    initial = torch.nn.Linear(8, 16)  # sanity: training moved the weights
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(one["net.0.weight"], initial.weight)


@pytest.fixture
def shards(tmp_path):
    make_shards(tmp_path / "shards", 48, 4)
    return str(tmp_path / "shards")


@pytest.mark.slow
def test_resume_is_exact_and_plugins_run_once_per_step(tmp_path, shards):
    common = [f"data.train={shards}", "train.epochs=2", "train.grad_accum=2", "model.dropout=0.2",
              "data.num_workers=2", "run.save_every=5"]
    train(tmp_path / "full", *common)
    train(tmp_path / "cut", *common, "run.stop_at_step=4")
    assert find_resume_tag(tmp_path / "cut" / "checkpoints") == "step_00000004"
    train(tmp_path / "cut", *common, "run.stop_at_step=8")  # crosses the epoch boundary (6 steps/epoch)
    train(tmp_path / "cut", *common)
    full, cut = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    for k in full["module"]:
        assert torch.equal(full["module"][k], cut["module"][k]), k
    opt_full, opt_cut = full["optimizer"]["state"], cut["optimizer"]["state"]
    for i in opt_full:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_full[i][name], opt_cut[i][name])
    assert full["plugins"]["step_counter"]["calls"] == list(range(1, 13))  # once per optimizer step
    assert cut["plugins"]["step_counter"]["calls"] == list(range(1, 13))
    assert full["position"] == cut["position"] == {"step": 12, "epoch": 1, "batch_in_epoch": 12}
    # the health monitor's counts and windows are in every checkpoint (a resumed monitor goes on: test_health.py)
    assert full["health"] == cut["health"] and full["health"]["nonfinite_total"] == 0


def read_scalars(run_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_lr_schedule(tmp_path, shards):
    train(tmp_path / "run", f"data.train={shards}", "train.max_steps=6", "objectives.l1.weight=0.5",
          "train.warmup_steps=2", "train.warmup_lr=0.001", "train.lr=0.01", "train.min_lr=0.0001")
    scalars = read_scalars(tmp_path / "run")
    for tag in ("loss/total", "loss/mse", "loss/l1", "weight/mse", "weight/l1", "train/lr", "perf/samples_per_s",
                "perf/data_wait_frac", "data/skipped_samples", "toy/plugin_calls", "mem/peak_rss_gib"):
        assert tag in scalars, (tag, sorted(scalars))
    assert [s for s, _ in scalars["loss/total"]] == list(range(1, 7))  # every optimizer step
    assert all(v == 0.5 for _, v in scalars["weight/l1"])
    # the lr logged after step s was used for step s: schedule value at s-1
    for step, lr in scalars["train/lr"]:
        expected = warmup_cosine(step - 1, peak=0.01, warmup_from=0.001, warmup_steps=2, end=0.0001, total=6)
        assert lr == pytest.approx(expected, rel=1e-5)
    loss = dict(scalars["loss/total"])
    parts = {k: dict(scalars[f"loss/{k}"]) for k in ("mse", "l1")}
    assert loss[3] == pytest.approx(parts["mse"][3] + 0.5 * parts["l1"][3], rel=1e-5)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_warmup_cosine_by_hand():
    kw = dict(peak=1.0, warmup_from=0.1, warmup_steps=4, end=0.0, total=8)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(2, **kw) == pytest.approx(0.55)
    assert warmup_cosine(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine(6, **kw) == pytest.approx(0.5)
    assert warmup_cosine(8, **kw) == pytest.approx(0.0)
    assert warmup_cosine(100, **kw) == pytest.approx(0.0)


def test_bad_input_is_one_line(tmp_path, shards):
    (tmp_path / "bad.yaml").write_text("train: [1\n")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x-0000.tar").write_bytes(b"definitely not a tar" * 50)
    cases = [
        (["--recipe", str(tmp_path / "nope.yaml")], "recipe file not found"),
        (["--recipe", str(tmp_path / "bad.yaml")], "invalid YAML"),
        (["--recipe", TOY, "train.nope=1"], "unknown key train.nope"),
        (["--recipe", TOY, "train.lr=fast"], "train.lr: expected a number"),
        (["--recipe", TOY, "objectives.itc.weight=1"], "unknown objective"),
        (["--recipe", TOY, f"data.train={tmp_path}/none-*.tar"], "no shards matched"),
        (["--recipe", TOY, f"data.train={junk}"], "corrupt shard"),
    ]
    # one child process runs every case through launch/train.py's main() (a process each would cost ~3 s)
    argvs = [[*args, f"run.dir={tmp_path / 'r'}"] for args, _ in cases]
    proc = subprocess.run([sys.executable, "-c", _DRIVE_TRAIN, str(ROOT / "launch" / "train.py"), json.dumps(argvs)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (args, message), (rc, err) in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
        lines = err.strip().splitlines()
        assert rc == 2, (args, err[-2000:])
        assert "Traceback" not in err and message in lines[-1], (args, lines[-3:])


_DRIVE_TRAIN = """
import contextlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("train_cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


# Two light ranks (torch + framework.cli only): each runs run_cli around a collective and reports whether the
# group is still up afterwards. Rank 1 fails with a user error in the second case and must still tear down.
_SHUTDOWN = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from framework.cli import run_cli
dist.init_process_group("gloo")
def main():
    parts = [torch.zeros(2) for _ in range(2)]
    dist.all_gather(parts, torch.full((2,), float(dist.get_rank())))
    if sys.argv[2] == "fail" and dist.get_rank() == 1:
        raise ValueError("bad input on rank 1")
    return 0
code = run_cli(main)
print(f"code={code} initialized={dist.is_initialized()}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_run_cli_tears_the_process_group_down(mode: str) -> None:
    """After run_cli every rank has destroyed its group (drained on success); a failed rank of several exits with
    its status at once: gloo never aborts at exit."""
    from tests.conftest import free_port

    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", _SHUTDOWN, str(ROOT), mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port}) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    # no abort at exit on either rank; the failed rank of several leaves at once with its status (os._exit: gloo
    # could abort it at interpreter exit, -6 instead of 2), its group destroyed and its line printed first
    assert [p.returncode for p in procs] == ([0, 2] if mode == "fail" else [0, 0]), outs
    assert "code=1 initialized=False" in outs[0][0] if mode == "fail" else "code=0 initialized=False" in outs[0][0]
    if mode == "fail":  # rank 0 finished its work but learns at the final barrier that rank 1 did not
        assert "code=" not in outs[1][0], outs[1]  # run_cli did not return to the script on the failed rank
        assert outs[1][1].strip().splitlines()[-1] == "error: bad input on rank 1", outs[1]
        assert "error: another rank failed before the end" in outs[0][1]
    else:
        assert "code=0 initialized=False" in outs[1][0], outs[1]


@pytest.mark.parametrize("ranks", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_training_on_the_cpu_needs_no_cpp_compiler(tmp_path, ranks):
    """No compiler on PATH and an empty extension cache: nothing is compiled (DeepSpeed's shm all-reduce is for
    inference only), the toy recipe trains on one process and on two gloo ranks."""
    from recipes.toy import make_shards
    from tests.conftest import run_entry

    make_shards(tmp_path / "shards", 32, 2)
    bin_dir = tmp_path / "bin"  # a PATH with python only: no c++, g++, gcc, cc
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "CXX": str(tmp_path / "no-compiler"), "CC": str(tmp_path / "no-compiler"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = run_entry("train.py", "--recipe", str(ROOT / "recipes" / "toy" / "toy.yaml"),
                     f"data.train={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}", "train.epochs=1",
                     ranks=ranks, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: finished" in proc.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))


def test_offload_without_a_compiler_is_refused_in_one_line(monkeypatch, capsys):
    """Optimizer offload JIT-compiles DeepSpeed's cpu_adam: with no compiler the start stops before any build."""
    from framework.build import check_can_build
    from framework.cli import run_cli

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    rc = run_cli(lambda: check_can_build("cpu_adam", "deepspeed.zero_optimization.offload_optimizer") or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cpu_adam extension" in err[0] and "install g++" in err[0]
    monkeypatch.setenv("CXX", sys.executable)  # any executable found on the path passes
    check_can_build("cpu_adam", "offload")
