#!/usr/bin/env python
"""Evaluate an HG-DPO LoRA against a baseline the way the paper does: win rates, colour shift, latent statistics.

    python trainer/evaluate.py --baseline model.safetensors --candidate-lora hgdpo.safetensors \\
        --prompts PartiPrompts.tsv --output-dir eval \\
        --metric-model pickscore=models/pickscore/PickScore_v1 \\
        --metric-processor pickscore=models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --metric-model hpsv2=models/hpsv2/HPS_v2_compressed.pt ...
    python trainer/evaluate.py ... --metrics clip aesthetic      # later: other metrics, no image regenerated

For each prompt and seed both models generate one image (same seed); every metric scores both, and the
report gives the candidate's win rate per metric with a 95% interval (paper Tables 1, 3, 5, 6; with several
``--seeds`` the interval treats prompts and seeds as crossed random factors),
the mean hue / saturation / value change against the baseline (Table 2) and the channel-wise latent
statistics (Fig. 5b). Writes ``report.md``, ``report.html``, ``report.json``, plots and an image grid into
``--output-dir``; images are cached (``--image-cache``), so re-running resumes or reuses them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.cli import add_progress_argument, setup_logging
from hgdpo.errors import run_cli
from hgdpo.evaluation.evaluate import EvaluationOptions, run_evaluation
from hgdpo.options import config_parser, parse_config


def build_parser():
    """``--config FILE`` and one flag per :class:`~hgdpo.evaluation.evaluate.EvaluationOptions` field."""
    parser = config_parser(EvaluationOptions, "Evaluate an HG-DPO model against a baseline: per-metric win rates, "
                                              "colour shift, latent statistics; Markdown/HTML/JSON report.")
    add_progress_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    options, extra = parse_config(EvaluationOptions, build_parser(), argv)
    setup_logging()

    def run() -> str:
        report = run_evaluation(options.to_config(), show_progress=not extra["no_progress"])
        rates = ", ".join(f"{metric['label']} {100 * metric['win_rate']['rate']:.1f}%"
                          for metric in report["metrics"].values())
        return (f"Report written to {options.output_dir}/report.md ({report['settings']['num_pairs']} pairs): "
                f"{report['candidate']} win rate vs {report['baseline']}: {rates}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
