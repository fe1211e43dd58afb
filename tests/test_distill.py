"""Self-distillation: output KL, the wrapper (reuse, buffers), the adaptive weighter by hand, the engine end to end."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework.adaptive_weights import AdaptiveLossWeighter
from framework.checkpoint import find_resume_tag
from framework.config import (
    DistillConfig,
    DistillingConfig,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from framework.distill import (
    SelfDistillation,
    kl_with_temperature,
    logits_kl,
    setup_distillation,
)
from framework.ema import EMATeacher, tau_at
from framework.run_env import run_env
from framework.task import Task
from tests.conftest import ROOT, run_entry


class Toy(nn.Module):
    """Three objectives; "pair" scores randomly drawn rows (a sampled choice the teacher must reuse).

    forward(batch {"x": [B,D], "y": [B], "labels": [B,L]}, *, return_logits, reuse) -> ModelOutput.
    A buffer `queue` advances on every training forward; `log` records (queue seen, reuse received).
    """

    def __init__(self, d: int = 4, classes: int = 3, vocab: int = 5, length: int = 3):
        super().__init__()
        self.cls = nn.Linear(d, classes)
        self.tok = nn.Linear(d, vocab * length)
        self.register_buffer("queue", torch.zeros(()))
        self.gen = torch.Generator().manual_seed(0)
        self.length, self.vocab = length, vocab
        self.log: list = []

    def forward(self, batch, *, return_logits: bool = False, reuse=None):
        x, y, labels = batch["x"].to(self.cls.weight.dtype), batch["y"], batch["labels"]
        b = x.shape[0]
        logits = self.cls(x).float()
        choice = reuse["choice"] if reuse is not None else torch.randperm(b, generator=self.gen)
        self.log.append((float(self.queue), reuse))
        if self.training:
            self.queue += 1
        tokens = self.tok(x).float().view(b, self.length, self.vocab)
        losses = {"cls": F.cross_entropy(logits, y), "pair": F.cross_entropy(logits[choice], y),
                  "lm": F.cross_entropy(tokens.flatten(0, 1), labels.flatten(), ignore_index=-100)}
        out = {"losses": losses, "metrics": {"acc": (logits.argmax(-1) == y).float().mean()},
               "reuse": {"choice": choice}}
        if return_logits:
            out["logits"] = {"cls": logits, "pair": {"a": logits[choice], "b": logits},
                             "lm": {"logits": tokens, "labels": labels}}
        return out


class NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, batch):
        return {"losses": {"cls": self.lin(batch["x"]).pow(2).mean()}}


def make_batch(b: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (b, 3), generator=g)
    labels[:, -1] = -100  # padding
    return {"x": torch.randn(b, 4, generator=g), "y": torch.randint(0, 3, (b,), generator=g), "labels": labels}


def wrap(model: nn.Module, mode="loss_mse", temperature: float = 1.0) -> SelfDistillation:
    return SelfDistillation(model, EMATeacher(model, tau_steps=10), mode=mode, temperature=temperature)


# ----------------------------------------------------------------------------- output KL


def test_kl_with_temperature_by_hand():
    student, teacher = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    # p_T = (1/2, 1/2), p_S = (3/4, 1/4): KL(p_T || p_S) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert float(kl_with_temperature(student, teacher)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # T = 2: logits halved, p_S = (sqrt3, 1) / (sqrt3 + 1); scaled by T^2 = 4
    ps = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    expected = 4 * sum(0.5 * (math.log(0.5) - math.log(p)) for p in ps)
    assert float(kl_with_temperature(student, teacher, 2.0)) == pytest.approx(expected, rel=1e-5)
    # masked rows do not count: a wildly different masked row changes nothing
    s2, t2 = torch.cat([student, torch.tensor([[9.0, -9.0]])]), torch.cat([teacher, torch.tensor([[-9.0, 9.0]])])
    assert float(kl_with_temperature(s2, t2, mask=torch.tensor([True, False]))) == pytest.approx(0.5 * math.log(4 / 3))
    assert float(kl_with_temperature(s2, t2, mask=torch.tensor([False, False]))) == 0.0


def test_logits_structures_labels_mask_and_averaging():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    keep = labels != -100
    assert torch.allclose(logits_kl({"logits": s, "labels": labels}, {"logits": t, "labels": labels}),
                          kl_with_temperature(s[keep], t[keep]))
    pair = logits_kl({"i2t": s[0], "t2i": s[1]}, {"i2t": t[0], "t2i": t[1]})
    assert torch.allclose(pair, (kl_with_temperature(s[0], t[0]) + kl_with_temperature(s[1], t[1])) / 2)
    with pytest.raises(ValueError, match=r"student logits \(2, 5\) and teacher logits \(3, 5\)"):
        kl_with_temperature(s[0, :2], t[0])


# ----------------------------------------------------------------------------- the wrapper


def test_output_kl_is_zero_when_teacher_equals_student_and_positive_otherwise():
    torch.manual_seed(0)
    model = wrap(Toy(), mode="output_kl", temperature=2.0)
    out = model(make_batch())
    assert set(out["distill"]) == {"cls", "pair", "lm"}
    # zero for "pair" too: the teacher scored the student's sampled rows (reuse), not rows of its own draw
    assert all(float(v) == 0.0 for v in out["distill"].values()), out["distill"]
    assert "logits" not in out and set(out["teacher_losses"]) == {"cls", "pair", "lm"}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = model(make_batch(seed=1))
    assert all(float(v) > 1e-4 for v in out["distill"].values()), out["distill"]
    out["distill"]["lm"].backward()  # the KL reaches the student only
    assert model.student.tok.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.ema.teacher.parameters())


def test_teacher_gets_the_students_sampled_choice_and_starting_buffers():
    model = wrap(Toy())
    for _ in range(3):
        out = model(make_batch())
    student_log, teacher_log = model.student.log, model.ema.teacher.log
    assert [q for q, _ in student_log] == [0.0, 1.0, 2.0]  # the student's forward advances its buffer ...
    assert [q for q, _ in teacher_log] == [0.0, 1.0, 2.0]  # ... the teacher sees the value it started from
    assert student_log[-1][1] is None and torch.equal(teacher_log[-1][1]["choice"], out["reuse"]["choice"])
    assert float(model.ema.teacher.queue) == 2.0  # the teacher's (eval) forward did not advance it


def test_loss_mse_by_hand_and_modes_per_objective():
    model = wrap(Toy(), mode={"lm": "output_kl"})
    with torch.no_grad():
        model.student.cls.weight[0].add_(0.5)  # (a shift of every logit would leave the softmax as it is)
    out = model(make_batch())
    for name in ("cls", "pair"):
        expected = (out["losses"][name].detach() - out["teacher_losses"][name]) ** 2
        torch.testing.assert_close(out["distill"][name].detach(), expected)
        assert float(expected) > 0
    assert float(out["distill"]["lm"]) == 0.0  # the LM head is unchanged: identical token distributions
    assert out["metrics"]["teacher/acc"] is not None and "acc" in out["metrics"]


def test_output_kl_needs_a_forward_that_returns_logits():
    with pytest.raises(ValueError, match="NoLogits.forward takes no return_logits"):
        wrap(NoLogits(), mode="output_kl")
    with pytest.raises(ValueError, match=r"distill.mode.lm: unknown mode 'kl'; known: loss_mse, output_kl"):
        wrap(Toy(), mode={"lm": "kl"})
    out = wrap(NoLogits())({"x": torch.randn(3, 4)})  # loss_mse needs nothing from the model
    assert float(out["distill"]["cls"]) == 0.0


# ----------------------------------------------------------------------------- the adaptive weighter


def fake_output(ls: dict, lt: dict, d: dict) -> dict:
    return {"losses": {k: torch.tensor(v, requires_grad=True) for k, v in ls.items()},
            "teacher_losses": {k: torch.tensor(v) for k, v in lt.items()},
            "distill": {k: torch.tensor(v) for k, v in d.items()}}


def test_adaptive_weights_match_a_hand_computation_over_several_steps():
    a, eps, static = 0.8, 1e-8, {"itc": 1.0, "lm": 0.5}
    weighter = AdaptiveLossWeighter(lambda n, step: static[n], momentum=a, eps=eps)
    micro = [  # (student losses, teacher losses, distillation terms) per micro-batch; 3 steps x 2 micro-batches
        ({"itc": 2.0, "lm": 4.0}, {"itc": 1.0, "lm": 4.0}, {"itc": 1.0, "lm": 0.0}),
        ({"itc": 1.5, "lm": 3.0}, {"itc": 1.0, "lm": 4.0}, {"itc": 0.25, "lm": 1.0}),
        ({"itc": 1.0, "lm": 3.0}, {"itc": 2.0, "lm": 2.0}, {"itc": 1.0, "lm": 1.0}),
        ({"itc": 0.5, "lm": 2.0}, {"itc": 1.0, "lm": 1.0}, {"itc": 0.25, "lm": 1.0}),
        ({"itc": 3.0, "lm": 1.0}, {"itc": 1.0, "lm": 2.0}, {"itc": 4.0, "lm": 1.0}),
        ({"itc": 1.0, "lm": 1.0}, {"itc": 1.0, "lm": 1.0}, {"itc": 0.0, "lm": 0.0}),
    ]
    r_hat = {"itc": 1.0, "lm": 1.0}  # documented initialisation
    for step in range(3):
        ratios = []
        for ls, lt, d in micro[2 * step: 2 * step + 2]:
            r = {n: ls[n] / (lt[n] + eps) for n in ls}
            z = {n: a * r_hat[n] + (1 - a) * r[n] for n in ls}
            w = {n: math.exp(z[n]) / sum(math.exp(v) for v in z.values()) for n in ls}
            total, logs = weighter(fake_output(ls, lt, d), step)
            assert float(total) == pytest.approx(sum(static[n] * ls[n] + w[n] * d[n] for n in ls), rel=1e-6)
            for n in ls:
                assert float(logs[f"distill_weight/{n}"]) == pytest.approx(w[n], rel=1e-6)
                assert float(logs[f"distill_ratio/{n}"]) == pytest.approx(r[n], rel=1e-6)
                assert float(logs[f"teacher_loss/{n}"]) == lt[n] and float(logs[f"distill_loss/{n}"]) == d[n]
            ratios.append(r)
        logged = weighter.after_optimizer_step(step + 1)
        r_hat = {n: a * r_hat[n] + (1 - a) * sum(r[n] for r in ratios) / len(ratios) for n in r_hat}
        for n in r_hat:
            assert weighter.r_hat[n] == pytest.approx(r_hat[n], rel=1e-6)
            assert float(logged[f"distill_ratio_avg/{n}"]) == pytest.approx(r_hat[n], rel=1e-6)


def test_loss_mse_gradient_pushes_the_student_loss_up_when_it_beats_the_teacher():
    weighter = AdaptiveLossWeighter(lambda n, step: 0.0, momentum=0.5)  # c = 0: the distillation term alone
    ls = torch.tensor(1.0, requires_grad=True)
    lt = torch.tensor(1.5)
    out = {"losses": {"lm": ls}, "teacher_losses": {"lm": lt}, "distill": {"lm": F.mse_loss(ls, lt)}}
    total, _ = weighter(out, 0)
    total.backward()
    assert float(ls.grad) == pytest.approx(1.0 * 2 * (1.0 - 1.5))  # w = 1 (one objective): 2(L^S - L^T) < 0
    # gradient descent on the total therefore *raises* the student's loss toward the teacher's


def test_weights_carry_gradient_only_when_not_detached():
    def grad(detach: bool) -> torch.Tensor:
        w = AdaptiveLossWeighter(lambda n, s: 1.0, momentum=0.5, detach_weights=detach)
        out = fake_output({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 3.0})
        total, _ = w(out, 0)
        total.backward()
        return torch.stack([out["losses"]["a"].grad, out["losses"]["b"].grad])

    assert torch.equal(grad(True), torch.ones(2))  # d total / d L^S = c (D is a constant here)
    ls = torch.tensor([2.0, 1.0], requires_grad=True)  # the formula through autograd, weights live
    z = 0.5 * 1.0 + 0.5 * ls / (torch.tensor([1.0, 1.0]) + 1e-8)
    (ls.sum() + (torch.softmax(z, 0) * torch.tensor([1.0, 3.0])).sum()).backward()
    torch.testing.assert_close(grad(False), ls.grad)
    assert not torch.equal(grad(False), grad(True))


def test_weighter_state_round_trip_and_non_finite_micro_batches():
    w = AdaptiveLossWeighter(lambda n, s: 1.0, momentum=0.5)
    w(fake_output({"a": 2.0}, {"a": 1.0}, {"a": 1.0}), 0)
    w(fake_output({"a": float("nan")}, {"a": 1.0}, {"a": 1.0}), 0)  # skipped by the engine: not averaged
    w.after_optimizer_step(1)
    assert w.r_hat == {"a": pytest.approx(0.5 * 1.0 + 0.5 * 2.0)}
    w(fake_output({"a": 3.0}, {"a": 1.0}, {"a": 1.0}), 1)  # a pending micro-batch
    state = w.state_dict()
    other = AdaptiveLossWeighter(lambda n, s: 1.0, momentum=0.5)
    other.load_state_dict(state)
    assert other.r_hat == w.r_hat
    w.after_optimizer_step(2)
    other.after_optimizer_step(2)
    assert other.r_hat == w.r_hat == {"a": pytest.approx(0.5 * 1.5 + 0.5 * 3.0)}
    with pytest.raises(ValueError, match="needs the self-distillation wrapper's output"):
        w({"losses": {"a": torch.tensor(1.0)}}, 0)


# ----------------------------------------------------------------------------- the Task and the engine


def test_setup_distillation_wires_teacher_weighter_and_forward():
    student = Toy()
    cfg = DistillingConfig(distill=DistillConfig(enabled=True, mode={"lm": "output_kl"}),
                 objectives={"cls": ObjectiveConfig(weight=2.0), "pair": ObjectiveConfig(), "lm": ObjectiveConfig()})
    task = Task(model=student, decode=dict, collate=list)
    d = setup_distillation(task, cfg, total_steps=8)
    assert [p.name for p in d.plugins] == ["ema_teacher", "adaptive_loss_weights"]  # after the recipe's (build_run)
    assert d.teacher.tau_steps == 8 and d.teacher.student is student and d.keywords == {"return_logits", "reuse"}
    forward = d.forward(student)  # in training: the DeepSpeed engine around the recipe's own model
    assert forward.student is student and forward.ema is d.teacher
    out = forward(make_batch())
    assert set(out["distill"]) == {"cls", "pair", "lm"}
    _, logs = d.weighter(out, 0)
    assert logs["weight/cls"] == 2.0  # static objective weights still apply to the student losses
    assert not any(k.startswith("student.") for k in student.state_dict())  # no wrapper: the recipe's own names
    from framework.config import ConfigError, config_from_dict

    for bad, match in (({"mode": {"itm": "output_kl"}}, "distill.mode.itm: not an objective"),
                       ({"temperature": 0.0}, "distill.temperature must be > 0"),
                       ({"tau_schedule": "exp"}, "unknown schedule 'exp'"),
                       ({"ratio_momentum": 1.5}, "ratio_momentum must be in")):
        with pytest.raises(ConfigError, match=match):  # refused when the recipe is read, naming the key
            config_from_dict({"recipe": "recipes.toy", "train": {"max_steps": 1}, "objectives": {"mse": {}},
                              "distill": {"enabled": True, **bad}}, "r.yaml")
    with pytest.raises(ValueError, match="sets its own combine_losses"):
        setup_distillation(Task(model=Toy(), decode=dict, collate=list, combine_losses=lambda o, s: None), cfg, 8)


def test_build_run_puts_the_recipes_plugins_first_and_shows_it_its_own_model(tmp_path):
    """Through the builder: plugin order, the combiner, fp32 modules, evaluate and no_decay see the recipe's model."""
    from framework.build import build_run
    from framework.distributed import init_distributed

    seen = {}

    class Recorder:
        name, per_rank_state = "recorder", False

        def setup(self, module, dtype, device, progress):
            seen["setup"] = module

        def after_optimizer_step(self, step):
            return {}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    student = Toy()
    cfg = DistillingConfig(run=RunConfig(dir=str(tmp_path / "run")), train=TrainConfig(max_steps=2),
                           distill=DistillConfig(enabled=True), objectives={"cls": ObjectiveConfig(),
                                                                             "pair": ObjectiveConfig(),
                                                                             "lm": ObjectiveConfig()})
    task = Task(model=student, collate=lambda rows: make_batch(), train_dataset=list(range(16)),
                plugins=[Recorder()], fp32_modules=[student.cls],
                no_decay=lambda name, p: seen.setdefault("names", []).append(name) or name.startswith("cls"))
    run = build_run(cfg, task, run_env(cfg, init_distributed()))
    assert [p.name for p in run.plugins] == ["recorder", "ema_teacher", "adaptive_loss_weights"]
    assert run.combine is run.plugins[2] and run.ds.module is student and seen["setup"] is student
    assert seen["names"] == ["cls.weight", "tok.weight"]  # the recipe's names (matrices: 1-d are never decayed)
    assert run.forward.student is run.ds and run.forward.ema is run.plugins[1]
    assert student.cls.weight.dtype == torch.float32


TOY = str(ROOT / "recipes" / "toy" / "toy.yaml")


def state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    return torch.load(ckpt / find_resume_tag(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)


@pytest.mark.slow
def test_engine_resume_restores_teacher_ratios_and_tau_exactly(tmp_path):
    common = ["model.dataset_size=48", "model.dropout=0.2", "train.epochs=null", "train.max_steps=6",
              "train.grad_accum=2", "train.precision=bf16", "distill.enabled=true", "distill.tau_start=0.9",
              "distill.tau_end=0.99", "objectives.l1.weight=0.5", "run.save_every=0", "data.num_workers=0"]
    for run, extra in (("full", []), ("cut", ["run.stop_at_step=3"]), ("cut", [])):
        proc = run_entry("train.py", "--recipe", TOY, f"run.dir={tmp_path / run}", *common, *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    full, cut = state(tmp_path / "full"), state(tmp_path / "cut")
    assert full["position"]["step"] == cut["position"]["step"] == 6
    assert full["module"]["net.0.weight"].dtype == torch.bfloat16  # the recipe's names: no wrapper prefix
    for name in ("ema_teacher", "adaptive_loss_weights"):
        a, b = full["plugins"][name], cut["plugins"][name]
        assert a.keys() == b.keys()
        if name == "ema_teacher":
            assert a["tau"] == b["tau"] == pytest.approx(0.99) and "step" not in a  # the run's Progress counts
            for k in a["teacher"]:
                assert a["teacher"][k].dtype == torch.float32 and torch.equal(a["teacher"][k], b["teacher"][k]), k
        else:
            assert a == b and set(a["r_hat"]) == {"mse", "l1"} and "updates" not in a
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "full" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for obj in ("mse", "l1"):
        assert {f"loss/{obj}", f"teacher_loss/{obj}", f"distill_loss/{obj}", f"distill_weight/{obj}",
                f"distill_ratio/{obj}", f"distill_ratio_avg/{obj}"} <= tags
    taus = [(e.step, e.value) for e in acc.Scalars("distill/tau")]
    assert taus == [(s, pytest.approx(tau_at(s, start=0.9, end=0.99, steps=6), abs=1e-6)) for s in range(1, 7)]
    w = [e.value for e in acc.Scalars("distill_weight/mse")]
    assert len(w) == 6 and all(0 < v < 1 for v in w)


def test_psd_recipe_inherits_dapt_with_the_studys_settings():
    cfg = load_config(ROOT / "recipes" / "medblip" / "psd.yaml")
    d = cfg.distill
    assert d.enabled and (d.tau_start, d.tau_end, d.tau_schedule, d.mode) == (0.95, 0.995, "linear", "loss_mse")
    assert (cfg.train.lr, cfg.data.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (4e-7, 16, 4, 2)
    assert cfg.model.queue_size == 256 and cfg.model.alpha == 0.0 and cfg.run.init_from == "runs/medblip-dapt"


@pytest.mark.slow
def test_psd_recipe_trains_tiny_medblip_on_real_pairs(tmp_path, shared_data):
    captions = shared_data / "medpix2_sample" / "sample_captions.csv"
    if not captions.is_file():
        pytest.skip("medpix2_sample is not present")
    prep = run_entry("prepare_rocov2.py", "--input", str(captions), "--split", "all", "--out",
                     str(tmp_path / "shards"), "--limit", "32", "--samples-per-shard", "16", "--workers", "1")
    assert prep.returncode == 0, prep.stderr[-2000:]
    proc = run_entry("train.py", "--recipe", str(ROOT / "recipes" / "medblip" / "psd.yaml"),
                     f"run.dir={tmp_path / 'run'}", "run.init_from=null", f"data.train={tmp_path / 'shards'}",
                     "data.val=null", "data.num_workers=1", "model.preset=tiny", "image.size=32",
                     "model.queue_size=8", "data.batch_size=4", "train.grad_accum=2", "train.epochs=null",
                     "train.max_steps=2", "train.warmup_steps=0", "train.lr=1e-4", ranks=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for obj in ("itc", "itm", "lm"):
        assert {f"loss/{obj}", f"teacher_loss/{obj}", f"distill_loss/{obj}", f"distill_weight/{obj}"} <= tags
    assert [e.step for e in acc.Scalars("distill/tau")] == [1, 2]


def test_a_psd_run_saved_under_the_old_wrapper_resumes(tmp_path):
    """tests/data/psd_run_2026_11: a toy PSD run written by the code of 2026-11-29 (model states under
    "student.*", the wrapper module of that time), resumed by today's engine and trained on."""
    import shutil

    import yaml

    from recipes.toy import make_shards

    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "data" / "psd_run_2026_11", run)
    make_shards(tmp_path / "shards", 32, 2)  # the very shards it trained on (make_shards is deterministic)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["train"] = str(tmp_path / "shards")  # the same run, moved to this machine
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    old = torch.load(run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(k.startswith("student.") for k in old["module"])
    proc = run_entry("train.py", "--recipe", str(run / "config.yaml"), f"run.dir={run}", "run.stop_at_step=3")
    # (the old run was stopped at step 2 of 4 with run.stop_at_step=2, which a resume may change)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "step 2" in proc.stderr
    new = state(run)
    assert new["position"]["step"] == 3 and set(new["module"]) == {k[len("student."):] for k in old["module"]}
    assert not torch.equal(new["module"]["net.0.weight"], old["module"]["student.net.0.weight"])  # it trained on
    # the old state's own count ("step") is ignored on load; the update of step 3 took the schedule's tau at step 3
    d = saved["distill"]
    assert old["plugins"]["ema_teacher"]["step"] == 2 and "step" not in new["plugins"]["ema_teacher"]
    assert new["plugins"]["ema_teacher"]["tau"] == pytest.approx(
        tau_at(3, start=d["tau_start"], end=d["tau_end"], steps=d["tau_steps"] or 4, schedule=d["tau_schedule"]))
