"""YAML recipes -> typed, validated config: `base:` inheritance, dotted CLI overrides, one-line errors.

The sections themselves are in framework.sections; they are imported here too, so that `framework.config` is the one
module a recipe imports its config types from.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import yaml

from .sections import (
    DISTILL_MODES,
    TAU_SCHEDULES,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    DistillingConfig,
    ObjectiveConfig,
    RunConfig,
    ShardDataConfig,
    TrainConfig,
    check_at_least,
    check_distill_modes,
    distill_settings,
    drop_retired,
    parse_duration,
    parse_every,
)

if TYPE_CHECKING:
    from .task import Recipe

__all__ = ["DISTILL_MODES", "TAU_SCHEDULES", "Config", "ConfigError", "DataConfig", "DistillConfig", "DistillingConfig",
           "ObjectiveConfig", "RunConfig", "ShardDataConfig", "TrainConfig", "apply_overrides", "check_at_least",
           "check_distill_modes", "coerce", "config_from_dict", "config_to_dict", "distill_settings", "drop_retired",
           "flatten", "from_dict", "import_recipe", "load_config", "parse_duration", "parse_every", "save_resolved"]


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
