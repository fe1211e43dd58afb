"""Entry-point helper: user errors become one line on stderr and a non-zero exit, not a traceback."""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from .config import ConfigError
from .shards import DataError

# Exceptions that mean "the user must fix something"; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError, ValueError)


_DISK_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _disk_message(e: OSError) -> str:
    """An unwritable or full disk in one line: the path and what to do."""
    where = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left writing {where}: free some space (old checkpoints: run.keep_last) or write elsewhere"
    return f"cannot write {where} ({e.strerror}): choose a directory you can write to"


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`; print user errors as `error: ...` (one line) and return 2; FRAMEWORK_DEBUG=1 re-raises.

    A rank of several that failed leaves at once (os._exit, its line printed): at interpreter exit gloo can abort
    the process after a failure ("terminate called without an active exception"), turning exit status 2 into -6."""
    peers: list[bool] = []
    code = _run_cli(main, peers)
    if code != 0 and any(peers):
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_cli(main: Callable[[], int], peers: list[bool]) -> int:
    """run_cli's body; appends to `peers` whether this process had a group of several ranks at the end."""
    import torch.distributed as dist

    from .distributed import shutdown_distributed
    from .health import TrainingStopped
    from .preflight import PreflightError

    try:
        code = main()
        if not shutdown_distributed(drain=True):  # meet every rank, then tear the group down together
            print("error: another rank failed before the end (its output says why)", file=sys.stderr)
            return code or 1
        return code
    except (PreflightError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, TrainingStopped) else 2
    except (OSError, *USER_ERRORS) as e:
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS and not isinstance(e, FileNotFoundError):
            print(f"error: {_disk_message(e)}", file=sys.stderr)
            return 2
        if not isinstance(e, USER_ERRORS) or os.environ.get("FRAMEWORK_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    finally:  # after a failure (a no-op after success): close the group, without waiting on peers that may be gone
        peers.append(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        shutdown_distributed(drain=False)
