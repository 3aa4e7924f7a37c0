"""Command-line pieces shared by the ``trainer/*.py`` entry points: scorer and sampling options."""

from __future__ import annotations

import argparse
import logging
import os

import torch

from hgdpo.training.config import DTYPES

QUIET_LOGGERS = ("diffusers", "transformers", "PIL", "urllib3", "httpx")


def setup_logging() -> None:
    """INFO logs on the first process, warnings elsewhere; libraries' chatter silenced."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere; otherwise the named precision."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scorer``, ``--scorer-model``, ``--scorer-processor``."""
    parser.add_argument("--scorer", default="pickscore",
                        help="Scorer: 'pickscore' (paper), 'clip', or a plug-in 'package.module:callable'.")
    parser.add_argument("--scorer-model", default=None,
                        help="Scorer model folder or hub id (default: the scorer's own default).")
    parser.add_argument("--scorer-processor", default=None,
                        help="Scorer processor folder or hub id (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K).")


def scorer_from_arguments(arguments: argparse.Namespace, device: torch.device | str):
    """The scorer the options name (loaded lazily: the scorer stack is heavy)."""
    from hgdpo.feedback.scorers import load_scorer

    options = {"processor": arguments.scorer_processor} if arguments.scorer_processor else {}
    return load_scorer(arguments.scorer, model=arguments.scorer_model, device=device, **options)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``."""
    parser.add_argument("--device", default=None, help="Device, e.g. cuda:0 or cpu (default: the accelerator).")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="Model precision (auto: fp16 on CUDA, fp32 elsewhere).")
