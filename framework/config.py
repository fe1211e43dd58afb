"""YAML recipes -> typed, validated config: `base:` inheritance, dotted CLI overrides, one-line errors."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe problem, reported as one line naming the file and the key path."""


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
    sync_timing: bool = False  # GPU: wait for queued kernels around forward/backward/step (a true time split)


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


@dataclass
class DataConfig:
    train: Union[str, list[str], None] = None  # shards: a directory, a brace pattern, a glob, or a list
    val: Union[str, list[str], None] = None
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples; 0 disables sample shuffling (shard order is still shuffled)
    samples_per_epoch: Optional[int] = None  # default: counted from the shards (or their manifest.json)
    verify_checksums: bool = False  # check shards against manifest.json sha256 before training


@dataclass
class ObjectiveConfig:
    enabled: bool = True
    weight: Union[float, dict] = 1.0  # a number, or a step schedule {kind, start, end, steps}


@dataclass
class DistillConfig:
    enabled: bool = False  # progressive self-distillation with an EMA teacher
    tau_start: float = 0.95  # EMA decay at step 0 ...
    tau_end: float = 0.995  # ... and at the end of the schedule
    tau_schedule: str = "linear"  # constant (tau_end) | linear | progressive (= linear) | cosine
    tau_steps: Optional[int] = None  # schedule length in optimizer steps (default: the whole run)
    mode: Union[str, dict] = "loss_mse"  # loss_mse | output_kl, or {objective: mode}
    temperature: float = 1.0  # softening for output_kl
    ratio_momentum: float = 0.9  # a in r_hat <- a*r_hat + (1-a)*r
    eps: float = 1.0e-8
    detach_weights: bool = True  # adaptive weights carry no gradient


@dataclass
class Config:
    recipe: str = ""  # python module of the recipe, e.g. recipes.medblip
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: dict[str, ObjectiveConfig] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: Union[dict, str] = field(default_factory=dict)  # DeepSpeed config block, or a YAML/JSON file
    # Recipe-declared sections (e.g. model:, vqa:) are validated by the recipe's dataclasses.
    sections: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the recipe file this came from

    def __getattr__(self, name: str) -> Any:  # cfg.model -> cfg.sections["model"]
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)


# ----------------------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and its `base:` recipes (paths relative to the file), merged base-first."""
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"recipe file not found: {path}{where}")
    if path.resolve() in [p.resolve() for p in chain]:
        raise ConfigError(f"{path}: circular base: chain {' -> '.join(map(str, chain + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else (bases or []):
        merged = _deep_merge(merged, _read_yaml((path.parent / b), chain + (path,)))
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
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, path, source)
            except ConfigError as e:
                errors.append(e)
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
    """Build dataclass `cls` from `data`; unknown keys, wrong types and missing values name their path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def import_recipe(name: str, source: str = "<config>") -> types.ModuleType:
    """Import a recipe module by dotted name; it must define build(cfg) -> Task."""
    if not name:
        raise ConfigError(f"{source}: missing required value recipe (e.g. recipe: recipes.medblip)")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{source}: recipe: cannot import {name!r} ({e})") from None
    if not hasattr(module, "build"):
        raise ConfigError(f"{source}: recipe: module {name!r} has no build(cfg) function")
    return module


_CORE = {"recipe", "run", "train", "data", "objectives", "distill", "deepspeed"}


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Read a recipe file (with bases and overrides) and validate it into a Config."""
    path = Path(path)
    source = str(path)
    data = apply_overrides(_read_yaml(path), overrides or [], source)
    return config_from_dict(data, source)


def config_from_dict(data: dict, source: str = "<config>") -> Config:
    """Validate a plain dict (as read from YAML) into a Config, including the recipe's sections."""
    recipe = import_recipe(data.get("recipe", ""), source)
    recipe_sections: dict[str, type] = dict(getattr(recipe, "SECTIONS", {}))
    unknown = sorted(set(data) - _CORE - set(recipe_sections))
    if unknown:
        known = ", ".join(sorted(_CORE | set(recipe_sections)))
        raise ConfigError(f"{source}: unknown key {unknown[0]} (known here: {known})")
    core = {k: v for k, v in data.items() if k in _CORE}
    cfg = from_dict(Config, core, "", source)
    cfg.source = source
    cfg.sections = {
        name: from_dict(cls, data.get(name) or {}, name, source) for name, cls in recipe_sections.items()
    }
    known_objectives = getattr(recipe, "OBJECTIVES", None)
    if known_objectives is not None:
        for name in cfg.objectives:
            if name not in known_objectives:
                raise ConfigError(
                    f"{source}: objectives.{name}: unknown objective (known: {', '.join(sorted(known_objectives))})"
                )
    if isinstance(cfg.deepspeed, str):
        ds_path = Path(cfg.deepspeed)
        if not ds_path.is_absolute() and source and not ds_path.is_file():
            ds_path = Path(source).parent / ds_path
        try:
            text = ds_path.read_text()
            loaded = json.loads(text) if ds_path.suffix == ".json" else yaml.safe_load(text)
        except FileNotFoundError:
            raise ConfigError(f"{source}: deepspeed: file not found: {cfg.deepspeed}") from None
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{source}: deepspeed: {ds_path} is not valid {ds_path.suffix[1:].upper()} "
                              f"({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: deepspeed: {ds_path} must hold a mapping")
        cfg.deepspeed = loaded
    _check(cfg, source)
    return cfg


def _check(cfg: Config, source: str) -> None:
    t = cfg.train
    if t.grad_accum < 1:
        raise ConfigError(f"{source}: train.grad_accum must be >= 1, got {t.grad_accum}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"{source}: data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if t.precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ConfigError(f"{source}: train.precision must be auto, fp32, fp16 or bf16, got {t.precision!r}")
    if t.epochs is None and t.max_steps is None:
        raise ConfigError(f"{source}: set train.epochs or train.max_steps")
    parse_every(cfg.run.save_every, "run.save_every", source)
    parse_every(cfg.run.eval_every, "run.eval_every", source)
    if cfg.run.time_budget:
        parse_duration(cfg.run.time_budget, source)
    if cfg.run.memory_cap_gib is not None and cfg.run.memory_cap_gib <= 0:
        raise ConfigError(f"{source}: run.memory_cap_gib must be > 0 (GiB) or null, got {cfg.run.memory_cap_gib}")


def parse_every(text: str, key: str = "every", source: str = "<config>") -> tuple[int, str]:
    """'100' -> (100, 'step'); '1epoch' -> (1, 'epoch'); '0' -> (0, 'step') meaning never."""
    s = str(text).strip().lower().replace(" ", "")
    unit = "epoch" if s.endswith(("epoch", "epochs")) else "step"
    num = s.removesuffix("s").removesuffix("epoch") if unit == "epoch" else s.removesuffix("s").removesuffix("step")
    try:
        n = int(num)
    except ValueError:
        raise ConfigError(f"{source}: {key}: expected N (steps) or Nepoch, got {text!r}") from None
    return n, unit


def parse_duration(text: str, source: str = "<config>") -> float:
    """'11h30m' / '90m' / '45s' / '2h' -> seconds."""
    import re

    s = str(text).strip().lower()
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or not m or not any(m.groups()):
        raise ConfigError(f"{source}: run.time_budget: expected e.g. 11h30m, 90m or 45s, got {text!r}")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + se


def config_to_dict(cfg: Config) -> dict:
    """Plain-data view of a config (sections flattened back to the top level), for saving."""
    out = {f.name: dataclasses.asdict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
           else getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("sections", "source")}
    out["objectives"] = {k: dataclasses.asdict(v) for k, v in cfg.objectives.items()}
    for name, sec in cfg.sections.items():
        out[name] = dataclasses.asdict(sec) if dataclasses.is_dataclass(sec) else sec
    return out


def save_resolved(cfg: Config, run_dir: Union[str, Path]) -> Path:
    """Write the resolved config as YAML into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(f"# resolved from {cfg.source}\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, target)
    return target
