"""One base for every user-facing error: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UtilragError(Exception):
    """A problem the user can fix (config, data, an earlier stage not run); never a traceback."""


class MissingInputError(UtilragError):
    """A stage's input (an earlier stage's output) is missing or has no manifest."""
