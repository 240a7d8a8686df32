"""The errors a user can act on, and the one way tuneforge turns an exception into one line.

This module is neutral ground: ``lit_modules/`` and ``datamodules/`` both import it, and it imports
neither. ``train.py`` ends a run that raises :class:`ConfigError` or :class:`DataError` with the
message as one line on stderr, exit code 2, and no half-written run directory.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line naming the key."""


class DataError(ValueError):
    """A problem with the user's data or data options; the message is one line naming the file and line."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the step, the batch and its examples."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most ``limit``
    characters: how third-party errors are quoted inside tuneforge's own one-line messages."""
    text = error if isinstance(error, str) else str(error)
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    if not line and not isinstance(error, str):
        line = type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
