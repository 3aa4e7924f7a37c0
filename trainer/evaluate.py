#!/usr/bin/env python
"""Evaluate an HG-DPO LoRA against a baseline the way the paper does: win rates, colour shift, latent statistics.

    python trainer/evaluate.py --baseline model.safetensors --candidate-lora hgdpo.safetensors \\
        --prompts PartiPrompts.tsv --output-dir eval \\
        --metric-model pickscore=models/pickscore/PickScore_v1 \\
        --metric-processor pickscore=models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --metric-model hpsv2=models/hpsv2/HPS_v2_compressed.pt ...
    python trainer/evaluate.py ... --metrics clip aesthetic      # later: other metrics, no image regenerated

For each prompt and seed both models generate one image (same seed); every metric scores both, and the
report gives the candidate's win rate per metric with a bootstrap 95% interval (paper Tables 1, 3, 5, 6),
the mean hue / saturation / value change against the baseline (Table 2) and the channel-wise latent
statistics (Fig. 5b). Writes ``report.md``, ``report.html``, ``report.json``, plots and an image grid into
``--output-dir``; images are cached (``--image-cache``), so re-running resumes or reuses them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.cli import add_device_arguments, setup_logging
from hgdpo.errors import run_cli
from hgdpo.evaluation.evaluate import PAPER_METRICS
from hgdpo.inference.sampling import SAMPLERS, SCHEDULES, SamplingConfig

DEFAULTS = SamplingConfig()
PARTI_URL = "https://github.com/google-research/parti/blob/main/PartiPrompts.tsv"


def _add_model(parser: argparse.ArgumentParser, side: str, help_model: str, required: bool) -> None:
    add = parser.add_argument
    add(f"--{side}", required=required, metavar="MODEL", help=help_model)
    add(f"--{side}-lora", default=None, metavar="PATH", help=f"HG-DPO LoRA (kohya .safetensors) of the {side}.")
    add(f"--{side}-lora-weight", type=float, default=DEFAULTS.lora_weight, metavar="W",
        help=f"Weight of the {side}'s LoRA (paper: 0.5).")
    add(f"--{side}-lan", type=float, nargs="?", const=1.0, default=0.0, metavar="STRENGTH",
        help=f"LAN for the {side} (needs its LoRA): bare flag = strength 1 (paper Eq. 7), 0 = off.")
    add(f"--{side}-label", default=side, help=f"Name of the {side} in the report.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate an HG-DPO model against a baseline: per-metric win rates, colour shift, latent "
                    "statistics; Markdown/HTML/JSON report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    _add_model(parser, "baseline", "Baseline (SFT) model: single-file .safetensors/.ckpt, diffusers folder or hub id.",
               required=True)
    _add_model(parser, "candidate", "Candidate model (default: the baseline's; give --candidate-lora).",
               required=False)
    add("--prompts", required=True,
        help=f"Prompt file: .tsv/.csv (a header row), .txt (one per line) or .jsonl. The paper's test set is the "
             f"People category of PartiPrompts.tsv ({PARTI_URL}).")
    add("--category", default=None,
        help="Keep only rows of this Category of a .tsv/.csv (default: People when the table has a Category "
             "column, as PartiPrompts; '' keeps every row).")
    add("--prompt-column", default=None, help="Prompt column of a .tsv/.csv (default: Prompt, else the first).")
    add("--max-prompts", type=int, default=None, help="Evaluate only the first N prompts.")
    add("--seeds", type=int, nargs="+", default=[0], help="Seeds; each prompt is generated once per seed.")
    add("--output-dir", required=True, help="Report folder (created).")
    add("--image-cache", default=None,
        help="Folder of the generated images, shared by runs (default: OUTPUT_DIR/images).")
    add("--metrics", nargs="+", default=list(PAPER_METRICS),
        help="Metrics: pickscore, hpsv2, imagereward, aesthetic, clip, or plug-ins 'package.module:callable'.")
    add("--metric-model", action="append", default=[], metavar="NAME=SOURCE",
        help="Weights of a metric: file, folder or hub id (pickscore: PickScore_v1 folder; hpsv2: "
             "HPS_v2_compressed.pt; imagereward: ImageReward.pt or its folder; aesthetic: "
             "sac+logos+ava1-l14-linearMSE.pth; clip: a CLIPModel folder). Repeatable.")
    add("--metric-processor", action="append", default=[], metavar="NAME=SOURCE",
        help="Second source of a metric (pickscore: CLIP-ViT-H-14 processor; imagereward: bert-base-uncased "
             "tokenizer; aesthetic: the CLIP ViT-L/14 model folder). Repeatable.")
    add("--steps", type=int, default=DEFAULTS.steps, help="Sampling steps (paper: 50).")
    add("--cfg", type=float, default=DEFAULTS.guidance_scale, help="Classifier-free guidance scale (paper: 5.0).")
    add("--sampler", default=DEFAULTS.sampler, choices=tuple(SAMPLERS), help="Sampler (paper: DPM-Solver++).")
    add("--schedule", default=DEFAULTS.schedule, choices=SCHEDULES, help="Noise schedule.")
    add("--resolution", default="512", help="Image size: N for NxN or WxH, multiples of 8.")
    add("--negative-prompt", default=DEFAULTS.negative_prompt, help="Negative prompt for guidance.")
    add("--batch-size", type=int, default=4, help="Images per UNet batch.")
    add("--grid-pairs", type=int, default=16, help="Pairs shown side by side in the image grid.")
    add("--tie-tolerance", type=float, default=0.0, help="Score differences up to this count as ties.")
    add("--bootstrap", type=int, default=10_000, help="Bootstrap resamples of the 95%% intervals.")
    add("--model-config-dir", default=None,
        help="Diffusers-layout config folder for single-file models (default: the bundled SD1.5 configs).")
    add_device_arguments(parser)
    add("--no-progress", action="store_true", help="No progress bars.")
    return parser


def _sources(items: list[str], flag: str) -> dict[str, str]:
    """``NAME=SOURCE`` items as a dict (metric names lower-cased)."""
    result = {}
    for item in items:
        name, separator, source = item.partition("=")
        if not separator or not name or not source:
            raise ValueError(f"{flag} {item!r}: write NAME=SOURCE, e.g. {flag} hpsv2=models/HPS_v2_compressed.pt.")
        result[name.strip().lower()] = source
    return result


def _category(path: str, category: str | None) -> str | None:
    """The category filter: the one given ('' = none), else People for a table with a Category column."""
    from hgdpo.data.prompts import CATEGORY_COLUMN

    if category is not None:
        return category or None
    suffix = Path(path).suffix.lower()
    if suffix not in (".tsv", ".csv") or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8-sig") as handle:
        header = handle.readline().rstrip("\r\n").split("\t" if suffix == ".tsv" else ",")
    return "People" if CATEGORY_COLUMN in header else None


def make_config(arguments: argparse.Namespace):
    """The :class:`~hgdpo.evaluation.evaluate.EvaluationConfig` the command line describes."""
    from dataclasses import replace

    from hgdpo.training.config import parse_resolution
    from hgdpo.evaluation.evaluate import EvaluationConfig, MetricSpec, ModelSpec
    from hgdpo.data.prompts import read_prompts

    width, height = parse_resolution(arguments.resolution)
    category = _category(arguments.prompts, arguments.category)
    prompts = read_prompts(arguments.prompts, column=arguments.prompt_column, category=category).prompts
    if arguments.max_prompts is not None:
        prompts = prompts[:max(0, arguments.max_prompts)]
    models = _sources(arguments.metric_model, "--metric-model")
    processors = _sources(arguments.metric_processor, "--metric-processor")
    names = {name.lower() for name in arguments.metrics}
    unused = sorted((set(models) | set(processors)) - names)
    if unused:
        raise ValueError(f"--metric-model/--metric-processor name metrics not in --metrics: {', '.join(unused)}.")
    sides = {}
    for side in ("baseline", "candidate"):
        sides[side] = ModelSpec(
            model=getattr(arguments, side) or arguments.baseline, lora=getattr(arguments, f"{side}_lora"),
            lora_weight=getattr(arguments, f"{side}_lora_weight"), lan_strength=getattr(arguments, f"{side}_lan"),
            label=getattr(arguments, f"{side}_label"))
    return EvaluationConfig(
        baseline=sides["baseline"], candidate=sides["candidate"], prompts=prompts,
        output_dir=Path(arguments.output_dir),
        metrics=[MetricSpec(name, models.get(name.lower()), processors.get(name.lower()))
                 for name in arguments.metrics],
        seeds=list(arguments.seeds),
        sampling=replace(DEFAULTS, steps=arguments.steps, guidance_scale=arguments.cfg, sampler=arguments.sampler,
                         schedule=arguments.schedule, width=width, height=height,
                         negative_prompt=arguments.negative_prompt),
        image_cache=Path(arguments.image_cache) if arguments.image_cache else None, batch_size=arguments.batch_size,
        grid_pairs=arguments.grid_pairs, tie_tolerance=arguments.tie_tolerance, resamples=arguments.bootstrap,
        model_config_dir=arguments.model_config_dir, device=arguments.device, dtype=arguments.dtype,
        prompt_source=f"{arguments.prompts}" + (f" (category {category})" if category else ""),
    )


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging()

    def run() -> str:
        from hgdpo.evaluation.evaluate import run_evaluation

        report = run_evaluation(make_config(arguments), show_progress=not arguments.no_progress)
        rates = ", ".join(f"{metric['label']} {100 * metric['win_rate']['rate']:.1f}%"
                          for metric in report["metrics"].values())
        return (f"Report written to {arguments.output_dir}/report.md ({report['settings']['num_pairs']} pairs): "
                f"{report['candidate']} win rate vs {report['baseline']}: {rates}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
