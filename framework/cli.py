"""Entry-point helper: user errors become one line on stderr and a non-zero exit, not a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable

from .config import ConfigError
from .data import DataError
from .registry import RegistryError

# Exceptions that mean "the user must fix something"; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, RegistryError, FileNotFoundError,
                                                 ValueError)


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`; print user errors as `error: ...` (one line) and return 2; FRAMEWORK_DEBUG=1 re-raises."""
    from .distributed import shutdown_distributed
    from .engine import TrainingStopped
    from .preflight import PreflightError

    try:
        code = main()
        if not shutdown_distributed(drain=True):  # meet every rank, then tear the group down together
            print("error: another rank failed before the end (its output says why)", file=sys.stderr)
            return code or 1
        return code
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except USER_ERRORS as e:
        if os.environ.get("FRAMEWORK_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:  # after a failure (a no-op after success): close the group, without waiting on peers that may be gone
        shutdown_distributed(drain=False)
