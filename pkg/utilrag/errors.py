"""One base for every user-facing error: the CLI prints it as one line and exits 2."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UtilragError(Exception):
    """A problem the user can fix (config, data, an earlier stage not run); never a traceback."""


class MissingInputError(UtilragError):
    """A stage's input (an earlier stage's output) is missing or has no manifest."""


def user_errors_as_themselves(call: Callable[[], T]) -> T:
    """``call()`` (a ``ray.get`` of our task), with a user mistake raised inside the task (a
    UtilragError) raised here as itself: one line at the CLI, not Ray's remote traceback."""
    import ray.exceptions

    try:
        return call()
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UtilragError):
            raise e.cause from None
        raise
