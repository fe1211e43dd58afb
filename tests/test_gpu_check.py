"""launch/gpu_check.py on the CPU: its verdicts, its JSON, its exit codes and the memory cap it applies."""
import json
import math

import pytest
import torch

from tests.conftest import fake_gpu, load_launch, run_entry

gc = load_launch("gpu_check")


def scalars(losses, scale=None, skipped=None, **extra):
    """Engine scalars as _scalars() returns them: tag -> [(step, value)]."""
    out = {"loss/total": list(enumerate(losses, 1)),
           "perf/samples_per_s": [(i, 10.0 * i) for i in range(1, len(losses) + 1)],
           "perf/forward_s": [(i, 0.5) for i in range(1, len(losses) + 1)],
           "mem/peak_allocated_gib": [(1, 9.0), (2, 11.5)], "mem/peak_reserved_gib": [(1, 12.0), (2, 13.0)],
           "mem/estimate_gib": [(1, 9.4)]}
    if scale is not None:
        out["fp16/loss_scale"] = list(enumerate(scale, 1))
        out["fp16/skipped_steps"] = list(enumerate(skipped, 1))
    return out | extra


def result(precision="fp16", exit_code=0, log=""):
    r = gc.StageResult("dapt-fp16", "dapt", precision, 1)
    r.exit_code, r.log = exit_code, log
    return r


def test_late_skips_count_only_overflows_after_the_first_clean_step():
    assert gc.late_skips([1, 2, 3, 3, 3]) == 0  # the initial scale search: 3 skips, then clean
    assert gc.late_skips([1, 2, 2, 3, 3, 5]) == 3  # clean at step 3, then 1 + 2 more
    assert gc.late_skips([0, 0, 1]) == 1
    assert gc.late_skips([]) == 0


def test_a_healthy_fp16_stage_passes_and_its_figures_are_computed():
    losses = [9.0, 8.9, 8.7, 8.6, 8.4, 8.3]
    r = gc.summarise(result(), scalars(losses, scale=[2 ** 16, 2 ** 15, 2 ** 15, 2 ** 15, 2 ** 15, 2 ** 15],
                                       skipped=[1, 1, 1, 1, 1, 1]),
                     cap_gib=16, max_late_skips=2, flops_per_sample=300e9, peak=100.0)
    assert r.ok and r.reasons == [] and r.finite and r.falls and r.steps == 6
    assert r.samples_per_s == 45.0  # median of steps 3..6 (30, 40, 50, 60): the first two are warm-up
    assert r.achieved_tflops == pytest.approx(300e9 * 45 / 1e12) and r.mfu == pytest.approx(0.135)
    assert r.peak_allocated_gib == 11.5 and r.peak_reserved_gib == 13.0 and r.estimate_gib == 9.4
    assert r.step_split_s == {"forward": 0.5} and r.skipped_steps == 1 and r.late_skips == 0


def test_a_stage_whose_every_step_was_skipped_fails():
    r = gc.summarise(result(), scalars([9.0, 9.0, 9.0, 9.0], scale=[2 ** 15, 2 ** 14, 2 ** 13, 2 ** 12],
                                       skipped=[1, 2, 3, 4]),
                     cap_gib=16, max_late_skips=2, flops_per_sample=None, peak=None)
    assert not r.ok and "fp16 skipped every step (4 of 4): nothing was trained" in r.reasons


@pytest.mark.parametrize("ratio, ok", [(1.0, True), (0.85, True), (0.741, False), (0.0035, False), (1.4, False)])
def test_a_stage_whose_step_is_not_fp32_s_fails(ratio, ok):
    r = gc.summarise(result(), scalars([9.0, 8.0, 7.0, 6.0], scale=[256.0] * 4, skipped=[0] * 4), cap_gib=16,
                     max_late_skips=2, flops_per_sample=None, peak=None, update_ratio=ratio)
    assert r.ok is ok and r.update_ratio == ratio
    assert ok or any("as far as fp32 (outside 0.8-1.25)" in x for x in r.reasons)


def test_update_ratio_reads_the_three_checkpoints(tmp_path):
    def save(name: str, w: float) -> None:
        tag = tmp_path / name / "checkpoints" / "step_00000001"
        tag.mkdir(parents=True)
        torch.save({"module": {"w": torch.full((4,), w, dtype=torch.float16)}}, tag / "mp_rank_00_model_states.pt")

    save("step-fp32-start", 1.0), save("step-fp32", 1.5), save("step-fp16", 1.25)
    assert gc.update_ratio(tmp_path / "step-fp16", tmp_path / "step-fp32") == pytest.approx(0.5)
    assert gc.update_ratio(tmp_path / "missing", tmp_path / "step-fp32") is None


@pytest.mark.parametrize("case, expect", [
    ("nonfinite", "non-finite loss"),
    ("skips", "fp16 skipped 3 steps after the first clean step (> 2)"),
    ("oom", "does not fit the memory cap (CUDA out of memory)"),
    ("crash", "exit status 1: error: data.train: no shards"),
    ("over cap", "peak reserved 17.00 GiB > cap 16 GiB"),
])
def test_each_failure_is_named(case, expect):
    losses, extra, res = [9.0, 8.0, 7.0, 6.0], {}, result()
    scale, skipped = [1.0] * 4, [0, 0, 0, 0]
    if case == "nonfinite":
        losses = [9.0, float("nan"), 7.0, 6.0]
    elif case == "skips":
        skipped = [0, 1, 2, 3]
    elif case == "oom":
        res = result(exit_code=1, log="...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    elif case == "crash":
        res = result(exit_code=1, log="step 1\nerror: data.train: no shards\n")
    else:
        extra = {"mem/peak_reserved_gib": [(1, 17.0)]}
    r = gc.summarise(res, scalars(losses, scale, skipped, **extra), cap_gib=16, max_late_skips=2,
                     flops_per_sample=None, peak=None)
    assert not r.ok and expect in r.reasons


def test_bf16_stages_need_compute_capability_8_and_two_gpus_add_a_launcher_stage():
    assert [s.name for s in gc.plan(has_bf16=False, gpus=1, rehearse=False)] == ["dapt-fp16", "psd-fp16"]
    assert [s.name for s in gc.plan(has_bf16=True, gpus=1, rehearse=False)] == ["dapt-fp16", "psd-fp16",
                                                                                "dapt-bf16", "psd-bf16"]
    p100 = [s.name for s in gc.plan(has_bf16=False, gpus=1, rehearse=False, extra=True)]
    assert p100 == ["dapt-fp16", "psd-fp16", "vqa-fp16", "dapt-fp16-zero2"]
    h200x2 = gc.plan(has_bf16=True, gpus=2, rehearse=False, extra=True)
    assert {"dapt-bf16", "psd-bf16", "vqa-bf16"} <= {s.name for s in h200x2}
    assert [s.ranks for s in h200x2 if s.name == "dapt-fp16-2gpu"] == [2]


def test_stage_overrides_are_the_recipe_settings_on_synthetic_data_under_the_cap(tmp_path):
    stage = gc.plan(has_bf16=False, gpus=1, rehearse=False)[0]
    o = gc.stage_overrides(stage, tmp_path, steps=10, cap_gib=16.0, rehearse=False)
    assert "run.memory_cap_gib=16.0" in o and "train.precision=fp16" in o and "run.init_from=null" in o
    assert f"data.train={tmp_path / 'data' / 'shards' / 'train'}" in o
    assert not any(k.startswith(("data.batch_size", "train.grad_accum", "model.")) for k in o)  # dapt.yaml's own
    from framework.config import load_config

    cfg = load_config(gc.RECIPES / "dapt.yaml", o)  # every override is a valid key
    assert cfg.data.batch_size == 16 and cfg.train.grad_accum == 4 and cfg.model.grad_checkpointing_vit
    assert cfg.run.memory_cap_gib == 16.0


def test_the_cap_becomes_the_allocator_fraction(monkeypatch, tmp_path):
    """run.memory_cap_gib on a (faked) H200: the builder caps the allocator at 16 GiB of the card's memory."""
    from framework.run_env import check_gpu
    from framework.config import Config, RunConfig
    from framework.distributed import DistInfo
    from tests.conftest import GPUS

    fake_gpu(monkeypatch, "H200")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append(f))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    cfg = Config(run=RunConfig(memory_cap_gib=16.0))
    gpu = check_gpu(cfg, DistInfo(0, 1, 0, torch.device("cuda", 0)))
    assert gpu.name == "NVIDIA H200" and calls == [pytest.approx(16 * 2 ** 30 / GPUS["H200"][3])]
    assert check_gpu(cfg, DistInfo(0, 1, 0, torch.device("cpu"))) is None


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    proc = run_entry("gpu_check.py", "--json", str(tmp_path / "g.json"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA GPU is visible")
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_a_rehearsal_runs_a_real_stage_and_writes_the_json(tmp_path):
    """The orchestration end to end on the CPU: data, FLOP count, a launch/train.py process, events, JSON."""
    out, work = tmp_path / "g.json", tmp_path / "w"
    gc.claim_folder(work, gc.WORK_MARKER, "an earlier check's")  # a --work gpu_check wrote before ...
    stale = work / "dapt-fp32" / "tb" / "events.out.tfevents.0.earlier"  # ... whose events must not mix in
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier check")
    proc = run_entry("gpu_check.py", "--rehearse", "--only", "dapt-fp32", "--steps", "4", "--json", str(out),
                     "--work", str(work), timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not stale.exists() and (work / gc.WORK_MARKER).is_file()
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["steps"] == 4 and [s["name"] for s in doc["stages"]] == ["dapt-fp32"]
    stage = doc["stages"][0]
    assert stage["steps"] == 4 and stage["finite"] and len(stage["losses"]) == 4
    assert all(math.isfinite(v) for v in stage["losses"]) and stage["gflop_per_sample"] > 0
    assert set(stage["step_split_s"]) == {"data", "forward", "backward", "optimizer"}
    assert stage["estimate_gib"] > 0 and "dapt-fp32" in proc.stdout


def test_a_work_folder_holding_user_files_is_refused_before_anything_is_written(tmp_path):
    """--work must be new, empty or gpu_check's own: the stages replace work/<stage> (a user's runs/dapt-fp16 there
    would lose its checkpoints), so a folder of other files is refused in one line and left as it was."""
    work = tmp_path / "runs"
    mine = work / "dapt-fp32" / "checkpoints" / "step_00000010"
    mine.mkdir(parents=True)
    (mine / "COMPLETE").write_text("10\n")
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    proc = run_entry("gpu_check.py", "--rehearse", "--only", "dapt-fp32", "--steps", "4", "--json",
                     str(tmp_path / "g.json"), "--work", str(work), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --work {work} is not empty and was not written by "
                                                    "gpu_check: it is left as it is; choose a new or empty folder, "
                                                    "or one gpu_check wrote before")
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before and not (tmp_path / "g.json").exists()
    gc.check_own_folder(tmp_path / "new", gc.WORK_MARKER, "--work", "gpu_check")  # absent: fine
    gc.claim_folder(tmp_path / "new", gc.WORK_MARKER, "ours")
    (tmp_path / "new" / "dapt-fp32").mkdir()
    gc.check_own_folder(tmp_path / "new", gc.WORK_MARKER, "--work", "gpu_check")  # marked: fine
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        gc.check_own_folder(tmp_path / "a-file", gc.WORK_MARKER, "--work", "gpu_check")


def test_psd_counts_the_teachers_extra_forward():
    dapt, psd, vqa = (gc.Stage(n, n, "fp16") for n in ("dapt", "psd", "vqa"))
    assert gc.stage_flops(dapt, (100.0, 200.0)) == 300.0 and gc.stage_flops(vqa, (100.0, 200.0)) == 300.0
    assert gc.stage_flops(psd, (100.0, 200.0)) == 400.0


@pytest.mark.slow
def test_an_fp16_rehearsal_compares_one_step_with_fp32(tmp_path):
    """fp16 on the CPU: the one-step probes (start, fp32, fp16) run through launch/train.py, the ratio lands in the
    stage's verdict and the JSON."""
    out = tmp_path / "g.json"
    proc = run_entry("gpu_check.py", "--rehearse", "--only", "dapt-fp16", "--steps", "4", "--json", str(out),
                     "--work", str(tmp_path / "w"), timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["complete"] and 0.8 < doc["update_ratio_vs_fp32"]["fp16"] < 1.25
    stage = doc["stages"][0]
    assert stage["name"] == "dapt-fp16" and stage["update_ratio"] == doc["update_ratio_vs_fp32"]["fp16"]
    assert stage["loss_scale"] and stage["skipped_steps"] < 4
