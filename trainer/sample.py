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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.cli import add_device_arguments, add_scorer_arguments, setup_logging  # noqa: E402
from hgdpo.errors import run_cli  # noqa: E402
from hgdpo.inference.sampling import SAMPLERS, SCHEDULES, SamplingConfig  # noqa: E402

DEFAULTS = SamplingConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate images with an SD1.5 model and an HG-DPO LoRA (weight, LAN, best-of-N).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("prompt_text", nargs="*", metavar="PROMPT", help="Prompt(s) to generate.")
    add("--prompt", action="append", default=[], help="A prompt (repeatable; same as a positional PROMPT).")
    add("--prompts", default=None, help="Prompt file: .txt (one per line), .tsv/.csv (with a header) or .jsonl.")
    add("--category", default=None, help="Keep only rows of this Category of a .tsv/.csv (e.g. People).")
    add("--model", required=True,
        help="SD1.5-family model (the SFT model): single-file .safetensors/.ckpt, diffusers folder or hub id.")
    add("--lora", default=None, help="HG-DPO LoRA (kohya .safetensors); the DPO model is the model plus this LoRA.")
    add("--lora-weight", type=float, default=DEFAULTS.lora_weight, help="LoRA weight (paper: 0.5).")
    add("--dpo-model", default=None,
        help="A separate DPO checkpoint instead of (or besides) --lora; costs a second copy of the UNet.")
    add("--lan", type=float, nargs="?", const=1.0, default=DEFAULTS.lan_strength, metavar="STRENGTH",
        help="Latent adaptive normalization: sample SFT and DPO in lockstep and renormalise the DPO latent "
             "after each step (Eq. 7). Bare --lan means strength 1 (the paper); 0 turns it off.")
    add("--best-of", type=int, default=1, metavar="N",
        help="Generate N candidates per image and keep the one the scorer prefers.")
    add("--num-images", type=int, default=1, help="Images per prompt.")
    add("--seed", type=int, default=0,
        help="Base seed: image j of prompt i uses seed + (i*num_images + j)*best_of (+k for candidate k).")
    add("--steps", type=int, default=DEFAULTS.steps, help="Sampling steps (paper: 50).")
    add("--cfg", type=float, default=DEFAULTS.guidance_scale, help="Classifier-free guidance scale (paper: 5.0).")
    add("--sampler", default=DEFAULTS.sampler, choices=tuple(SAMPLERS), help="Sampler (diffusers scheduler).")
    add("--schedule", default=DEFAULTS.schedule, choices=SCHEDULES, help="Noise schedule (karras: Karras sigmas).")
    add("--width", type=int, default=DEFAULTS.width, help="Image width, a multiple of 8.")
    add("--height", type=int, default=DEFAULTS.height, help="Image height, a multiple of 8.")
    add("--negative-prompt", default=DEFAULTS.negative_prompt, help="Negative prompt for guidance.")
    add("--batch-size", type=int, default=4, help="Images (or candidates) per UNet batch.")
    add("--output-dir", default="outputs", help="Folder for the PNG files (created).")
    add("--save-candidates", action="store_true",
        help="With --best-of: also save every candidate, ranked, under OUTPUT_DIR/candidates/.")
    add("--save-sft", action="store_true", help="With --lan: also save the SFT trajectory's image (no extra cost).")
    add("--two-forwards", action="store_true",
        help="With --lan and --lora: evaluate SFT and DPO in two UNet calls instead of one batched call.")
    add_scorer_arguments(parser)
    add("--model-config-dir", default=None,
        help="Diffusers-layout config folder for a single-file --model (default: the bundled SD1.5 configs).")
    add_device_arguments(parser)
    add("--no-progress", action="store_true", help="No progress bars.")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging()

    def run() -> str:
        from hgdpo.inference.generate import GenerateJob, run_generate_job

        job = GenerateJob.from_arguments(arguments)
        written = run_generate_job(job, show_progress=not arguments.no_progress)
        return f"{len(written)} image(s) written to {job.output_dir}"

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
