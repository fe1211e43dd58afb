"""The EMA teacher: the update formula, tau schedules, fp32 under DeepSpeed bf16, no gradients, exact state, ZeRO-3."""
import io
import math

import pytest
import torch
from torch import nn

from framework.config import DistillConfig, DistillingConfig
from framework.distill import SelfDistillation, setup_distillation
from framework.ema import EMATeacher, ZeroStage3Error, check_zero_stage, tau_at
from framework.progress import Progress
from framework.task import Task


class Tiny(nn.Module):
    """y = W x + b; losses {"fit": mse, "size": mean square}; a buffer counting training forwards."""

    def __init__(self, d: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("forwards", torch.zeros(()))

    def forward(self, batch):
        x = batch["x"].to(self.lin.weight.dtype)
        y = self.lin(x).float()
        if self.training:
            self.forwards += 1
        return {"losses": {"fit": ((y - batch["y"]) ** 2).mean(), "size": (y ** 2).mean()}, "metrics": {}}


def batch(n: int = 4, d: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=g), "y": torch.randn(n, d, generator=g)}


def test_update_matches_formula_on_known_tensors():
    student = Tiny(2)
    with torch.no_grad():
        student.lin.weight.fill_(1.0)
        student.lin.bias.fill_(-2.0)
    ema = EMATeacher(student, tau_start=0.9, tau_end=0.9, tau_schedule="constant", tau_steps=10)
    with torch.no_grad():
        student.lin.weight.fill_(3.0)
        student.lin.bias.fill_(2.0)
        student.forwards.fill_(7)
    assert ema.after_optimizer_step(1) == {"distill/tau": 0.9}
    torch.testing.assert_close(ema.teacher.lin.weight, torch.full((2, 2), 0.9 * 1 + 0.1 * 3))  # 1.2
    torch.testing.assert_close(ema.teacher.lin.bias, torch.full((2,), 0.9 * -2 + 0.1 * 2))  # -1.6
    assert float(ema.teacher.forwards) == 7.0  # buffers are copied, not averaged
    with torch.no_grad():
        student.lin.weight.zero_()
    ema.after_optimizer_step(2)
    torch.testing.assert_close(ema.teacher.lin.weight, torch.full((2, 2), 0.9 * 1.2))  # 1.08
    # the student is untouched by the update
    assert torch.equal(student.lin.weight, torch.zeros(2, 2))


def test_teacher_starts_as_an_fp32_copy():
    student = Tiny().to(torch.bfloat16)
    ema = EMATeacher(student, tau_steps=5)
    for (n, t), (_, s) in zip(ema.teacher.named_parameters(), student.named_parameters()):
        assert t.dtype == torch.float32 and not t.requires_grad, n
        assert torch.equal(t, s.float()) and t.data_ptr() != s.data_ptr()
    assert not ema.teacher.training  # deterministic targets: no dropout in the teacher


def test_tau_schedules_by_hand():
    kw = dict(start=0.95, end=0.995, steps=100)
    assert tau_at(0, schedule="linear", **kw) == 0.95
    assert tau_at(50, schedule="linear", **kw) == pytest.approx(0.9725)
    assert tau_at(100, schedule="linear", **kw) == pytest.approx(0.995)
    assert tau_at(250, schedule="linear", **kw) == pytest.approx(0.995)  # held after the ramp
    cos = 0.995 + 0.5 * (0.95 - 0.995) * (1 + math.cos(math.pi / 4))
    assert tau_at(25, schedule="cosine", **kw) == pytest.approx(cos)
    assert tau_at(50, schedule="cosine", **kw) == pytest.approx(0.9725)
    assert tau_at(3, schedule="constant", **kw) == 0.995
    with pytest.raises(ValueError, match="unknown schedule 'step'.*constant, linear, cosine$"):
        tau_at(1, schedule="step", **kw)
    with pytest.raises(ValueError, match="distill.tau_end must be in"):
        EMATeacher(Tiny(), tau_end=1.5)


def test_one_name_per_tau_schedule_the_old_alias_is_refused_in_one_line():
    from framework.config import ConfigError, DistillConfig

    with pytest.raises(ConfigError, match="'progressive' is now called 'linear'"):
        DistillConfig(enabled=True, tau_schedule="progressive").check()


def test_teacher_gets_no_gradients_and_is_invisible_to_the_wrapped_module():
    student = Tiny()
    ema = EMATeacher(student, tau_steps=5)
    model = SelfDistillation(student, ema)  # DeepSpeed wraps `student` itself; the teacher is no part of it
    assert not ({id(p) for p in ema.teacher.parameters()} & {id(p) for p in student.parameters()})
    assert set(student.state_dict()) == {"lin.weight", "lin.bias", "forwards"}  # no teacher inside
    out = model(batch())
    loss = sum(out["losses"].values()) + sum(out["distill"].values())
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in ema.teacher.parameters())
    assert not any(v.requires_grad for v in out["teacher_losses"].values())
    student.to(torch.bfloat16)  # what DeepSpeed's bf16 cast does: the teacher is out of its reach
    assert all(p.dtype == torch.float32 for p in ema.teacher.parameters())


def test_frozen_towers_are_shared_not_copied():
    """Task.frozen_modules (towers that never change, e.g. BLIP-2's ViT and LLM): one tensor for both models."""
    student = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).to(torch.bfloat16)
    student[0].requires_grad_(False)
    ema = EMATeacher(student, tau_start=0.5, tau_end=0.5, tau_steps=2, shared=[student[0]])
    assert ema.teacher[0].weight is student[0].weight and ema.teacher[0].weight.dtype == torch.bfloat16
    assert ema.teacher[1].weight is not student[1].weight and ema.teacher[1].weight.dtype == torch.float32
    assert set(ema.state_dict()["teacher"]) == {"1.weight", "1.bias"}  # the shared tower is the student's to save
    with torch.no_grad():
        student[1].weight.fill_(1.0)
    before = ema.teacher[1].weight.clone()
    ema.after_optimizer_step(1)
    torch.testing.assert_close(ema.teacher[1].weight, 0.5 * before + 0.5)
    other = EMATeacher(student, tau_start=0.5, tau_end=0.5, tau_steps=2, shared=[student[0]])
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.teacher[1].weight, ema.teacher[1].weight)


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    student = Tiny()
    ema = EMATeacher(student, tau_start=0.5, tau_end=0.99, tau_schedule="cosine", tau_steps=6)
    for step in (1, 2, 3):
        with torch.no_grad():
            student.lin.weight.add_(torch.randn(3, 3))
        ema.after_optimizer_step(step)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMATeacher(Tiny(), tau_start=0.5, tau_end=0.99, tau_schedule="cosine", tau_steps=6)
    other.student = student  # the resumed run's student (restored by DeepSpeed)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.tau == ema.tau == tau_at(3, start=0.5, end=0.99, steps=6, schedule="cosine")
    for (n, a), (_, b) in zip(ema.teacher.state_dict().items(), other.teacher.state_dict().items()):
        assert torch.equal(a, b) and b.dtype == a.dtype, n
    ema.after_optimizer_step(4)  # both continue identically
    other.after_optimizer_step(4)
    assert torch.equal(ema.teacher.lin.weight, other.teacher.lin.weight)


def test_zero_stage_3_is_refused_in_one_line():
    check_zero_stage(0)
    check_zero_stage(2)
    with pytest.raises(ZeroStage3Error, match=r"ZeRO stage 0, 1 or 2 .*not 3") as e:
        check_zero_stage(3)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    cfg = DistillingConfig(distill=DistillConfig(enabled=True), deepspeed={"zero_optimization": {"stage": 3}})
    with pytest.raises(ZeroStage3Error):
        setup_distillation(Task(model=Tiny(), decode=dict, collate=list), cfg, 10)
    ema = EMATeacher(Tiny(), tau_steps=5)
    partitioned = Tiny()
    partitioned.lin.weight.ds_id = 0  # what ZeRO-3 puts on its partitioned parameters
    with pytest.raises(ZeroStage3Error):
        ema.setup(partitioned, torch.float32, torch.device("cpu"), Progress())


@pytest.fixture
def single_rank():
    """An in-process world of one (gloo), as `python launch/train.py` makes it; yields deepspeed."""
    import deepspeed

    from tests.conftest import world_of_one

    for _ in world_of_one():
        yield deepspeed


def test_bf16_deepspeed_teacher_stays_fp32_and_tau_follows_optimizer_steps(single_rank):
    deepspeed = single_rank
    torch.manual_seed(0)
    accum, steps = 3, 4
    cfg = DistillingConfig(distill=DistillConfig(enabled=True, tau_start=0.6, tau_end=0.9, tau_schedule="linear"))
    student = Tiny()
    d = setup_distillation(Task(model=student, decode=dict, collate=list), cfg, total_steps=steps)
    initial = student.lin.weight.detach().clone()
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum,
                 "train_batch_size": 4 * accum, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
                 "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    for plugin in d.plugins:
        plugin.setup(engine.module, torch.bfloat16, torch.device("cpu"), Progress())
    ema, forward = d.teacher, d.forward(engine)
    assert engine.module.lin.weight.dtype == torch.bfloat16  # DeepSpeed cast the student ...
    assert ema.teacher.lin.weight.dtype == torch.float32  # ... not the teacher
    assert torch.equal(ema.teacher.lin.weight, initial)  # same init as the student
    seen = set()
    ema.teacher.lin.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    taus, step = [], 0
    for micro in range(accum * steps):
        loss, _ = d.weighter(forward(batch(seed=micro)), step)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            step += 1
            before = ema.teacher.lin.weight.detach().clone()
            logs = {}
            for plugin in d.plugins:
                logs |= plugin.after_optimizer_step(step)
            taus.append(logs["distill/tau"])
            s = engine.module.lin.weight.detach().float()
            tau = tau_at(step, start=0.6, end=0.9, steps=steps, schedule="linear")
            torch.testing.assert_close(ema.teacher.lin.weight, tau * before + (1 - tau) * s, rtol=0, atol=1e-7)
    assert taus == pytest.approx([0.675, 0.75, 0.825, 0.9])  # one update per optimizer step, not per micro-batch
    assert ema.teacher.lin.weight.dtype == torch.float32
    assert all(p.grad is None for p in ema.teacher.parameters())
    assert not torch.equal(ema.teacher.lin.weight, initial)  # it moved, and is not a rounded bf16 copy
    assert not torch.equal(ema.teacher.lin.weight, engine.module.lin.weight.float())
    assert seen == {torch.bfloat16}  # the fp32 teacher computed in the training precision (autocast)


class WithFrozenTower(nn.Module):
    """A frozen "tower" (requires_grad False, as BLIP-2's ViT and LLM) feeding a trainable head; losses as Tiny."""

    def __init__(self, d: int = 3, width: int = 64):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(d, width), nn.Linear(width, width), nn.LayerNorm(width)).requires_grad_(False)
        self.head = nn.Linear(width, d)

    def forward(self, batch):
        y = self.head(self.tower(batch["x"].to(self.head.weight.dtype))).float()
        return {"losses": {"fit": ((y - batch["y"]) ** 2).mean(), "size": (y ** 2).mean()}, "metrics": {}}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def test_frozen_parameters_are_shared_with_the_student_not_copied():
    torch.manual_seed(0)
    student = WithFrozenTower()
    ema = EMATeacher(student, tau_start=0.5, tau_end=0.5, tau_schedule="constant", tau_steps=4,
                     shared=[student.tower])  # what the recipe declares as Task.frozen_modules
    for (name, t), (_, s) in zip(ema.teacher.named_parameters(), student.named_parameters()):
        if name.startswith("tower."):
            assert t is s, name  # the same tensor object: one copy in memory
        else:
            assert t is not s and t.data_ptr() != s.data_ptr() and torch.equal(t, s), name
    # memory: the teacher adds only the trainable part (and its buffers), not the tower
    student_ptrs = {p.data_ptr() for p in student.parameters()}
    added = [t for t in [*ema.teacher.parameters(), *ema.teacher.buffers()] if t.data_ptr() not in student_ptrs]
    assert _bytes(added) == _bytes(student.head.parameters())
    assert _bytes(student.tower.parameters()) > 5 * _bytes(student.head.parameters())  # the saving is real here
    # the update averages the trainable part only; the tower is the student's, whatever happens to it
    with torch.no_grad():
        before = ema.teacher.head.weight.clone()
        student.head.weight.add_(1.0)
        student.tower[0].weight.mul_(2.0)
    ema.after_optimizer_step(1)
    torch.testing.assert_close(ema.teacher.head.weight, 0.5 * before + 0.5 * student.head.weight)
    assert torch.equal(ema.teacher.tower[0].weight, student.tower[0].weight)
    out = ema({"x": torch.randn(4, 3), "y": torch.randn(4, 3)})
    assert set(out["losses"]) == {"fit", "size"}


def test_shared_tensors_keep_the_students_dtype_and_stay_out_of_the_state():
    torch.manual_seed(0)
    student = WithFrozenTower().to(torch.bfloat16)  # as after DeepSpeed's bf16 cast
    ema = EMATeacher(student, tau_steps=5, shared=[student.tower])
    assert student.tower[0].weight.dtype == torch.bfloat16  # not cast to fp32 through the teacher
    assert ema.teacher.head.weight.dtype == torch.float32  # the teacher's own copy is fp32, as before
    state = ema.state_dict()
    assert sorted(state["teacher"]) == ["head.bias", "head.weight"]  # the tower is saved with the student
    other_student = WithFrozenTower().to(torch.bfloat16)
    other = EMATeacher(other_student, tau_steps=5, shared=[other_student.tower])
    tower_before = other.student.tower[0].weight.clone()
    old_style = {**state, "teacher": {**state["teacher"], "tower.0.weight": torch.zeros(64, 3)}}  # a full old state
    other.load_state_dict(old_style)
    assert torch.equal(other.teacher.head.weight, ema.teacher.head.weight)
    assert torch.equal(other.student.tower[0].weight, tower_before)  # a stale tower copy never overwrites the student
    with pytest.raises(RuntimeError, match="does not fit"):
        other.load_state_dict({**state, "teacher": {"head.weight": state["teacher"]["head.weight"]}})


def test_self_distillation_with_a_frozen_tower_trains_as_before():
    torch.manual_seed(0)
    student = WithFrozenTower()
    model = SelfDistillation(student, EMATeacher(student, tau_steps=10, shared=[student.tower]))
    out = model(batch())
    (sum(out["losses"].values()) + sum(out["distill"].values())).backward()
    assert student.head.weight.grad is not None and student.tower[0].weight.grad is None
    assert all(p.grad is None for p in model.ema.teacher.head.parameters())


def test_a_teacher_copy_that_reads_progress_reads_the_runs_progress():
    """A model that reads the run's Progress (MedBLIP's alpha ramp) was copied before its plugin handed it the run's
    Progress; after setup the teacher's copy reads that very object, not a copy frozen at step 0."""
    student = Tiny()
    student.progress = Progress()
    ema = EMATeacher(student, tau_start=0.9, tau_end=0.9)
    run_progress = Progress()
    student.progress = run_progress  # as the recipe's plugin does at its setup, before the teacher's
    ema.setup(student, torch.float32, torch.device("cpu"), run_progress)
    run_progress.step = 7
    assert ema.teacher.progress is run_progress and ema.teacher.progress.step == 7
