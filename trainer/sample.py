#!/usr/bin/env python
"""Generate images with an HG-DPO LoRA: the LoRA at a weight, LAN (Eq. 7) and PickScore best-of-N.

    python trainer/sample.py --model model.safetensors --lora hgdpo.safetensors "a woman singing on the stage"
    python trainer/sample.py --model M --lora hgdpo.safetensors --lan --best-of 4 \\
        --scorer-model models/pickscore/PickScore_v1 \\
        --scorer-processor models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K "a woman singing on the stage"
    python trainer/sample.py --model M --lora L --prompts prompts.txt --num-images 4 --output-dir out

PNG files carry the generation parameters in their ``parameters`` text chunk, as the WebUI writes
them, so the WebUI's PNG Info reads them back.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.cli import add_progress_argument, setup_logging  # noqa: E402
from hgdpo.errors import run_cli  # noqa: E402
from hgdpo.inference.generate import GenerateJob, run_generate_job  # noqa: E402
from hgdpo.options import config_parser, parse_config  # noqa: E402


def build_parser():
    """``--config FILE``, positional prompts and one flag per :class:`~hgdpo.inference.generate.GenerateJob` field."""
    parser = config_parser(GenerateJob, "Generate images with an SD1.5 model and an HG-DPO LoRA (weight, LAN, "
                                        "best-of-N).")
    parser.add_argument("prompt_text", nargs="*", metavar="PROMPT", help="Prompt(s) to generate.")
    add_progress_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    job, extra = parse_config(GenerateJob, build_parser(), argv)
    job = replace(job, prompt=[*extra["prompt_text"], *job.prompt])
    setup_logging()

    def run() -> str:
        written = run_generate_job(job, show_progress=not extra["no_progress"])
        return f"{len(written)} image(s) written to {job.output_dir}"

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
