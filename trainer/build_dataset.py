#!/usr/bin/env python
"""Build an HG-DPO preference dataset with AI feedback from your own SD1.5 model (paper Eq. 4-6).

    python trainer/build_dataset.py --model model.safetensors --prompts prompts.txt --output-dir triplets
    python trainer/build_dataset.py --model M --prompts PartiPrompts.tsv --category People --pool-size 20 \\
        --output-dir triplets --export-pickapic triplets.parquet
    accelerate launch trainer/build_dataset.py ...          # several GPUs share the prompts

For each prompt the model samples a pool of images, the scorer ranks them, the best becomes the winner
and the worst the loser. The result is an hgdpo triplet dataset (``<output-dir>/index.parquet``) that
``trainer/train.py --dataset`` reads. Re-running the same command after an interruption continues
where it stopped (each finished prompt is committed on its own).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.cli import add_progress_argument, setup_logging  # noqa: E402
from hgdpo.data.builder import BuildConfig  # noqa: E402
from hgdpo.errors import run_cli  # noqa: E402
from hgdpo.options import config_parser, parse_config  # noqa: E402


def build_parser():
    """``--config FILE`` and one flag per :class:`~hgdpo.data.builder.BuildConfig` field, plus ``--no-progress``."""
    parser = config_parser(BuildConfig, "Build an HG-DPO preference dataset (prompt, winner, loser) with AI feedback.")
    add_progress_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    config, extra = parse_config(BuildConfig, build_parser(), argv)
    setup_logging()

    def run() -> str:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        from hgdpo.data.builder import build_dataset

        config.validate()
        device = config.device or PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
        result = build_dataset(config, config.load_scorer(device), show_progress=not extra["no_progress"])
        return (f"Dataset written to {result.output_dir}: {result.num_pairs} pairs from {result.num_prompts} "
                f"prompts ({result.num_skipped} skipped)")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
