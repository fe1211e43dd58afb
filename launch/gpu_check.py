#!/usr/bin/env python
"""Prove the P100 budget on whatever GPU is here: DAPT, PSD and VQA at full size through the real engine.

    python launch/gpu_check.py [--cap-gib 16] [--steps 10] [--json gpu_check.json] [--only dapt-fp16,psd-fp16]
    python launch/gpu_check.py --rehearse      # the same orchestration on the CPU, tiny model (figures meaningless)

No data or weights are needed: phantom images at 224 px with captions and VQA-RAD-format questions are generated,
the model starts from random weights (`model.preset: base`). Every stage is one `launch/train.py` process with the
recipe's own settings (batch 16 x accumulation 4, ViT activation checkpointing, fp16 dynamic loss scaling...),
its allocator capped at --cap-gib (torch.cuda.set_per_process_memory_fraction through run.memory_cap_gib), so a
larger GPU behaves like a 16 GB one. Stages: DAPT and PSD in fp16, the same in bf16 where the GPU has it; with
--extra also VQA, DAPT under ZeRO-2 and, with two GPUs or more, DAPT as two `deepspeed --num_gpus 2` processes.
Before them, one optimizer step in each half precision is compared with one fp32 step from the same start.

Per stage: samples/s, the step-time split (synchronised), MFU against the GPU's peak, peak allocated and reserved
memory beside the pre-flight estimate, the loss-scale history and skipped steps, whether losses are finite and fall.
Prints one table; the JSON is rewritten (atomically) as each stage finishes. Exit status: 0 every stage passed;
1 a stage did not fit the cap, had a non-finite loss, (fp16) skipped every step or more than --max-late-skips after
its first clean step, or its precision's one step moved the weights outside 0.8-1.25x fp32's; 2 no GPU, bad input.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framework.cli import run_cli  # noqa: E402
from framework.files import check_own_folder, check_writable_file, claim_folder  # noqa: E402

RECIPES = ROOT / "recipes" / "medblip"
WORK_MARKER = ".medvlm-gpu-check"  # written into --work: gpu_check replaces its stage folders there
WARMUP_STEPS = 2  # steps left out of the speed figures (allocator, cuDNN/cuBLAS heuristics, loss-scale search)


@dataclass
class Stage:
    """One training process: a recipe, a precision and the overrides that make it a short synthetic run."""

    name: str
    recipe: str  # dapt | psd | vqa
    precision: str
    overrides: list[str] = field(default_factory=list)
    ranks: int = 0  # 0: plain python (one process); N: the deepspeed launcher with N GPUs


@dataclass
class StageResult:
    name: str
    recipe: str
    precision: str
    ranks: int
    ok: bool = False
    reasons: list[str] = field(default_factory=list)
    exit_code: Optional[int] = None
    wall_s: float = 0.0
    steps: int = 0
    samples_per_s: Optional[float] = None
    step_split_s: dict[str, float] = field(default_factory=dict)  # data / forward / backward / optimizer per step
    gflop_per_sample: Optional[float] = None
    achieved_tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_allocated_gib: Optional[float] = None
    peak_reserved_gib: Optional[float] = None
    estimate_gib: Optional[float] = None
    loss_scale: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    late_skips: int = 0
    update_ratio: Optional[float] = None  # one step's weight update against an fp32 step from the same start
    losses: list[float] = field(default_factory=list)
    finite: Optional[bool] = None
    falls: Optional[bool] = None
    log: str = ""


def plan(has_bf16: bool, gpus: int, rehearse: bool, extra: bool = False) -> list[Stage]:
    """The stages to run on this machine (rehearsal: fp32 only, one process each). By default DAPT and PSD in fp16
    (and bf16 where the GPU has it), sized for one 9-minute command; `extra` adds VQA, ZeRO-2 and two GPUs."""
    if rehearse:  # fp16 runs on the CPU too (emulated, slowly): its stage rehearses the one-step comparison
        return [Stage(f"{r}-fp32", r, "fp32") for r in ("dapt", "psd", "vqa")] + [Stage("dapt-fp16", "dapt", "fp16")]
    recipes = ("dapt", "psd", "vqa") if extra else ("dapt", "psd")
    stages = [Stage(f"{r}-fp16", r, "fp16") for r in recipes]
    if has_bf16:
        stages += [Stage(f"{r}-bf16", r, "bf16") for r in recipes]
    if extra:
        stages.append(Stage("dapt-fp16-zero2", "dapt", "fp16", ["deepspeed.zero_optimization.stage=2"]))
        if gpus >= 2:
            stages.append(Stage("dapt-fp16-2gpu", "dapt", "fp16", ranks=2))
    return stages


RATIO_BAND = (0.8, 1.25)  # a half-precision step's length against fp32's (unscaled gradients gave 0.0035-0.74)
RATIO_LR = 1e-3  # large enough that one step moves fp16 weights well past their rounding


def ratio_overrides(precision: str, overrides: list[str]) -> list[str]:
    """One optimizer step of one micro-batch at RATIO_LR, saved at the end, from the seed's random start."""
    keep = [o for o in overrides if not o.startswith(("train.max_steps=", "train.precision=", "run.dir="))]
    out = keep + ["train.max_steps=1", "train.grad_accum=1", f"train.lr={RATIO_LR}", "train.clip_grad=0",
                  f"train.precision={precision}"]
    if precision == "fp16":
        out.append("deepspeed.fp16.initial_scale_power=8")  # DeepSpeed's 2^16 overflows (and skips) a first step
    return out


def update_ratio(run_dir: Path, reference_dir: Path) -> Optional[float]:
    """|w1 - w0| / |w1_fp32 - w0| over every weight: w1 `run_dir`'s step, w1_fp32 `reference_dir`'s, w0 the seed's
    start (the run `reference_dir`-start, at learning rate 0); None if a checkpoint is missing."""
    import torch

    def module(d: Path) -> dict:
        tags = sorted((d / "checkpoints").glob("step_*"))
        if not tags:
            return {}
        state = torch.load(tags[-1] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        # trained weights only: not the ITC queues (buffers, refilled every step even when it is skipped) nor
        # BLIP's momentum encoders ("*_m", which follow the weights)
        skip = set(state.get("buffer_names") or [])
        return {k: v.float() for k, v in state["module"].items()
                if v.is_floating_point() and k not in skip and not k.split(".")[0].endswith("_m")}

    run, ref = module(run_dir), module(reference_dir)
    start = module(reference_dir.parent / (reference_dir.name + "-start"))
    if not run or not ref or not start:
        return None
    num = sum(float((run[k] - start[k]).pow(2).sum()) for k in start if k in run)
    den = sum(float((ref[k] - start[k]).pow(2).sum()) for k in start if k in ref)
    return math.sqrt(num / den) if den > 0 else None


def stage_overrides(stage: Stage, work: Path, steps: int, cap_gib: Optional[float], rehearse: bool) -> list[str]:
    """The dotted overrides of a stage: synthetic data, random init, no periodic saves, a short run."""
    data = work / "data"
    common = [f"run.dir={work / stage.name}", "run.resume=none", "run.init_from=null", "run.save_every=0",
              "run.eval_every=0", "run.log_every=1", f"train.max_steps={steps}",
              f"train.precision={stage.precision}", "train.warmup_steps=0"]
    if cap_gib:
        common.append(f"run.memory_cap_gib={cap_gib}")
    if stage.recipe == "vqa":
        common += [f"vqa.root={data / 'vqa'}", "vqa.eval_limit=32"]
    else:
        common += [f"data.train={data / 'shards' / 'train'}", "data.val=null"]
    if rehearse:
        common += ["model.preset=tiny", "image.size=32", "data.batch_size=4", "train.grad_accum=2",
                   "data.num_workers=0", "model.queue_size=64"]
        if stage.precision == "fp16":  # the tiny model's gradients overflow 2^16 for more steps than a rehearsal has
            common.append("deepspeed.fp16.initial_scale_power=8")
    return common + stage.overrides


def write_data(work: Path, steps: int, rehearse: bool) -> Path:
    """Phantom caption shards and VQA-RAD-format questions at the real image size (enough for every stage)."""
    from corpora.phantoms import PhantomSpec, write_demo_data

    per_step = 4 * 2 if rehearse else 16 * 4
    captions = per_step * (steps + 2) * 2  # two ranks in the 2-GPU stage
    spec = PhantomSpec(seed=0, image_size=32 if rehearse else 224, train_captions=captions, val_captions=8,
                       samples_per_shard=max(8, captions // 8), vqa_train_images=max(16, per_step * steps // 4),
                       vqa_test_images=8, questions_per_image=4)
    write_demo_data(work / "data", spec)
    return work / "data"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the engine logged to TensorBoard: tag -> [(step, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def late_skips(skipped: list[float]) -> int:
    """Skipped fp16 steps after the first clean one (the initial scale search is expected); `skipped` is the
    cumulative count DeepSpeed reports after each step."""
    previous, clean_seen, late = 0.0, False, 0
    for value in skipped:
        grew = value > previous
        if grew and clean_seen:
            late += int(value - previous)
        clean_seen = clean_seen or not grew
        previous = value
    return late


def summarise(result: StageResult, scalars: dict[str, list[tuple[int, float]]], *, cap_gib: Optional[float],
              max_late_skips: int, flops_per_sample: Optional[float], peak: Optional[float],
              update_ratio: Optional[float] = None) -> StageResult:
    """Fill a stage's figures from its logged scalars and decide whether it passed."""
    def values(tag: str) -> list[float]:
        return [v for _, v in scalars.get(tag, [])]

    losses = values("loss/total")
    result.steps = len(losses)
    result.losses = [round(v, 5) for v in losses]
    steady = slice(WARMUP_STEPS, None) if len(losses) > WARMUP_STEPS + 1 else slice(None)
    rates = values("perf/samples_per_s")[steady]
    result.samples_per_s = statistics.median(rates) if rates else None
    for part in ("data", "forward", "backward", "optimizer"):
        vals = values(f"perf/{part}_s")[steady]
        if vals:
            result.step_split_s[part] = statistics.mean(vals)
    allocated, reserved, estimate = values("mem/peak_allocated_gib"), values("mem/peak_reserved_gib"), \
        values("mem/estimate_gib")
    result.peak_allocated_gib = max(allocated) if allocated else None
    result.peak_reserved_gib = max(reserved) if reserved else None
    result.estimate_gib = estimate[-1] if estimate else None
    result.loss_scale = values("fp16/loss_scale")
    skipped = values("fp16/skipped_steps")
    result.skipped_steps = int(skipped[-1]) if skipped else 0
    result.late_skips = late_skips(skipped)
    result.finite = bool(losses) and all(math.isfinite(v) for v in losses) and not values("train/nonfinite_losses")
    if len(losses) >= 3:
        third = max(1, len(losses) // 3)
        result.falls = statistics.mean(losses[-third:]) < statistics.mean(losses[:third])
    if flops_per_sample and result.samples_per_s:
        result.gflop_per_sample = flops_per_sample / 1e9
        result.achieved_tflops = flops_per_sample * result.samples_per_s / 1e12
        result.mfu = result.achieved_tflops / peak if peak else None

    reasons = result.reasons
    if result.exit_code != 0:
        reasons.append("does not fit the memory cap (CUDA out of memory)" if "out of memory" in result.log.lower()
                       else f"exit status {result.exit_code}: {_last_error(result.log)}")
    elif not losses:
        reasons.append("no step was logged")
    if result.finite is False and losses:
        reasons.append("non-finite loss")
    if cap_gib and result.peak_reserved_gib and result.peak_reserved_gib > cap_gib:
        reasons.append(f"peak reserved {result.peak_reserved_gib:.2f} GiB > cap {cap_gib} GiB")
    if result.precision == "fp16" and losses and result.skipped_steps >= len(losses):
        reasons.append(f"fp16 skipped every step ({result.skipped_steps} of {len(losses)}): nothing was trained")
    result.update_ratio = update_ratio
    lo, hi = RATIO_BAND
    if update_ratio is not None and not lo <= update_ratio <= hi:
        reasons.append(f"one {result.precision} step moves the weights {update_ratio:.3f}x as far as fp32 "
                       f"(outside {lo}-{hi})")
    if result.precision == "fp16" and result.late_skips > max_late_skips:
        reasons.append(f"fp16 skipped {result.late_skips} steps after the first clean step (> {max_late_skips})")
    result.ok = not reasons
    return result


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["(no output)"])[-1][:200]


def count_flops(stage: Stage, overrides: list[str], device: str) -> tuple[float, float]:
    """(forward, backward) FLOPs per training sample of the stage's model, counted by torch's FlopCounterMode
    on two real samples of the stage's data (the EMA teacher of PSD runs one more forward: see stage_flops)."""
    import torch
    from framework.flops import flop_counter  # FlopCounterMode + the CPU fused-attention formulas

    from framework.config import import_recipe, load_config
    from framework.distributed import DistInfo
    from framework.run_env import run_env

    cfg = load_config(RECIPES / f"{stage.recipe}.yaml", [o for o in overrides if not o.startswith("run.memory")]
                      + ["distill.enabled=false"])
    task = import_recipe(cfg.recipe, cfg.source).build(cfg, run_env(cfg, DistInfo(0, 1, 0, torch.device(device))))
    if task.train_dataset is not None:
        samples = [task.train_dataset[i] for i in range(2)]
    else:
        import webdataset as wds

        from framework.shards import expand_shards

        raw = wds.DataPipeline(wds.SimpleShardList(expand_shards(cfg.data.train)[:1]), wds.tarfile_to_samples())
        samples = [s for s in (task.decode(r) for r, _ in zip(raw, range(8))) if s is not None][:2]
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in task.collate(samples).items()}
    model = task.model.to(device).train()
    with flop_counter() as forward:
        loss = sum(v.float() for v in model(batch)["losses"].values())
    with flop_counter() as backward:
        loss.backward()
    fwd, bwd = forward.get_total_flops() / len(samples), backward.get_total_flops() / len(samples)
    del model, task, batch, loss
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return float(fwd), float(bwd)


def stage_flops(stage: Stage, counted: tuple[float, float]) -> float:
    """FLOPs per sample of a training step: forward + backward, plus the EMA teacher's forward under PSD."""
    fwd, bwd = counted
    return fwd + bwd + (fwd if stage.recipe == "psd" else 0.0)


def run_stage(stage: Stage, overrides: list[str], work: Path, timeout: int) -> StageResult:
    """One training process (or two under the deepspeed launcher) in a fresh work/<name> (an earlier check's events
    there would mix into the figures); its output is kept in work/<name>.log."""
    shutil.rmtree(work / stage.name, ignore_errors=True)  # work is this script's: a temporary or a marked folder
    script = str(ROOT / "launch" / "train.py")
    recipe = str(RECIPES / f"{stage.recipe}.yaml")
    if stage.ranks:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(stage.ranks), script,
               "--recipe", recipe, "--sync-timing", *overrides]
    else:
        cmd = [sys.executable, script, "--recipe", recipe, "--sync-timing", *overrides]  # a true time split
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = StageResult(stage.name, stage.recipe, stage.precision, stage.ranks or 1)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        result.exit_code, result.log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        result.exit_code = 124
        result.log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        result.reasons.append(f"timed out after {timeout} s")
    result.wall_s = round(time.time() - t0, 1)
    (work / f"{stage.name}.log").write_text(result.log)
    return result


def table(results: list[StageResult], cap_gib: Optional[float]) -> str:
    """The stages as one fixed-width table."""
    head = (f"{'stage':<17} {'ok':<4} {'samples/s':>9} {'fwd/bwd/opt s':>16} {'MFU':>6} {'alloc':>6} {'resv':>6} "
            f"{'est.':>6} {'scale':>8} {'skip':>5} {'loss first->last':>18}")
    rows = [head, "-" * len(head)]
    for r in results:
        split = r.step_split_s
        fbo = "/".join(f"{split.get(k, float('nan')):.2f}" for k in ("forward", "backward", "optimizer"))
        scale = f"{r.loss_scale[-1]:.0f}" if r.loss_scale else "-"
        loss = f"{r.losses[0]:.3f}->{r.losses[-1]:.3f}" if r.losses else "-"
        rows.append(f"{r.name:<17} {'yes' if r.ok else 'NO':<4} {_num(r.samples_per_s, 1):>9} {fbo:>16} "
                    f"{_num(r.mfu, 3):>6} {_num(r.peak_allocated_gib, 2):>6} {_num(r.peak_reserved_gib, 2):>6} "
                    f"{_num(r.estimate_gib, 2):>6} {scale:>8} {r.skipped_steps:>5} {loss:>18}")
        for reason in r.reasons:
            rows.append(f"    {r.name}: {reason}")
    rows.append(f"memory in GiB (cap {cap_gib} GiB per process); MFU against the GPU's dense peak for the precision")
    return "\n".join(rows)


def _num(v: Optional[float], digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def json_path(given: Optional[str], work: Optional[str], rehearse: bool) -> Path:
    """Where the figures go: --json if given; a rehearsal's (meaningless) figures stay out of the checkout."""
    if given is not None:
        return Path(given)
    if rehearse:
        return Path(work if work else tempfile.gettempdir()) / "gpu_check.json"
    return Path("gpu_check.json")


def build_parser() -> argparse.ArgumentParser:
    """The command line of launch/gpu_check.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap-gib", type=float, default=15.4,
                        help="per-process GPU memory cap in GiB (default 15.4: a P100's 15.9 GiB less the CUDA "
                             "context the cap does not count); 0 = no cap")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per stage (default 10)")
    parser.add_argument("--max-late-skips", type=int, default=2,
                        help="fp16 overflow skips tolerated after a stage's first clean step (default 2)")
    parser.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    parser.add_argument("--extra", action="store_true", help="also VQA, DAPT under ZeRO-2 and (2+ GPUs) two ranks")
    parser.add_argument("--json", default=None,
                        help="where to write the figures (default gpu_check.json; with --rehearse, "
                             "gpu_check.json in --work or in the system's temporary folder, not the checkout)")
    parser.add_argument("--work", default=None,
                        help="working directory: new, empty or one gpu_check wrote before, as it replaces its stage "
                             "folders there (default: a temporary one, removed after)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per stage (default 240)")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the orchestration on the CPU with the tiny preset in fp32 (checks this script; "
                             "the figures mean nothing)")
    return parser


def require_packages() -> None:
    """ValueError naming the pip command when a package the stages import is missing."""
    try:
        for name in ("deepspeed", "timm", "webdataset"):
            importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"{e.name} is not installed: pip install --no-index --find-links WHEELS deepspeed "
                         "webdataset timm (see launch/gpu_wheels.sh to make the wheel directory once)") from None


def select_stages(stages: list[Stage], only: Optional[str]) -> list[Stage]:
    """The stages named in --only (comma-separated), all without it; ValueError for an unknown name."""
    if not only:
        return stages
    wanted = only.split(",")
    unknown = sorted(set(wanted) - {s.name for s in stages})
    if unknown:
        raise ValueError(f"--only: unknown stage {unknown[0]!r}; here: {', '.join(s.name for s in stages)}")
    return [s for s in stages if s.name in wanted]


def check(args: argparse.Namespace) -> int:
    """Check the options and the GPU, then run the chosen stages in --work (or a temporary folder removed after)."""
    import torch

    if args.steps < WARMUP_STEPS + 2:
        raise ValueError(f"--steps must be >= {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are warm-up)")
    if args.cap_gib < 0:
        raise ValueError("--cap-gib must be >= 0")
    gpu = None
    if not args.rehearse:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU "
                  "machine, or --rehearse to check the script on the CPU", file=sys.stderr)
            return 2
        from framework.gpu import gpu_facts
        from framework.preflight import check_gpu_arch

        gpu = gpu_facts(0)
        check_gpu_arch(gpu)  # before any kernel (the FLOP count runs some): a P100/V100 on a cu128 build
    require_packages()
    cap = None if args.rehearse or args.cap_gib == 0 else args.cap_gib
    stages = select_stages(plan(gpu.has_bf16 if gpu else False, torch.cuda.device_count() if gpu else 0,
                                args.rehearse, args.extra or bool(args.only)), args.only)
    args.json = str(json_path(args.json, args.work, args.rehearse))
    if args.work:  # only a folder of our own: the stages replace their folders in it
        check_own_folder(Path(args.work), WORK_MARKER, "--work", "gpu_check")
        claim_folder(Path(args.work), WORK_MARKER, "launch/gpu_check.py replaces its stage folders and data here")
    check_writable_file(args.json, "--json")  # before minutes of stages, not after them
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        return run_stages(args, stages, work, gpu, cap)
    finally:
        if not args.work:  # our temporary folder goes, whatever happened
            shutil.rmtree(work, ignore_errors=True)


def write_figures(args: argparse.Namespace, gpu: Optional[Any], cap: Optional[float], stages: list[Stage],
                  results: list[StageResult], ratios: dict[str, Optional[float]], t0: float, *, done: bool) -> dict:
    """The figures so far, replaced atomically after every stage: a timeout keeps the finished stages."""
    import torch

    doc = {"ok": done and all(r.ok for r in results) and len(results) == len(stages), "complete": done,
           "device": asdict(gpu) if gpu else {"name": "cpu (rehearsal)"},
           "torch": torch.__version__, "cuda": torch.version.cuda, "cap_gib": cap, "steps": args.steps,
           "warmup_steps_excluded": WARMUP_STEPS, "max_late_skips": args.max_late_skips,
           "update_ratio_vs_fp32": ratios, "seconds": round(time.time() - t0, 1),
           "stages": [{k: v for k, v in asdict(r).items() if k != "log"} for r in results]}
    tmp = Path(f"{args.json}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, args.json)
    return doc


def probe_update_ratios(args: argparse.Namespace, stages: list[Stage], work: Path,
                        cap: Optional[float]) -> dict[str, Optional[float]]:
    """One step in each half precision against one fp32 step, from the same random start: {precision: ratio}."""
    ratios: dict[str, Optional[float]] = {}
    half = sorted({s.precision for s in stages if s.precision != "fp32"})
    if not half:
        return ratios
    base = stage_overrides(Stage("step", "dapt", "fp32"), work, args.steps, cap, args.rehearse)
    probes = [("step-fp32-start", "fp32", ["train.lr=0", "train.warmup_lr=0"]), ("step-fp32", "fp32", []),
              *[(f"step-{p}", p, []) for p in half]]
    for name, precision, extra in probes:
        probe = run_stage(Stage(name, "dapt", precision), ratio_overrides(precision, base) + extra
                          + [f"run.dir={work / name}"], work, args.timeout)
        if probe.exit_code != 0:
            print(f"  {name}: {_last_error(probe.log)}", flush=True)
    for precision in half:
        ratios[precision] = update_ratio(work / f"step-{precision}", work / "step-fp32")
        print(f"  one {precision} step vs fp32: {_num(ratios[precision], 3)}x", flush=True)
    for name, _, _ in probes:
        shutil.rmtree(work / name, ignore_errors=True)
    return ratios


def measure_stage(args: argparse.Namespace, stage: Stage, work: Path, gpu: Optional[Any], cap: Optional[float],
                  flops: dict[str, Optional[tuple[float, float]]], ratios: dict[str, Optional[float]]) -> StageResult:
    """Count the stage's FLOPs (once per model), run it and judge it; its checkpoints are removed after."""
    from framework.gpu import peak_tflops

    overrides = stage_overrides(stage, work, args.steps, cap, args.rehearse)
    key = "vqa" if stage.recipe == "vqa" else "pretrain"  # DAPT and PSD train the same model
    if key not in flops:
        try:
            flops[key] = count_flops(stage, overrides, "cpu" if gpu is None else "cuda")
        except Exception as e:  # noqa: BLE001 - MFU is a figure, not a verdict
            print(f"  {stage.name}: FLOPs not counted ({type(e).__name__}: {e})", flush=True)
            flops[key] = None
    print(f"  {stage.name}: running ...", flush=True)
    result = run_stage(stage, overrides, work, args.timeout)
    summarise(result, _scalars(work / stage.name) if (work / stage.name / "tb").is_dir() else {},
              cap_gib=cap, max_late_skips=args.max_late_skips,
              flops_per_sample=stage_flops(stage, flops[key]) if flops[key] else None,
              peak=peak_tflops(gpu, stage.precision) if gpu else None,
              update_ratio=ratios.get(stage.precision))
    if stage.precision in ratios and ratios[stage.precision] is None:
        result.reasons.append(f"the one-step {stage.precision} vs fp32 comparison did not run")
        result.ok = False
    print(f"  {stage.name}: {'ok' if result.ok else 'FAILED: ' + '; '.join(result.reasons)} "
          f"({result.wall_s:.0f} s)", flush=True)
    shutil.rmtree(work / stage.name / "checkpoints", ignore_errors=True)  # GBs per stage at full size
    return result


def run_stages(args: argparse.Namespace, stages: list[Stage], work: Path, gpu: Optional[Any],
               cap: Optional[float]) -> int:
    """Data, then each stage in turn, the table and the JSON; 0 when every stage passed."""
    import torch

    print(f"gpu_check: {gpu.describe() if gpu else 'CPU rehearsal'}; torch {torch.__version__}; "
          f"{len(stages)} stages x {args.steps} steps; cap {cap} GiB; work {work}", flush=True)
    t0 = time.time()
    write_data(work, args.steps, args.rehearse)
    print(f"  synthetic data written ({time.time() - t0:.0f} s)", flush=True)
    flops: dict[str, Optional[tuple[float, float]]] = {}
    results: list[StageResult] = []
    ratios = probe_update_ratios(args, stages, work, cap)
    for stage in stages:
        results.append(measure_stage(args, stage, work, gpu, cap, flops, ratios))
        write_figures(args, gpu, cap, stages, results, ratios, t0, done=False)
    print(table(results, cap))
    doc = write_figures(args, gpu, cap, stages, results, ratios, t0, done=True)
    ok = doc["ok"]
    print(f"wrote {args.json}; {'every stage passed' if ok else 'FAILED'} in {doc['seconds']:.0f} s", flush=True)
    return 0 if ok else 1


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: check(args))


if __name__ == "__main__":
    sys.exit(main())
