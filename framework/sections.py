"""The config's typed sections (run:, train:, data:, objectives:, distill:, deepspeed:) and their checks."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

class ConfigError(ValueError):
    """A recipe problem, reported as one line naming the file and the key path."""


def check_at_least(section: str, obj: Any, minimums: dict[str, float]) -> None:
    """ConfigError `<section>.<key> must be >= <minimum>, got <value>` for the first key below its minimum (None,
    an unset optional value, passes)."""
    for key, low in minimums.items():
        value = getattr(obj, key)
        if value is not None and value < low:
            raise ConfigError(f"{section}.{key} must be >= {low}, got {value}")


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: checkpoints, TensorBoard events, resolved config
    resume: str = "auto"  # auto (latest complete checkpoint in dir, if any) | none | path to a checkpoint dir
    save_every: str = "1epoch"  # "N" optimizer steps or "Nepoch"; "0" disables periodic saves
    keep_last: int = 3  # checkpoints kept in dir (older ones pruned after a save completes)
    log_every: int = 10  # optimizer steps between console lines (TensorBoard gets every step)
    eval_every: str = "1epoch"  # like save_every; evaluation runs only if the recipe provides one
    time_budget: Optional[str] = None  # e.g. "11h30m": save and stop before this wall time is spent
    max_nonfinite: int = 5  # consecutive non-finite losses tolerated before stopping with a checkpoint
    init_from: Optional[str] = None  # weights to start from (recipe decides the format); not a resume
    stop_at_step: Optional[int] = None  # save and stop after this optimizer step, as if preempted (chunked runs)
    memory_cap_gib: Optional[float] = None  # GPU: cap this process's allocator (train as if on a smaller GPU)
    health_window: int = 50  # optimizer steps an objective may sit at its chance level before it is flagged
    health_tolerance: float = 0.02  # "at chance": within this fraction of the chance-level loss

    def check(self) -> None:
        parse_every(self.save_every, "run.save_every")
        parse_every(self.eval_every, "run.eval_every")
        if self.time_budget:
            parse_duration(self.time_budget)
        if self.memory_cap_gib is not None and self.memory_cap_gib <= 0:
            raise ConfigError(f"run.memory_cap_gib must be > 0 (GiB) or null, got {self.memory_cap_gib}")
        check_at_least("run", self, {"keep_last": 0, "log_every": 1, "max_nonfinite": 1, "health_window": 1})
        if not 0 <= self.health_tolerance < 1:
            raise ConfigError(f"run.health_tolerance must be in [0, 1), got {self.health_tolerance}")


@dataclass
class TrainConfig:
    epochs: Optional[int] = None  # length in epochs over the training data ...
    max_steps: Optional[int] = None  # ... or in optimizer steps (wins when both are set)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    warmup_lr: float = 0.0  # learning rate at step 0, rising linearly to lr over warmup_steps
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine decay from lr to min_lr over the remaining steps
    weight_decay: float = 0.0
    decay_1d: bool = False  # also decay biases, norms and other 1-d parameters (BLIP decays every parameter)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 1.0  # global gradient-norm clipping (0 disables)
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    seed: int = 42
    compile: bool = False  # torch.compile the model's towers (framework.compile; refused on sm_60/sm_70)

    def check(self) -> None:
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.epochs is None and self.max_steps is None:
            raise ConfigError("set train.epochs or train.max_steps")
        check_at_least("train", self, {"grad_accum": 1, "epochs": 1, "max_steps": 1, "warmup_steps": 0, "lr": 0,
                                       "warmup_lr": 0, "min_lr": 0, "weight_decay": 0, "clip_grad": 0})
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {self.betas}")


@dataclass
class DataConfig:
    """data: of a recipe whose training set is a map-style dataset (its own section says where it is)."""


    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 2

    def check(self) -> None:
        check_at_least("data", self, {"batch_size": 1, "num_workers": 0})


@dataclass
class ShardDataConfig(DataConfig):
    """data: of a recipe that streams WebDataset shards."""

    train: Union[str, list[str], None] = None  # shards: a directory, a brace pattern, a glob, or a list
    val: Union[str, list[str], None] = None
    shuffle_buffer: int = 1000  # samples; 0 disables sample shuffling (shard order is still shuffled)
    samples_per_epoch: Optional[int] = None  # default: counted from the shards (or their manifest.json)
    verify_checksums: bool = False  # check shards against manifest.json sha256 before training


@dataclass
class ObjectiveConfig:
    enabled: bool = True
    weight: Union[float, dict] = 1.0  # a number, or a step schedule {kind, start, end, steps}


DISTILL_MODES = ("loss_mse", "output_kl")
TAU_SCHEDULES = ("constant", "linear", "cosine")  # linear: the study's 0.95 -> 0.995 ramp


def check_distill_modes(spec: Union[str, dict]) -> None:
    """distill.mode is one of DISTILL_MODES, or {objective: one of them}."""
    for name, mode in (spec.items() if isinstance(spec, dict) else [("", spec)]):
        if mode not in DISTILL_MODES:
            where = f"distill.mode.{name}" if name else "distill.mode"
            raise ConfigError(f"{where}: unknown mode {mode!r}; known: {', '.join(DISTILL_MODES)}")


@dataclass
class DistillConfig:
    enabled: bool = False  # progressive self-distillation with an EMA teacher
    tau_start: float = 0.95  # EMA decay at step 0 ...
    tau_end: float = 0.995  # ... and at the end of the schedule
    tau_schedule: str = "linear"  # constant (tau_end) | linear (the study's) | cosine
    tau_steps: Optional[int] = None  # schedule length in optimizer steps (default: the whole run)
    mode: Union[str, dict] = "loss_mse"  # loss_mse | output_kl, or {objective: mode}
    temperature: float = 1.0  # softening for output_kl
    ratio_momentum: float = 0.9  # a in r_hat <- a*r_hat + (1-a)*r
    eps: float = 1.0e-8
    detach_weights: bool = True  # adaptive weights carry no gradient

    def check(self) -> None:
        for key in ("tau_start", "tau_end", "ratio_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"distill.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.tau_schedule == "progressive":  # its name before the schedules had one name each
            raise ConfigError("distill.tau_schedule: 'progressive' is now called 'linear' (the same straight ramp)")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ConfigError(f"distill.tau_schedule: unknown schedule {self.tau_schedule!r}; known: "
                              f"{', '.join(TAU_SCHEDULES)}")
        check_distill_modes(self.mode)
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        check_at_least("distill", self, {"eps": 0})


@dataclass
class Config:
    """The framework's sections; a recipe subclasses it with its own typed sections (model:, image:, vqa: ...)."""

    recipe: str = ""  # python module of the recipe, e.g. recipes.medblip.pretrain
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: ShardDataConfig = field(default_factory=ShardDataConfig)  # a map-style recipe declares DataConfig instead
    objectives: dict[str, ObjectiveConfig] = field(default_factory=dict)
    deepspeed: dict = field(default_factory=dict)  # DeepSpeed config block (a YAML/JSON file name is read in its place)
    source: str = field(default="", metadata={"yaml": False})  # the recipe file this came from (not a YAML key)
    # Keys earlier versions wrote into every run's config.yaml; where this recipe's config no longer has them they
    # are dropped on reading (with a note), so old run directories still load. A subclass extends the tuple.
    RETIRED: ClassVar[tuple[str, ...]] = ("distill", "data.train", "data.val", "data.shuffle_buffer",
                                          "data.samples_per_epoch", "data.verify_checksums",
                                          "run.sync_timing")  # now launch/train.py --sync-timing

    @classmethod
    def upgrade(cls, data: dict, source: str) -> dict:
        """YAML data as this version reads it: RETIRED keys dropped (a recipe may refuse or map more first)."""
        return drop_retired(cls, data, source)

    def check(self) -> None:
        """Checks across sections (each section checks itself)."""
        from .schedules import scheduled_value

        for name, objective in self.objectives.items():
            try:
                scheduled_value(objective.weight, 0, 1)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"objectives.{name}.weight: {e}") from None


@dataclass
class DistillingConfig(Config):
    """The sections of a recipe that may train with progressive self-distillation (framework.distill)."""

    distill: DistillConfig = field(default_factory=DistillConfig)

    def check(self) -> None:
        super().check()
        if isinstance(self.distill.mode, dict) and self.objectives:
            unknown = sorted(set(self.distill.mode) - set(self.objectives))
            if unknown:
                raise ConfigError(f"distill.mode.{unknown[0]}: not an objective of this recipe "
                                  f"(objectives: {', '.join(sorted(self.objectives))})")


def distill_settings(cfg: Config) -> Optional[DistillConfig]:
    """cfg.distill when the recipe can self-distill and distill.enabled is set; else None."""
    return cfg.distill if isinstance(cfg, DistillingConfig) and cfg.distill.enabled else None


def _has_key(cls: type, dotted: str) -> bool:
    """Whether dataclass `cls` declares the (dotted) YAML key."""
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(cls)
    if head not in hints or not any(f.name == head and f.metadata.get("yaml", True) for f in dataclasses.fields(cls)):
        return False
    return not rest or not dataclasses.is_dataclass(hints[head]) or _has_key(hints[head], rest)


def drop_retired(cls: type, data: dict, source: str) -> dict:
    """`data` without the keys of cls.RETIRED that `cls` does not declare (a one-line note for each one present)."""
    from .distributed import say

    dropped = []
    for dotted in getattr(cls, "RETIRED", ()):
        *parents, last = dotted.split(".")
        section = data
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and last in section and not _has_key(cls, dotted):
            section = _copy_path(data, parents)
            del section[last]
            dropped.append(dotted)
    if dropped:
        say(f"note: {source}: {', '.join(dropped)}: not settings of this recipe (an earlier version wrote them): "
            "ignored")
    return data


def _copy_path(data: dict, parents: list[str]) -> dict:
    """The section at `parents` of `data`, copied on the way down so the caller's dicts are not changed."""
    section = data
    for part in parents:
        section[part] = dict(section[part])
        section = section[part]
    return section


def parse_every(text: str, key: str = "every") -> tuple[int, str]:
    """'100' -> (100, 'step'); '1epoch' -> (1, 'epoch'); '0' -> (0, 'step') meaning never."""
    s = str(text).strip().lower().replace(" ", "")
    unit = "epoch" if s.endswith(("epoch", "epochs")) else "step"
    num = s.removesuffix("s").removesuffix("epoch") if unit == "epoch" else s.removesuffix("s").removesuffix("step")
    try:
        n = int(num)
    except ValueError:
        raise ConfigError(f"{key}: expected N (steps) or Nepoch, got {text!r}") from None
    return n, unit


def parse_duration(text: str) -> float:
    """'11h30m' / '90m' / '45s' / '2h' -> seconds."""
    import re

    s = str(text).strip().lower()
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or not m or not any(m.groups()):
        raise ConfigError(f"run.time_budget: expected e.g. 11h30m, 90m or 45s, got {text!r}")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + se
