"""Command-line pieces shared by the ``trainer/*.py`` entry points: logging and the progress flag."""

from __future__ import annotations

import argparse
import logging
import os

QUIET_LOGGERS = ("diffusers", "transformers", "PIL", "urllib3", "httpx")


def setup_logging() -> None:
    """INFO logs on the first process, warnings elsewhere; libraries' chatter silenced."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (a run setting, not saved in a config file)."""
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
