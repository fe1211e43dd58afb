"""Shared test helpers: run entry points in subprocesses, locate the optional real data."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_entry(script: str, *args: str, ranks: int = 0, timeout: int = 600, env: dict | None = None,
              cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run launch/<script> with python (ranks=0) or the deepspeed launcher (ranks>=1); capture output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    if ranks:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(ROOT / "launch" / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / "launch" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
