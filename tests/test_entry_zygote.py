"""tests/entry_zygote.py starts an entry point as `python script args` would: the same exit status, output, argv,
working directory, sys.path, thread joins and atexit order, tracebacks and timeouts as a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, entry_env
from tests.entry_zygote import zygote_for

PROBE = """\
import atexit, os, sys, threading, time
print("argv", sys.argv, "cwd", os.getcwd(), "path", sys.path[:2], "name", __name__, "file", __file__)
print("python path", os.environ.get("PYTHONPATH"), "framework loaded", "framework.engine" in sys.modules)
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise ValueError("boom")
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "sleep":
    time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["ok", "exit3", "message", "raise", "kill"])
def test_a_forked_entry_point_ends_as_a_fresh_interpreter_does(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = entry_env()
    fresh = subprocess.run([sys.executable, str(script), mode, "x y"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
    zygote = zygote_for(env, ROOT)
    if zygote is None:
        pytest.skip("MEDVLM_TEST_FRESH=1: no server")
    forked = zygote.run([str(script), mode, "x y"], env, tmp_path, timeout=120)
    assert forked.args == fresh.args
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert {"ok": 0, "exit3": 3, "message": 1, "raise": 1, "kill": -9}[mode] == fresh.returncode
    assert "framework loaded False" in fresh.stdout  # our code is never imported before the script runs
    if mode != "kill":
        assert fresh.stdout.endswith("thread joined\natexit ran\n")  # non-daemon threads first, then atexit


def test_a_forked_entry_point_past_its_timeout_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    zygote = zygote_for(entry_env(), ROOT)
    if zygote is None:
        pytest.skip("MEDVLM_TEST_FRESH=1: no server")
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run([str(script), "sleep"], entry_env(), tmp_path, timeout=2)
    assert zygote.run([str(script), "ok"], entry_env(), tmp_path, timeout=120).returncode == 0  # still serving
