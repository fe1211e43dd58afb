"""Shared test helpers: run entry points in subprocesses, locate the optional real data."""
from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_launch(script: str):
    """launch/<script>.py imported as a module (the entry points are plain files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{script}", ROOT / "launch" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A quiet local HTTP server for `directory` while the block runs; yields its base URL (no trailing slash)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what a launcher sets


def run_entry(script: str, *args: str, ranks: int = 0, timeout: int = 600, env: dict | None = None,
              cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run launch/<script> with python (ranks=0) or the deepspeed launcher (ranks>=1); capture output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for k in DIST_ENV:
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
