"""Errors that command-line entry points report as one clear line instead of a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from hgdpo.models.loading import ModelFamilyError


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps being NaN)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ModelFamilyError, ValueError, FileNotFoundError, TrainingError)


def run_cli(action: Callable[[], str]) -> int:
    """Run a command's work; print its summary (first process only) or a user error as one line.

    Returns the exit code: 0, or 1 for a user error. ``HGDPO_DEBUG=1`` shows the traceback instead.
    """
    try:
        summary = action()
    except USER_ERRORS as error:
        if os.environ.get("HGDPO_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary)
    return 0
