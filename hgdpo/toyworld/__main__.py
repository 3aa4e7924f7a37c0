"""``python -m hgdpo.toyworld build OUT``: rebuild the toy world's SFT model and scorer from scratch
(three phases: plain noise, offset noise, then v-prediction on a zero-terminal-SNR schedule; resumable after
each)."""

from __future__ import annotations

import argparse
import logging
import sys

from hgdpo.options import add_options, options_of
from hgdpo.toyworld.build import BuildSettings, build_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hgdpo.toyworld", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="Train the SFT model and the scorer into OUT.")
    build.add_argument("output_dir", metavar="OUT",
                       help="Folder for base/, offset/, sft/, scorer.safetensors and world.json: a new one, or one "
                       "where an interrupted build finished base/ or offset/ (the build resumes after it).")
    add_options(build, BuildSettings)
    args = parser.parse_args(argv)
    settings = BuildSettings(**{spec.name: getattr(args, spec.name) for spec in options_of(BuildSettings)
                                if hasattr(args, spec.name)})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        build_world(args.output_dir, settings)
    except (FileExistsError, ValueError) as error:
        build.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
