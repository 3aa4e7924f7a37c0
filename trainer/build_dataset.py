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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.cli import add_device_arguments, add_scorer_arguments, scorer_from_arguments, setup_logging  # noqa: E402
from hgdpo.errors import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build an HG-DPO preference dataset (prompt, winner, loser) with AI feedback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", required=True,
        help="SD1.5-family model: single-file checkpoint (.safetensors/.ckpt), diffusers folder or hub id.")
    add("--prompts", required=True, help="Prompt file: .txt (one per line), .tsv/.csv (with a header) or .jsonl.")
    add("--output-dir", required=True, help="Dataset folder (created; re-run the same command to resume).")
    add("--pool-size", type=int, default=20, help="Images generated per prompt, N (paper: 20).")
    add_scorer_arguments(parser)
    add("--resolution", default="512", help="Image size: N for NxN or WxH, multiples of 8.")
    add("--steps", type=int, default=50, help="DPM-Solver++ sampling steps (paper: 50).")
    add("--cfg", type=float, default=5.0, help="Classifier-free guidance scale (paper: 5.0).")
    add("--negative-prompt", default="", help="Negative prompt for guidance (empty: the unconditional prompt).")
    add("--batch-size", type=int, default=4,
        help="Images per UNet batch; the images of one prompt share one text encoding.")
    add("--seed", type=int, default=0,
        help="Base seed; image j of prompt i uses a seed derived from (seed, i, j), recorded per image.")
    add("--loser-rank", type=int, default=1,
        help="Loser = the k-th worst image of the pool (1 = the worst, as in the paper; see its Table 5).")
    add("--min-score-gap", type=float, default=0.0,
        help="Skip (and record as skipped) prompts whose best-minus-worst score gap is below this.")
    add("--keep-pool", action="store_true", help="Keep all N images of every pool, not only winner and loser.")
    add("--prompt-column", default=None,
        help="Prompt column of a .tsv/.csv (default: 'Prompt' if present, else the first) or key of a .jsonl "
             "(default: 'prompt').")
    add("--category", default=None,
        help="Keep only rows of this Category of a .tsv/.csv (e.g. 'People' in PartiPrompts.tsv).")
    add("--export-pickapic", default=None, metavar="PATH",
        help="Also write the dataset as a Pick-a-Pic v2 style .parquet file at PATH.")
    add("--model-config-dir", default=None,
        help="Diffusers-layout config folder for a single-file --model (default: the bundled SD1.5 configs).")
    add_device_arguments(parser)
    add("--image-format", default="png", choices=("png", "jpeg"), help="Format of the image files.")
    add("--no-progress", action="store_true", help="No progress bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging()
    from hgdpo.data.builder import BuildConfig, build_dataset

    config = BuildConfig(
        model=arguments.model, prompts=arguments.prompts, output_dir=arguments.output_dir,
        pool_size=arguments.pool_size, steps=arguments.steps, guidance_scale=arguments.cfg,
        resolution=arguments.resolution, batch_size=arguments.batch_size, seed=arguments.seed,
        loser_rank=arguments.loser_rank, min_score_gap=arguments.min_score_gap, keep_pool=arguments.keep_pool,
        negative_prompt=arguments.negative_prompt, prompt_column=arguments.prompt_column,
        category=arguments.category, scorer=arguments.scorer, scorer_model=arguments.scorer_model,
        model_config_dir=arguments.model_config_dir, device=arguments.device, dtype=arguments.dtype,
        image_format=arguments.image_format, export_pickapic=arguments.export_pickapic,
    )

    def run() -> str:
        config.validate()
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        device = config.device or PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
        scorer = scorer_from_arguments(arguments, device)
        result = build_dataset(config, scorer, show_progress=not arguments.no_progress)
        return (f"Dataset written to {result.output_dir}: {result.num_pairs} pairs from {result.num_prompts} "
                f"prompts ({result.num_skipped} skipped)")

    return run_cli(run)

if __name__ == "__main__":
    sys.exit(main())
