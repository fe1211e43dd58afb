"""SIGTERM/SIGINT during training: stop at the next step boundary, or at once where no boundary may come."""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator, Optional


class Interrupt(BaseException):
    """A stop signal that arrived while waiting for data or evaluating (phases a step boundary may never end); the
    engine's fit() alone catches it. A BaseException, as KeyboardInterrupt: code that skips a failing sample must not
    eat it."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase  # data | eval


class StopSignals:
    """Which stop was asked for (a signal's name, or run.stop_at_step) and where training is when a signal lands."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self.phase = "start"  # data | step | eval

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, while training: the first signal is recorded (and raises Interrupt while waiting for data
        or evaluating); a second one stops at once in any phase. The previous handlers come back afterwards."""
        def handler(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            again, self.received = self.received is not None, self.received or name
            if again:
                raise KeyboardInterrupt(f"{name} again: stopped without saving")
            if self.phase in ("data", "eval"):
                raise Interrupt(self.phase)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside some test runners)
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:  # in a notebook or test process, Ctrl-C must interrupt again once training is over
            for sig, old in previous.items():
                if old is not None:  # None: installed outside Python, cannot be put back
                    signal.signal(sig, old)
