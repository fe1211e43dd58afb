"""The run directory belongs to one run: refuse a start that would rewrite another run's, or share it.

A run directory holds `config.yaml` (the resolved config), `checkpoints/` and `tb/`. Starting into one that holds a
run is a resume, allowed only with the same settings, except the keys in RESUMABLE_KEYS, which change how a run is
watched or chunked, never what it computes. Checks here write nothing: a refused start leaves the directory as it was.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, ConfigError, config_from_dict, config_to_dict, flatten
from .files import atomic_write_text

# Keys a resumed run may change: how it is watched, chunked, checkpointed or capped, not what it trains on or how.
RESUMABLE_KEYS = frozenset({
    "run.dir", "run.resume", "run.time_budget", "run.stop_at_step", "run.log_every", "run.eval_every", "run.save_every",
    "run.keep_last", "run.max_nonfinite", "run.memory_cap_gib", "run.health_window",
    "run.health_tolerance", "data.verify_checksums",
})


class RunDirError(ValueError):
    """The run directory cannot be used for this start (another run's, unwritable, in use)."""


def check_writable(run_dir: Path) -> None:
    """One line, before anything is built, if `run_dir` (or the folder it would be made in) cannot be written."""
    probe = run_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"run.dir={run_dir}: {probe} is a file, not a directory; choose another run.dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"run.dir={run_dir}: {probe} is not writable; choose a run.dir you can write to")


def run_dir_of(path: "Path | str") -> Optional[Path]:
    """The run directory (the one holding config.yaml) of a run dir, its checkpoints/ dir or one of its tags."""
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def saved_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's saved config.yaml as validated plain data (defaults filled in), or None if there is none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is damaged ({type(e).__name__}); restore it or use another run.dir") from None
    try:  # through the same loader, so settings saved before a key existed compare as its default
        return config_to_dict(config_from_dict(data, str(path)))
    except ConfigError:
        return data  # written by another version of the recipe: compare what is there


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every dotted key whose value differs, outside RESUMABLE_KEYS."""
    a, b = flatten(saved), flatten(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def check_same_run(cfg: Config, has_checkpoint: bool) -> None:
    """Refuse to start into a run directory that holds a run with other settings (or any run, with resume=none)."""
    run_dir = Path(cfg.run.dir)
    saved = saved_config(run_dir)
    if saved is None and not has_checkpoint:
        return
    if cfg.run.resume == "none" and has_checkpoint:
        raise RunDirError(f"run.dir={run_dir} already holds a run's checkpoints and run.resume=none would replace "
                          "them: use another run.dir, resume it (run.resume=auto), or delete the directory")
    if saved is None:
        return
    diff = differences(saved, config_to_dict(cfg))
    if diff:
        shown = "; ".join(f"{k}: {_short(old)} -> {_short(new)}" for k, old, new in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise RunDirError(f"run.dir={run_dir} holds a run with other settings ({shown}{more}): continue it with its "
                          f"own settings (--recipe {run_dir / 'config.yaml'}), or start another run.dir from its "
                          f"checkpoint with run.resume={run_dir / 'checkpoints'}/step_N (weights, optimizer and "
                          "position carry over)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else "..." + text[-77:]  # a path's end says most


SHARED_FS = ("every rank must see the same run.dir: on several nodes put it on a filesystem they all mount (NFS, "
             "Lustre, ...) at the same path; see docs/scaling.md")


def check_same_resume_tag(tag: Optional[str], where: Path) -> None:
    """Refuse (on every rank, one line) unless every rank found the same checkpoint `tag` (None: none) at `where`."""
    from .distributed import gather_objects

    seen = gather_objects((tag, socket.gethostname()))
    odd = [(r, t, host) for r, (t, host) in enumerate(seen) if t != seen[0][0]]
    if odd:
        r, t, host = odd[0]
        raise RunDirError(f"ranks disagree on the checkpoint to resume in {where}: rank 0 ({seen[0][1]}) finds "
                          f"{seen[0][0] or 'none'}, rank {r} ({host}) finds {t or 'none'}; {SHARED_FS}")


def check_shared(run_dir: Path, timeout_s: float = 10.0) -> None:
    """Rank 0 writes a file with a fresh name into run_dir; every rank must see it (waiting up to timeout_s for a
    network filesystem), else every rank stops with one line naming the shared-filesystem requirement."""
    from .distributed import barrier, gather_objects, rank, world_size

    if world_size() == 1:
        return
    name = gather_objects(f".shared-check-{os.getpid()}-{time.time_ns()}" if rank() == 0 else None)[0]
    probe = run_dir / name
    if rank() == 0:
        atomic_write_text(probe, f"{socket.gethostname()}\n")
    barrier()
    deadline = time.monotonic() + timeout_s
    while not probe.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)  # a network filesystem may show a new file to another client a moment later
    seen = gather_objects((probe.is_file(), socket.gethostname()))
    if rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [(r, host) for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        r, host = blind[0]
        raise RunDirError(f"run.dir={run_dir}: rank {r} ({host}) does not see the files rank 0 ({seen[0][1]}) writes "
                          f"there ({len(blind)} of {len(seen)} ranks blind); {SHARED_FS}")


class RunLock:
    """`with RunLock(run_dir):` an exclusive lock on the run directory while training (rank 0 takes it)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.file: Optional[Any] = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise RunDirError(f"run.dir={self.path.parent} is in use by {holder}: wait for it to finish, or use "
                              "another run.dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"training process {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
