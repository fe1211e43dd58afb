"""Building a run: precision, the DeepSpeed engine (AdamW, warmup + cosine), data, distillation, plugins, resume."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import checkpoint, deepspeed_patches
from .compile import compile_towers
from .config import Config, ShardDataConfig, distill_settings
from .distill import setup_distillation
from .distributed import DistInfo, say
from .ema import check_zero_stage
from .gpu import GpuFacts
from .loss_weights import StaticLossWeights
from .master_weights import MasterWeights
from .run_env import Precision, RunEnv
from .preflight import (
    GIB,
    MemoryEstimate,
    check_disk,
    check_fits,
    checkpoint_bytes,
    estimate_for_task,
)
from .progress import Progress
from .rundir import check_same_resume_tag, check_same_run, check_writable
from .schedules import warmup_cosine
from .shards import expand_shards, verify_checksums
from .streams import MapStream, ShardStream
from .task import Batch, Combine, ModelOutput, Plugin, Task


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: Any = None,
                 decay_1d: bool = False) -> list[dict]:
    """Trainable parameters split into decayed (matrices; with decay_1d also biases, norms and other 1-d
    parameters) and not decayed (the rest, and the recipe's no_decay list)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 and not decay_1d) or (no_decay is not None and no_decay(name, p))
        (keep if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: Config, precision: Precision, world_size: int) -> dict:
    """The recipe's deepspeed block completed from train/data settings (which win, with a clear error on conflict)."""
    ds = dict(cfg.deepspeed)
    t = cfg.train
    derived = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": t.grad_accum,
               "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
               "gradient_clipping": t.clip_grad}
    for key, value in derived.items():
        if key in ds and ds[key] != value and key != "train_batch_size":
            raise ValueError(f"{cfg.source}: deepspeed.{key}={ds[key]} conflicts with the recipe's value {value}; "
                             "set it in train:/data: instead")
        ds[key] = value
    # DeepSpeed's own defaults fill in the rest (fp16: dynamic loss scaling from 2^16, window 1000, minimum 1)
    ds["fp16"] = {"loss_scale": 0, **ds.get("fp16", {}), "enabled": precision.name == "fp16"}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision.name == "bf16"}
    zero = ds.get("zero_optimization", {})
    if precision.name == "bf16" and zero.get("stage", 0) == 1 and "offload_optimizer" not in zero:
        # accumulate micro-batch gradients in fp32 (DeepSpeed's BF16_Optimizer), not bf16's 8-bit mantissa; ZeRO 0
        # cannot (DeepSpeed 0.19 refuses bf16 + fp32 accumulation there), ZeRO 2 reduces into its own buffers
        ds["data_types"] = {"grad_accum_dtype": "fp32", **ds.get("data_types", {})}
    ds.setdefault("steps_per_print", 10 ** 9)  # the engine prints its own progress
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{cfg.source}: deepspeed.optimizer/scheduler are set by train: (AdamW, warmup + cosine); "
                         "remove them from the deepspeed block")
    return ds


class ExtensionError(ValueError):
    """A DeepSpeed extension must be compiled and this machine cannot."""


def check_can_build(op: str, needed_by: str) -> None:
    """Refuse in one line, before any compile starts, when DeepSpeed would JIT-build `op` without a compiler."""
    import shutil

    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(op):  # pre-built into this DeepSpeed install (DS_BUILD_OPS=1)
        return
    compiler = os.environ.get("CXX", "c++")
    missing = [name for name, tool in (("a C++ compiler", compiler), ("ninja", "ninja")) if not shutil.which(tool)]
    if missing:
        raise ExtensionError(f"{needed_by} needs DeepSpeed's {op} extension, compiled on first use, but "
                             f"{' and '.join(missing)} cannot be found: install g++ (e.g. apt-get install g++) and "
                             "ninja (pip install ninja), or remove the offload")


def build_deepspeed(cfg: Config, task: Task, precision: Precision, total_steps: int, world_size: int) -> Any:
    """deepspeed.initialize with AdamW and the warmup+cosine schedule as a pure function of the optimizer step."""
    import deepspeed

    t = cfg.train
    ds_config = deepspeed_config(cfg, precision, world_size)
    if "offload_optimizer" in ds_config.get("zero_optimization", {}):
        check_can_build("cpu_adam", "deepspeed.zero_optimization.offload_optimizer")
    groups = param_groups(task.model, t.weight_decay, task.no_decay, t.decay_1d)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # fused: one vectorised kernel over all tensors (CPU and CUDA) instead of a Python loop per parameter
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=True)

    def lr_factor(step: int) -> float:
        lr = warmup_cosine(step, peak=t.lr, warmup_from=t.warmup_lr, warmup_steps=t.warmup_steps,
                           end=t.min_lr, total=total_steps)
        return lr / t.lr if t.lr > 0 else 0.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    deepspeed_patches.patch_engine(engine)
    return engine


# ----------------------------------------------------------------------------- building a run


@dataclass
class Run:
    """Everything one training run needs, built by build_run(); framework.engine.fit(run) trains it."""

    cfg: Config
    dist: DistInfo
    task: Task  # the recipe's Task; task.model is what DeepSpeed wraps (ds.module)
    ds: Any  # the DeepSpeed engine
    forward: Callable[[Batch], ModelOutput]  # ds, or self-distillation's student-then-teacher step around it
    combine: Combine  # ModelOutput -> (total loss, logs)
    plugins: list[Plugin]  # the recipe's, then the framework's (EMA teacher, adaptive weighter)
    stream: Union[ShardStream, MapStream]
    precision: Precision
    memory: MemoryEstimate
    total_steps: int
    steps_per_epoch: int
    progress: Progress = field(default_factory=Progress)  # what plugins and models read: a resume restores it in place
    health: dict[str, Any] = field(default_factory=dict)  # the health monitor's state at the resumed checkpoint
    skipped_samples: int = 0  # undecodable samples so far (restored on resume)
    resumed_from: Optional[str] = None  # the checkpoint tag this run continues from
    # fp16: DeepSpeed's loss scaler already skips a step whose gradients overflow (a non-finite loss makes them so);
    # fp32/bf16 have none: the engine reads the step's losses before the step and skips it itself (both: 1 sync/step)
    loss_scaler_skips: bool = False

    @property
    def accum(self) -> int:
        return self.cfg.train.grad_accum

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def build_run(cfg: Config, task: Task, env: RunEnv) -> Run:
    """Check the run directory and the data; set up distillation, DeepSpeed and plugins; resume.

    Writes nothing: a start that fails here leaves the run directory as it was (fit() writes config and logs).
    """
    run_dir = Path(cfg.run.dir)
    check_writable(run_dir)
    check_same_run(cfg, checkpoint.find_resume_tag(run_dir / "checkpoints") is not None)
    check_zero3(cfg, task, env.zero_stage)
    dist, gpu, precision = env.dist, env.gpu, env.precision
    checkpoint.seed_host_rngs(cfg.train.seed, dist.rank)  # Python/NumPy streams from the config (resume restores)
    stream = build_stream(cfg, task, dist)
    steps_per_epoch = len(stream) // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {len(stream)} batches per rank, fewer than train.grad_accum="
                         f"{cfg.train.grad_accum}: use more data, a smaller batch or less accumulation")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    if cfg.train.warmup_steps > total_steps:
        say(f"warning: train.warmup_steps={cfg.train.warmup_steps} exceeds this run's {total_steps} optimizer "
            f"steps: the learning rate stays in warmup and never reaches train.lr={cfg.train.lr:g}")
    plugins, combine = list(task.plugins), task.combine_losses or StaticLossWeights(cfg.objectives, total_steps)
    distillation = setup_distillation(task, cfg, total_steps) if distill_settings(cfg) else None
    if distillation:
        plugins += distillation.plugins
        combine = distillation.weighter
    memory = preflight_memory(cfg, task, precision, dist, gpu)
    preflight_disk(cfg, task, precision)
    if precision.name == "fp16":
        deepspeed_patches.allow_fp16(dist.device, gpu)  # before deepspeed.initialize's sanity check
    ds = build_deepspeed(cfg, task, precision, total_steps, dist.world_size)
    for module in task.fp32_modules:
        module.float()  # DeepSpeed cast everything to half; momentum/EMA copies must stay fp32 to move
    if cfg.train.compile:
        compile_towers(task.model, gpu)  # in place, after the casts (a dtype change would recompile)
    masters = MasterWeights(ds)
    readers = [p for p in plugins if hasattr(p, "use_master_weights")]
    for plugin in readers:
        plugin.use_master_weights(masters)
    if readers and precision.name != "fp32":
        say(f"{', '.join(p.name for p in readers)} read the {masters.source}")
    progress = Progress()
    for plugin in plugins:
        plugin.setup(ds.module, precision.dtype, dist.device, progress)
    run = Run(cfg, dist, task, ds, distillation.forward(ds) if distillation else ds, combine, plugins, stream,
              precision, memory, total_steps, steps_per_epoch, progress, loss_scaler_skips=precision.name == "fp16")
    restore(run)
    return run


def check_zero3(cfg: Config, task: Task, stage: int) -> None:
    """Refuse ZeRO stage 3 in one line before anything is built when a plugin of the recipe needs whole parameters
    (its `needs_whole_parameters` says why), instead of after DeepSpeed has partitioned them."""
    if stage < 3:
        return
    if distill_settings(cfg):
        check_zero_stage(stage)  # the EMA teacher's own line, as setup_distillation would give it
    for plugin in task.plugins:
        reason = getattr(plugin, "needs_whole_parameters", None)
        if reason:
            raise ValueError(f"{reason}: use DeepSpeed ZeRO stage 0, 1 or 2 (deepspeed.zero_optimization.stage), "
                             "not 3")


def build_stream(cfg: Config, task: Task, dist: DistInfo) -> Union[ShardStream, MapStream]:
    """The training batches: the task's map-style dataset, or data.train's shards through task.decode."""
    if task.train_dataset is not None:
        return MapStream(task.train_dataset, task.collate, cfg.data.batch_size, seed=cfg.train.seed,
                         rank=dist.rank, world_size=dist.world_size, batch_multiple=cfg.train.grad_accum)
    if not isinstance(cfg.data, ShardDataConfig):
        raise ValueError(f"{cfg.source}: the recipe's Task streams shards (decode) but its config declares no "
                         "shard settings (data: ShardDataConfig)")
    if cfg.data.train is None:
        raise ValueError(f"{cfg.source}: data.train is not set (a shard directory, pattern or list)")
    urls = expand_shards(cfg.data.train)
    if cfg.data.verify_checksums:
        verify_checksums(urls)
    return ShardStream(urls, task.decode, task.collate, cfg.data.batch_size, seed=cfg.train.seed,
                       shuffle_buffer=cfg.data.shuffle_buffer, rank=dist.rank, world_size=dist.world_size,
                       samples_per_epoch=cfg.data.samples_per_epoch, batch_multiple=cfg.train.grad_accum)


def preflight_memory(cfg: Config, task: Task, precision: Precision, dist: DistInfo,
                     gpu: Optional[GpuFacts]) -> MemoryEstimate:
    """Print the per-GPU memory estimate before anything is allocated; refuse a run that cannot fit."""
    est = estimate_for_task(cfg, task, precision.name, dist.world_size, cuda=gpu is not None)
    say(f"precision {precision.name}, {dist.world_size} rank(s)\n{est.table()}")
    cap = cfg.run.memory_cap_gib
    check_fits(est, gpu, cap_bytes=int(cap * GIB) if cap else None)
    return est


def preflight_disk(cfg: Config, task: Task, precision: Precision) -> None:
    """Refuse a run whose disk cannot hold one checkpoint; warn in one line if it cannot hold run.keep_last of them."""
    shared = sum(p.numel() for m in task.frozen_modules for p in m.parameters())
    teacher = sum(p.numel() for p in task.model.parameters()) - shared if distill_settings(cfg) else 0
    ckpt = Path(cfg.run.dir) / "checkpoints"
    existing = sum(1 for p in ckpt.iterdir() if (p / checkpoint.COMPLETE).is_file()) if ckpt.is_dir() else 0
    warning = check_disk(Path(cfg.run.dir), checkpoint_bytes(task.model, precision.name, teacher),
                         cfg.run.keep_last, existing)
    if warning:
        say(warning, err=True)


def check_world_size(tag_dir: Path, world_size: int) -> None:
    """Refuse (one line) to resume a checkpoint written by another number of ranks: the global batch, each rank's
    RNG streams and data position, and ZeRO's partitions all depend on it."""
    saved = len(list(tag_dir.glob("rank_*.pt")))  # one per rank (engine.Trainer._save), ZeRO or not
    if saved and saved != world_size:
        raise ValueError(f"{tag_dir} was written by {saved} rank(s) and this run has {world_size}: resume it on "
                         f"{saved} rank(s) (the global batch, each rank's RNG streams and data position and ZeRO's "
                         "partitions depend on it), or start a new run.dir from its weights (docs/scaling.md)")


def restore(run: Run) -> None:
    """Resume per run.resume: module, optimizer, schedule and loss scale (DeepSpeed), position, plugins, RNGs."""
    mode = run.cfg.run.resume
    if mode == "none":
        return
    if mode == "auto":
        tag, ckpt_dir = checkpoint.find_resume_tag(run.ckpt_dir), run.ckpt_dir
        check_same_resume_tag(tag, ckpt_dir)  # a rank resuming alone from step 0 would train other weights
        if tag is None:
            return
    else:
        path = Path(mode)
        complete = (path / checkpoint.COMPLETE).is_file()
        check_same_resume_tag(path.name if complete else None, path.parent)
        if not complete:
            raise FileNotFoundError(f"run.resume: {mode} is not a complete checkpoint directory")
        tag, ckpt_dir = path.name, path.parent
    check_world_size(ckpt_dir / tag, run.dist.world_size)
    client, rank_state = checkpoint.load(run.ds, ckpt_dir, tag, run.dist.rank)
    run.progress.load_state_dict(client["position"])  # in place: the plugins and models hold it
    run.skipped_samples, run.health = client.get("skipped_samples", 0), client.get("health", {})
    states = {**client.get("plugins", {}), **rank_state.get("plugins", {})}
    for plugin in run.plugins:
        if plugin.name in states:
            plugin.load_state_dict(states[plugin.name])
    if "rng" in rank_state:
        checkpoint.set_rng_state(rank_state["rng"])
    run.resumed_from = tag
    p = run.progress
    say(f"resumed from {ckpt_dir / tag}: step {p.step}, epoch {p.epoch}, batch {p.batch_in_epoch}", err=True)
