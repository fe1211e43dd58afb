"""The training-health monitor: chance levels, zero gradients, loss-scale collapse; by hand and in a real run."""
import math

import pytest
import torch

from framework.config import RunConfig
from framework.health import HealthMonitor, StepLosses, TrainingStopped
from framework.run_env import run_env
from tests.conftest import ROOT, run_entry

ITM_CHANCE = math.log(3) - 2 / 3 * math.log(2)  # entropy of the 1 positive : 2 negatives prior


class Log:
    def __init__(self):
        self.messages, self.scalars_seen = [], {}

    def message(self, text):
        self.messages.append(text)

    def scalars(self, step, values):
        self.scalars_seen.setdefault(step, {}).update(values)


def check(monitor, step, scalars, out, log, **kw):
    """monitor.check, its health/* scalars logged beside the step's as the engine logs them; returns the verdict."""
    health, stop = monitor.check(step, scalars, out, log, **kw)
    log.scalars(step, health)
    return stop


def test_itm_at_its_prior_entropy_is_flagged_after_the_window_and_cleared_when_it_learns():
    assert ITM_CHANCE == pytest.approx(0.6365, abs=1e-4)
    monitor, log = HealthMonitor(RunConfig(health_window=5, health_tolerance=0.02)), Log()
    out = {"chance": {"itm": ITM_CHANCE, "lm": 10.0}}
    for step in range(1, 5):  # 4 steps at chance: not yet a whole window
        check(monitor, step, {"loss/itm": 0.6366, "loss/lm": 6.0}, out, log)
    assert not log.messages and log.scalars_seen[4]["health/at_chance/itm"] == 0.0
    check(monitor, 5, {"loss/itm": 0.6360, "loss/lm": 5.0}, out, log)
    assert len(log.messages) == 1 and "itm has stayed at its chance level for 5 steps" in log.messages[0]
    assert log.scalars_seen[5]["health/at_chance/itm"] == 1.0 and log.scalars_seen[5]["health/at_chance/lm"] == 0.0
    check(monitor, 6, {"loss/itm": 0.6364, "loss/lm": 5.0}, out, log)
    assert len(log.messages) == 1  # once per episode
    check(monitor, 7, {"loss/itm": 0.50, "loss/lm": 5.0}, out, log)  # it learns: cleared
    assert log.scalars_seen[7]["health/at_chance/itm"] == 0.0


def test_zero_gradient_norm_and_a_collapsed_loss_scale():
    monitor, log = HealthMonitor(RunConfig(max_nonfinite=2)), Log()
    for step in (1, 2, 3):
        check(monitor, step, {"train/grad_norm": 0.0}, {}, log)
    assert any("gradient norm has been 0 for 3 steps" in m for m in log.messages)
    assert log.scalars_seen[3]["health/zero_grad"] == 1.0
    check(monitor, 4, {"train/grad_norm": 0.5, "fp16/loss_scale": 1.0}, {}, log, min_loss_scale=1.0)
    assert log.scalars_seen[4]["health/zero_grad"] == 0.0 and any("loss scale fell to 1" in m for m in log.messages)
    assert check(monitor, 5, {"fp16/loss_scale": 1.0}, {}, log, min_loss_scale=1.0) is None
    stop = check(monitor, 6, {"fp16/loss_scale": 1.0}, {}, log, min_loss_scale=1.0)
    assert log.scalars_seen[6]["health/loss_scale_collapsed"] == 1.0
    assert stop.startswith("fp16 loss scale collapsed to 1.0 for 3 steps")


def test_nonfinite_steps_are_skipped_then_stop_the_run():
    monitor, log = HealthMonitor(RunConfig(max_nonfinite=1)), Log()
    good, bad = torch.tensor(1.0), torch.tensor(float("nan"))
    assert monitor.nonfinite(good, {"losses": {"a": good}}, 1, log) is None and not log.messages
    assert monitor.nonfinite(bad, {"losses": {"a": bad}}, 2, log) is None  # reported, skipped, not yet a stop
    assert "step 2: non-finite loss in a; step skipped" in log.messages[-1]
    assert monitor.nonfinite(bad, {"losses": {"a": bad}}, 3, log, bad=False) is None  # the caller's read decides
    assert len(log.messages) == 1 and monitor.nonfinite_run == 0
    assert monitor.nonfinite(bad, {"losses": {"a": bad}}, 4, log, bad=True) is None
    stop = monitor.nonfinite(bad, {"losses": {"a": bad}}, 5, log)
    assert stop.startswith("2 non-finite losses in a row (objective: a) > run.max_nonfinite=1")


def test_a_resumed_monitor_goes_on_counting_as_if_never_stopped():
    """The state saved in checkpoints (through weights_only torch.load): non-finite steps in a row and in total,
    zero-gradient steps in a row and the chance windows continue across a resume instead of restarting at 0."""
    import io

    cfg = RunConfig(max_nonfinite=2, health_window=3, health_tolerance=0.02)
    monitor, log = HealthMonitor(cfg), Log()
    bad, out = torch.tensor(float("nan")), {"chance": {"itm": ITM_CHANCE}}
    for step in (1, 2):
        assert monitor.nonfinite(bad, {"losses": {"a": bad}}, step, log) is None and monitor.nonfinite_run == step
        check(monitor, step, {"loss/itm": ITM_CHANCE, "train/grad_norm": 0.0}, out, log)
    buf = io.BytesIO()
    torch.save(monitor.state_dict(), buf)
    buf.seek(0)
    resumed, log = HealthMonitor(cfg, torch.load(buf, weights_only=True)), Log()
    assert resumed.state_dict() == monitor.state_dict()
    check(resumed, 3, {"loss/itm": ITM_CHANCE, "train/grad_norm": 0.0}, out, log)  # the 3rd in a row of each
    assert log.scalars_seen[3]["health/at_chance/itm"] == 1.0 and log.scalars_seen[3]["health/zero_grad"] == 1.0
    assert resumed.nonfinite(bad, {"losses": {"a": bad}}, 3, log).startswith("3 non-finite losses in a row")
    assert log.scalars_seen[3]["train/nonfinite_losses"] == 3


def test_a_steps_losses_are_summed_on_the_device_naming_the_bad_objective():
    """StepLosses: one non-finite micro-batch among finite ones makes the step's sums non-finite, for the total and
    for that objective only (what the report names), whichever micro-batch it was."""
    monitor, log = HealthMonitor(RunConfig()), Log()
    losses = StepLosses()
    for a, b in ((1.0, 2.0), (float("inf"), 3.0), (1.0, 2.0)):
        losses.add(torch.tensor(a + b), {"a": torch.tensor(a), "b": torch.tensor(b, dtype=torch.bfloat16)})
    assert not torch.isfinite(losses.total) and torch.isfinite(losses.objectives["b"])
    assert losses.objectives["b"].dtype == torch.float32 and float(losses.objectives["b"]) == 7.0
    assert monitor.nonfinite(losses.total, {"losses": losses.objectives}, 1, log) is None and monitor.nonfinite_run == 1
    assert "non-finite loss in a;" in log.messages[-1]
    losses.clear()
    losses.add(torch.tensor(1.0), {"a": torch.tensor(1.0)})
    assert monitor.nonfinite(losses.total, {"losses": losses.objectives}, 2, log) is None and monitor.nonfinite_run == 0


def test_a_model_that_learns_nothing_is_flagged_in_a_real_run(tmp_path):
    """The toy regressor blind to its input (model.constant) sits at its chance level: console line + TensorBoard."""
    from recipes.toy import make_shards

    make_shards(tmp_path / "shards", 64, 2)
    proc = run_entry("train.py", "--recipe", str(ROOT / "recipes" / "toy" / "toy.yaml"), "model.constant=true",
                     f"data.train={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}", "train.epochs=null",
                     "train.max_steps=12", "train.lr=1e-6", "train.warmup_steps=0", "run.health_window=4",
                     "run.health_tolerance=0.05", "data.shuffle_buffer=0", "train.grad_accum=8", "data.batch_size=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "health: step 4: mse has stayed at its chance level for 4 steps" in proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    flags = [e.value for e in acc.Scalars("health/at_chance/mse")]
    assert flags[:3] == [0.0, 0.0, 0.0] and flags[3] == 1.0
    assert "train/grad_norm" in acc.Tags()["scalars"]


def test_under_fp16_losses_are_checked_once_a_step_without_a_sync_per_micro_batch(tmp_path, one_rank, capsys):
    """fp16 runs check the step's summed loss after the step (DeepSpeed's loss scaler skips a step whose gradients
    overflow, the engine does not): a non-finite micro-batch is counted once per step, and too many in a row still
    stop the run. fp16 needs a GPU, so the CPU run takes the fp16 path's setting build_run gives fp16."""
    from framework.build import build_run
    from framework.config import import_recipe, load_config
    from framework.distributed import init_distributed
    from framework.engine import fit
    from recipes.toy import make_shards

    make_shards(tmp_path / "shards", 64, 4)
    cfg = load_config(ROOT / "recipes" / "toy" / "toy.yaml",
                      [f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}", "model.nan_after=6",
                       "run.max_nonfinite=3", "train.grad_accum=2", "run.save_every=0", "data.num_workers=0"])
    env = run_env(cfg, init_distributed())
    run = build_run(cfg, import_recipe(cfg.recipe).build(cfg, env), env)
    assert run.precision.name == "fp32" and not run.loss_scaler_skips  # the CPU's own path skips the step itself
    run.loss_scaler_skips = True
    with pytest.raises(TrainingStopped, match=r"4 non-finite losses in a row \(objective: mse\)"):
        fit(run)
    err = capsys.readouterr().err
    # forwards 7, 8, ... are NaN: steps 4-7 (2 micro-batches each) are flagged once each, then the run stops
    assert err.count("non-finite loss in mse; step skipped by the loss scaler") == 4
    assert "micro-batch skipped" not in err and "; step skipped\n" not in err
    assert [f"step {s}: non-finite" in err for s in (3, 4, 7, 8)] == [False, True, True, False]


def test_under_fp32_one_nonfinite_micro_batch_skips_its_whole_step(tmp_path, one_rank, capsys):
    """fp32/bf16 read the step's summed losses once, before the step: one NaN micro-batch (the first of step 2's
    two) skips that optimizer step whole, as fp16's loss scaler would (DeepSpeed counts it in skipped_steps, the lr
    schedule does not move), the run goes on and finishes with finite weights."""
    from framework.build import build_run
    from framework.config import import_recipe, load_config
    from framework.distributed import init_distributed
    from framework.engine import fit
    from recipes.toy import make_shards

    make_shards(tmp_path / "shards", 64, 4)
    cfg = load_config(ROOT / "recipes" / "toy" / "toy.yaml",
                      [f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}", "model.nan_after=2",
                       "model.nan_count=1", "train.grad_accum=2", "train.epochs=null", "train.max_steps=4",
                       "run.save_every=0", "data.num_workers=0"])
    env = run_env(cfg, init_distributed())
    run = build_run(cfg, import_recipe(cfg.recipe).build(cfg, env), env)
    assert run.precision.name == "fp32" and not run.loss_scaler_skips
    lrs = []
    step = run.ds.step
    run.ds.step = lambda *a, **k: (step(*a, **k), lrs.append(run.ds.get_lr()[0]))[0]
    result = fit(run)
    err = capsys.readouterr().err
    assert result.reason == "finished" and result.step == 4
    assert err.count("non-finite loss in mse; step skipped") == 1 and "step 2: non-finite loss in mse" in err
    assert (run.ds.global_steps, run.ds.skipped_steps) == (4, 1)
    assert lrs[1] == lrs[3] != lrs[5]  # after steps 1, 2 (skipped: the schedule stays), 3
    assert all(torch.isfinite(p).all() for p in run.ds.module.parameters())
