#!/usr/bin/env python
"""Report on an HG-DPO preference dataset: score gaps, latent statistics (paper Fig. 5b), contact sheets.

    python trainer/dataset_report.py --dataset triplets --output-dir report
    python trainer/dataset_report.py --dataset triplets --output-dir report --model model.safetensors

Writes ``report.json``, ``report.md``, ``score_gap_hist.png``, ``contact_sheet.html`` / ``.png`` and, with
``--model``, ``latent_stat_distance.png``: the distance between the channel-wise mean / std of the VAE
latents of the best pool image and of the n-th ranked one (for datasets built with ``--keep-pool``), or of
winner and loser otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.options import parse_resolution  # noqa: E402
from hgdpo.errors import run_cli  # noqa: E402
from hgdpo.options import check_value  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a report (statistics, plots, contact sheets) on an HG-DPO preference dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", required=True, help="Triplet dataset folder (index.parquet) or Pick-a-Pic style parquet.")
    add("--output-dir", required=True, help="Report folder (created).")
    add("--model", default=None,
        help="SD1.5-family model whose VAE encodes the images for the latent statistics (paper Fig. 5b); "
             "without it that section is skipped.")
    add("--model-config-dir", default=None,
        help="Diffusers-layout config folder for a single-file --model (default: the bundled SD1.5 configs).")
    add("--max-pairs", type=int, default=16, help="Pairs shown on the contact sheets.")
    add("--batch-size", type=int, default=8, help="Images per VAE batch.")
    add("--resolution", type=int, default=None,
        help="Encode images at NxN (default: the first image's size, rounded down to a multiple of 8).")
    add("--max-latent-items", type=int, default=None,
        help="Encode at most this many pairs and this many kept pools (default: all).")
    add("--device", default=None, help="Device for the VAE, e.g. cuda:0 (default: cpu).")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("diffusers", "transformers", "PIL", "matplotlib", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    def run() -> str:
        from hgdpo.evaluation.dataset_report import write_report

        if not Path(arguments.dataset).expanduser().exists():
            raise FileNotFoundError(f"--dataset {arguments.dataset} not found; give a triplet dataset folder or a "
                                    "Pick-a-Pic style .parquet file.")
        check_value("--max-pairs", arguments.max_pairs, "int", {"at_least": 0})
        check_value("--batch-size", arguments.batch_size, "int", {"at_least": 1})
        if arguments.resolution is not None:
            parse_resolution(str(arguments.resolution))
        if arguments.max_latent_items is not None:
            check_value("--max-latent-items", arguments.max_latent_items, "int", {"at_least": 1})
        if Path(arguments.output_dir).exists() and not Path(arguments.output_dir).is_dir():
            raise ValueError(f"--output-dir {arguments.output_dir} is a file; give a folder.")
        components = None
        if arguments.model:
            from hgdpo.models.loading import load_model

            components = load_model(arguments.model, config_dir=arguments.model_config_dir)
        report = write_report(arguments.dataset, arguments.output_dir, components, arguments.max_pairs,
                              batch_size=arguments.batch_size, resolution=arguments.resolution,
                              max_latent_items=arguments.max_latent_items, device=arguments.device)
        gap = report["scores"]["gap"]
        summary = f"Report written to {arguments.output_dir}: {report['dataset']['num_pairs']} pairs"
        if gap["count"]:
            summary += f", score gap mean {gap['mean']:.4g} (median {gap['median']:.4g})"
        latent = report["latent"]
        if latent:
            summary += f", latent statistics of {latent['num_pairs']} pairs and {latent['num_pools']} kept pools"
        return summary

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
