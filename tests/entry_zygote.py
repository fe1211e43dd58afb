"""Start launch/ entry points as processes forked from one that has imported torch, transformers, timm and
DeepSpeed once, instead of paying ~4 s of imports in each fresh interpreter (most of a tiny run's time).

Run as a script, this file is the server: it imports the libraries, then forks one child per request read from
stdin. The child takes the request's argv, environment and working directory, points its stdin at /dev/null and
its stdout and stderr at files, runs the script as `__main__` and ends as the interpreter would (non-daemon threads
joined, atexit handlers run, streams flushed). The server records each child's exit status in a file.

Imported (by tests/conftest.py), `Zygote.run` is the client. It is used only where the child's environment is the
one the server imported under: any other environment, and multi-rank runs, start a fresh interpreter. The
entry points' own code, the framework and the recipes are never imported before the fork. MEDVLM_TEST_FRESH=1
turns the server off: every entry point then starts as a user starts it.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

IGNORED_ENV = ("PYTEST_CURRENT_TEST",)  # changes from test to test; nothing reads it at import


# ----------------------------------------------------------------------------- the server (run as a script)

# What every entry point imports before its first line of work. `framework` first: as in a fresh interpreter, its
# __init__ tells DeepSpeed it runs on the CPU (where no NVIDIA driver is loaded) before DeepSpeed is imported.
PRELOAD = ("framework", "deepspeed", "numpy", "PIL.Image", "timm", "torch", "torch.utils.tensorboard",
           "transformers.models.bert.modeling_bert", "webdataset", "yaml")


def _preload() -> None:
    """Import PRELOAD, then forget our own package, which each child imports afresh."""
    for name in PRELOAD:
        importlib.import_module(name)
    for name in [m for m in sys.modules if m == "framework" or m.startswith("framework.")]:
        del sys.modules[name]


def _exit_status(status: int) -> int:
    """waitpid's status as subprocess reports it: the exit code, or -N for a process killed by signal N."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


def _child(req: dict, base_path: list[str]) -> None:
    """Become `python script args...` with the request's environment, directory and output files; never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    script = req["argv"][0]
    sys.argv = list(req["argv"])
    python_path = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *python_path, *base_path]
    import numpy.random
    import runpy

    numpy.random.seed()  # a fresh interpreter's global numpy state comes from the OS, not from its parent
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # printed as the interpreter prints it: from the script's own frame on
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        code = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1
    threading._shutdown()  # as the interpreter does at exit: join non-daemon threads, then run atexit
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def serve() -> None:
    """Read one JSON request a line; fork; answer the child's pid; write its exit status to req['status']."""
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # nothing the imports print can reach the answers
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base_path = sys.path[1 + len(python_path):]  # what follows this script's folder and PYTHONPATH
    _preload()
    status_files: dict[int, str] = {}
    finished: dict[int, int] = {}

    def write_status(pid: int, code: int) -> None:
        path = status_files.pop(pid)
        try:
            with open(path + ".tmp", "w") as f:
                f.write(str(code))
            os.replace(path + ".tmp", path)
        except OSError:  # the client gave up and removed its folder: nobody waits for this status
            pass

    def reap(*_: object) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in status_files:
                write_status(pid, _exit_status(status))
            else:
                finished[pid] = _exit_status(status)

    signal.signal(signal.SIGCHLD, reap)
    for line in requests:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            _child(req, base_path)
        status_files[pid] = req["status"]
        if pid in finished:
            write_status(pid, finished.pop(pid))
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()


# ----------------------------------------------------------------------------- the client (in the test process)

class Zygote:
    """A server started with environment `env`; `run` starts entry points from it."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = dict(env)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=self.env, cwd=cwd)

    def accepts(self, env: dict[str, str]) -> bool:
        """True where a child with environment `env` sees what a fresh interpreter would: the server's own."""
        strip = lambda e: {k: v for k, v in e.items() if k not in IGNORED_ENV}  # noqa: E731
        return self.proc.poll() is None and strip(env) == strip(self.env)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """Like subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)."""
        cmd = [sys.executable, *argv]
        with tempfile.TemporaryDirectory(prefix="zygote-") as d:
            req = {"argv": argv, "env": env, "cwd": str(cwd), "out": f"{d}/out", "err": f"{d}/err",
                   "status": f"{d}/status"}
            with self.lock:
                self.proc.stdin.write(json.dumps(req) + "\n")
                self.proc.stdin.flush()
                pid = json.loads(self.proc.stdout.readline())["pid"]
            status = Path(req["status"])
            deadline = time.monotonic() + timeout
            while not status.exists():
                if self.proc.poll() is not None:  # a dead server records no status
                    raise RuntimeError(f"the entry-point server died (exit {self.proc.returncode}) running {cmd}")
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    for _ in range(600):  # the server reaps it at once; 30 s at most
                        if status.exists():
                            break
                        time.sleep(0.05)
                    raise subprocess.TimeoutExpired(cmd, timeout, Path(req["out"]).read_text(),
                                                    Path(req["err"]).read_text())
                time.sleep(0.05)
            return subprocess.CompletedProcess(cmd, int(status.read_text()), Path(req["out"]).read_text(),
                                               Path(req["err"]).read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_servers: list[Zygote] = []  # the most recently used last
MAX_SERVERS = 2  # a test process's environment changes rarely (a library sets a variable once, a test patches one)


def zygote_for(env: dict[str, str], cwd: Path) -> Optional[Zygote]:
    """A server whose environment is `env` (started on first use: ~5 s), or None where MEDVLM_TEST_FRESH=1."""
    if os.environ.get("MEDVLM_TEST_FRESH") == "1":
        return None
    for server in _servers:
        if server.accepts(env):
            _servers.remove(server)
            _servers.append(server)
            return server
    if len(_servers) >= MAX_SERVERS:
        _servers.pop(0).close()
    _servers.append(Zygote(env, cwd))
    return _servers[-1]


def close() -> None:
    """Stop this process's servers (their children have all been waited for)."""
    while _servers:
        _servers.pop().close()


if __name__ == "__main__":
    serve()
