"""YAML recipes -> typed, validated config: `base:` inheritance, dotted CLI overrides, one-line errors."""
from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

import yaml

if TYPE_CHECKING:
    from .task import Recipe


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


# ----------------------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and its `base:` recipes (paths relative to the file), merged base-first."""
    where = f" (base of {chain[-1]})" if chain else ""
    if path.is_dir():
        raise ConfigError(f"recipe {path}{where} is a directory; give a recipe YAML file (e.g. {path}/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}{where}")
    if path.resolve() in [p.resolve() for p in chain]:
        raise ConfigError(f"{path}: circular base: chain {' -> '.join(map(str, chain + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}{where}: not a YAML text file (byte {e.start} is not UTF-8 text); give a recipe "
                          "YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}{where}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    if not (bases is None or isinstance(bases, str)
            or isinstance(bases, list) and all(isinstance(b, str) and b for b in bases)):
        raise ConfigError(f"{path}: base: expected a recipe file or a list of them, got {bases!r}")
    ds_file = isinstance(data.get("deepspeed"), str)
    if ds_file:  # read here, relative to this file, so that deepspeed.* overrides reach its keys
        data["deepspeed"] = _read_deepspeed(data["deepspeed"], str(path))
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else (bases or []):
        merged = _deep_merge(merged, _read_yaml((path.parent / b), chain + (path,)))
    if ds_file:
        merged.pop("deepspeed", None)  # a named file is the whole block, as before: not merged into a base's
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"{source}: override {key}: {p} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, path: str, source: str) -> Any:
    """Validate `value` against type `tp` (dataclasses, Optional/Union, list, dict, scalars)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path, source)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, path, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: {path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path}: expected a list, got {value!r}")
        return [coerce(item_tp, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {value!r}")
        if not args:
            return value
        return {k: coerce(args[1], v, f"{path}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 4e-7 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{source}: {path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # save_every: 100
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, path: str = "", source: str = "<config>") -> Any:
    """Build dataclass `cls` from `data`, then run its check(); unknown keys, wrong types, missing values and
    failed checks name their key path (and `source`) in one line."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key {_join(path, unknown[0])} (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], _join(path, name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required value {_join(path, name)}")
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "check"):
            obj.check()
    except ConfigError as e:  # a section's own check: prefix the file (its message names the key path)
        raise ConfigError(f"{source}: {e}") from None
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def import_recipe(name: str, source: str = "<config>") -> "Recipe":
    """The `RECIPE` declaration (framework.task.Recipe) of the recipe module `name`."""
    from .task import Recipe

    if not name:
        raise ConfigError(f"{source}: missing required value recipe (e.g. recipe: recipes.medblip.pretrain)")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{source}: recipe: cannot import {name!r} ({e})") from None
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"{source}: recipe: module {name!r} declares no RECIPE = framework.task.Recipe(...)")
    return recipe


DEEPSPEED_SECTIONS = ("zero_optimization", "fp16", "bf16", "optimizer", "scheduler", "activation_checkpointing",
                      "flops_profiler", "comms_logger", "data_types")


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Read a recipe file (with bases and overrides) and validate it into the recipe's Config class."""
    path = Path(path)
    source = str(path)
    data = apply_overrides(_read_yaml(path), overrides or [], source)
    return config_from_dict(data, source)


def config_from_dict(data: dict, source: str = "<config>") -> Config:
    """Validate a plain dict (as read from YAML) into the recipe's Config subclass (RECIPE.config)."""
    recipe = import_recipe(data.get("recipe", ""), source)
    data = recipe.config.upgrade(dict(data), source)
    if isinstance(data.get("deepspeed"), str):
        data["deepspeed"] = _read_deepspeed(data["deepspeed"], source)
    if isinstance(data.get("deepspeed"), dict):  # DeepSpeed's own sections are mappings: say so before it crashes
        for key in DEEPSPEED_SECTIONS:
            value = data["deepspeed"].get(key)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: deepspeed.{key}: expected a mapping (e.g. {{stage: 0}}), got {value!r}")
    cfg = from_dict(recipe.config, data, "", source)
    cfg.source = source
    for name in cfg.objectives:
        if name not in recipe.objectives:
            raise ConfigError(f"{source}: objectives.{name}: unknown objective (known: "
                              f"{', '.join(sorted(recipe.objectives))})")
    return cfg


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


def _read_deepspeed(spec: str, source: str) -> dict:
    """deepspeed: a YAML/JSON file (relative to the recipe file) -> its mapping."""
    ds_path = Path(spec)
    if not ds_path.is_absolute() and source and not ds_path.is_file():
        ds_path = Path(source).parent / ds_path
    try:
        text = ds_path.read_text()
        loaded = json.loads(text) if ds_path.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{source}: deepspeed: file not found: {spec}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{source}: deepspeed: {ds_path} is not valid {ds_path.suffix[1:].upper()} "
                          f"({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: deepspeed: {ds_path} must hold a mapping")
    return loaded


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


def config_to_dict(cfg: Config) -> dict:
    """Plain-data view of a config (its YAML keys, at every depth), for saving and comparing."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.metadata.get("yaml", True)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_resolved(cfg: Config, run_dir: Union[str, Path]) -> Path:
    """Write the resolved config as YAML into the run directory (atomically)."""
    from .files import atomic_write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = f"# resolved from {cfg.source}\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(run_dir / "config.yaml", text)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a nested mapping."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{key}.")
        else:
            out[key] = v
    return out
