"""The errors of data reading: DataError for the user to fix, DecodeError for a recipe's decode to reject a sample."""
from __future__ import annotations

from typing import Sequence


class DataError(ValueError):
    """A data problem a user must fix (no shards, corrupt shard, undecodable samples); one line."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's DataError reaches the main process re-raised as DataError("Caught DataError in
        # DataLoader worker process N.\nOriginal Traceback ...\n...DataError: <message>"): keep <message>.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class DecodeError(ValueError):
    """Raised by a recipe's decode for a sample it cannot use; `expected` names the keys it needs.

    Alternatives are written with |, e.g. DecodeError("no image", expected=("jpg|png", "txt")).
    """

    def __init__(self, message: str, expected: Sequence[str] = ()):
        super().__init__(message)
        self.expected = tuple(expected)
