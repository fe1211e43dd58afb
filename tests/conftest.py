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
if str(ROOT) not in sys.path:  # plain `pytest` puts only this folder on the path; the tests import tests.*
    sys.path.insert(0, str(ROOT))

from tests.entry_zygote import close as close_zygote, zygote_for  # noqa: E402
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_launch(script: str):
    """launch/<script>.py imported as a module (the entry points are plain files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{script}", ROOT / "launch" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look their module up there
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


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each, not two each
    import torch

    torch.set_num_threads(1)

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what a launcher sets


def entry_env(env: dict | None = None) -> dict[str, str]:
    """The environment run_entry gives an entry point: this one, plus `env`, as one process (no launcher's)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for k in DIST_ENV:
        full_env.pop(k, None)
    return full_env


def run_entry(script: str, *args: str, ranks: int = 0, timeout: int = 600, env: dict | None = None,
              cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run launch/<script> with python (ranks=0) or the deepspeed launcher (ranks>=1); capture output.

    With ranks=0 and no extra `env`, the process is forked from tests/entry_zygote.py's server (the libraries
    already imported); MEDVLM_TEST_FRESH=1 starts a fresh interpreter every time."""
    full_env = entry_env(env)
    if ranks:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(ROOT / "launch" / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / "launch" / script), *args]
        if env is None and (zygote := zygote_for(full_env, ROOT)) is not None:
            return zygote.run(cmd[1:], full_env, cwd, timeout)  # the same command, minus ~4 s of imports
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


# Real devices as torch.cuda.get_device_properties describes them (name, capability, total memory in bytes).
GPUS = {"P100": ("Tesla P100-PCIE-16GB", 6, 0, 17_071_734_784), "T4": ("Tesla T4", 7, 5, 15_655_829_504),
        "V100": ("Tesla V100-SXM2-16GB", 7, 0, 16_935_682_048), "A100": ("NVIDIA A100-SXM4-40GB", 8, 0, 42_298_834_944),
        "H200": ("NVIDIA H200", 9, 0, 150_110_011_392)}


def fake_gpu(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Make torch.cuda describe GPU `kind` (its properties and what torch answers about it), nothing else faked.

    torch.cuda.is_bf16_supported() answers True on every GPU since torch 2.3 (bf16 tensors can be created, by
    emulation on pre-Ampere GPUs): the fake answers the same, so code that trusts it picks bf16 on a P100.
    """
    import types

    import torch

    name, major, minor, memory = GPUS[kind]
    props = types.SimpleNamespace(name=name, major=major, minor=minor, total_memory=memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda *a, **k: 1)  # one such GPU in the machine


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def world_of_one() -> Iterator[None]:
    """framework.distributed's world of one (an in-memory store, no TCP port), its variables set while in use."""
    import torch.distributed as dist

    from framework.distributed import init_distributed

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    for k in DIST_ENV:
        os.environ.pop(k, None)
    if dist.is_initialized():  # made by an earlier module: DeepSpeed still reads the variables at initialize()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    else:
        init_distributed()
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_rank():
    """A world of one (gloo) in this process, as `python launch/train.py` makes it (framework.distributed)."""
    yield from world_of_one()


def pytest_unconfigure(config: pytest.Config) -> None:
    close_zygote()


LONGEST_FILE = "test_demo.py"  # the demo end to end: ~20% of the suite's time, in one worker


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the longest file first, so that under `-n 2 --dist loadfile` one worker starts it at once while the
    other takes the rest (started last, it would run alone at the end)."""
    items.sort(key=lambda item: item.path.name != LONGEST_FILE)  # stable: every other test keeps its order
