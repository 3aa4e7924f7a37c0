#!/usr/bin/env python
"""Scoring throughput of the evaluation metrics (images/s), each against PickScore measured in the same rounds.

A benchmark, not a test. Every metric is the hgdpo scorer users run (:mod:`hgdpo.feedback.scorers`,
:mod:`hgdpo.feedback.metrics`), loaded from files written here with random weights of the real architecture
(``--arch full``) or a tiny one (``--arch tiny``); nothing is downloaded:

* ``pickscore``   PickScore: transformers CLIP ViT-H/14 (vision 32 x 1280, text 24 x 1024), ~986M parameters;
* ``hpsv2``       HPS v2: open_clip ViT-H-14 (the same towers) from an fp16 ``{"state_dict": ...}`` file;
* ``imagereward`` ImageReward: BLIP ViT-L/16 + BERT-base with cross-attention, ``ImageReward.pt`` layout;
* ``aesthetic``   LAION aesthetic: CLIP ViT-L/14 image tower + the 5-layer MLP;
* ``clip``        CLIP score: CLIP ViT-L/14 (the OpenAI architecture, quick-GELU).

Each round scores the same ``--images`` RGB images of ``--resolution`` (each scorer preprocesses them as
its reference does) with their prompts, batch ``--batch-size``. To bound memory, the baseline
(``--baseline``, PickScore by default) stays loaded and the other metrics are loaded one at a time: for
each, warm-up, then ``--rounds`` interleaved rounds of {baseline, metric} (order alternating). A metric's
figure is the median over rounds; its ratio is the median of the per-round ratios of its throughput to
the baseline's (> 1: faster than the baseline). On the CPU the process CPU time is recorded too.

    python bench/score_throughput.py --arch tiny --threads 1
    python bench/score_throughput.py --arch full --threads 1 --images 4 --json bench/results/score-cpu-full.json
    python bench/score_throughput.py --arch full --device cuda --dtype fp16 --images 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib import BENCH_PROMPTS, cpu_name, interleaved_rounds, median_ratio, write_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.training.config import DTYPES

METRICS = ("pickscore", "hpsv2", "imagereward", "aesthetic", "clip")

CLIP_H = {"vision": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                     "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
          "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu"},
          "projection_dim": 1024}
CLIP_L = {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"},
          "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu"},
          "projection_dim": 768}
CLIP_TINY = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "image_size": 224, "patch_size": 14},
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "max_position_embeddings": 77, "vocab_size": 49408},
             "projection_dim": 32}
OPEN_CLIP_TINY = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
BLIP_TINY_VISION = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
BLIP_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for p in BENCH_PROMPTS for w in p.split()})]


# --------------------------------------------------------------------------- random models on disk


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    from hgdpo.models.tiny import randomize_parameters

    return randomize_parameters(model, torch.Generator().manual_seed(seed)).eval()


def _empty(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def save_random_clip(config: dict, folder: Path, seed: int) -> int:
    """A random transformers CLIPModel and its processor (224 px, the CLIP tokenizer) in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from hgdpo.models.loading import clip_tokenizer

    clip_config = CLIPConfig(text_config=config["text"], vision_config=config["vision"],
                             projection_dim=config["projection_dim"])
    model = _random(_empty(lambda: CLIPModel(clip_config)), seed)
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # ln(100), as trained CLIP / PickScore
    parameters = sum(p.numel() for p in model.parameters())
    model.half().save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                     crop_size={"height": 224, "width": 224}),
                  tokenizer=clip_tokenizer()).save_pretrained(folder)
    return parameters


def save_random_hps(config: dict, path: Path, seed: int) -> int:
    """A random open_clip CLIP saved as the HPS checkpoints are (fp16 ``{"state_dict": ...}``)."""
    import open_clip

    model = _random(_empty(lambda: open_clip.model.CLIP(**config)), seed).half()
    torch.save({"state_dict": model.state_dict()}, path)
    return sum(p.numel() for p in model.parameters())


def _reference_vision_key(name: str) -> str:
    """A ``BlipVisionModel`` key under BLIP's ``vit.py`` name (the inverse of :mod:`hgdpo.feedback.metrics`' renaming)."""
    from hgdpo.feedback.metrics import BLIP_LAYER_NAMES, BLIP_VISION_NAMES

    if name.startswith("encoder.layers."):
        for old, new in BLIP_LAYER_NAMES:
            name = name.replace(new, old, 1)
        return name
    return next(old + name[len(new):] for old, new in BLIP_VISION_NAMES if name.startswith(new))


def save_random_imagereward(vision_config: dict, text_config: dict, folder: Path, seed: int) -> int:
    """Random BLIP towers and MLP written as ``ImageReward.pt`` (BLIP's key names) plus a BERT tokenizer folder."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from hgdpo.feedback.metrics import RewardMLP

    vision = _random(_empty(lambda: BlipVisionModel(BlipVisionConfig(**vision_config))), seed)
    text = _random(_empty(lambda: BlipTextModel(BlipTextConfig(**text_config, bos_token_id=None, sep_token_id=None,
                                                               encoder_hidden_size=vision.config.hidden_size,
                                                               is_decoder=True), add_pooling_layer=False)), seed + 1)
    mlp = _random(RewardMLP(text.config.hidden_size), seed + 2)
    state = {f"blip.visual_encoder.{_reference_vision_key(k)}": v.half() for k, v in vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v.half() for k, v in text.state_dict().items()})
    state.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(text_config))
    BertTokenizer(vocab={token: i for i, token in enumerate(BERT_VOCAB)}).save_pretrained(folder / "bert")
    return sum(p.numel() for module in (vision, text, mlp) for p in module.parameters())


def build_scorer(metric: str, arch: str, workdir: Path, device: torch.device, dtype: torch.dtype, batch_size: int,
                 seed: int):
    """Write ``metric``'s random weights under ``workdir`` and load them with hgdpo's scorer: (scorer, parameters)."""
    from hgdpo.feedback.metrics import (
        BLIP_MED_CONFIG,
        BLIP_VIT_LARGE,
        AestheticScorer,
        HPSv2Scorer,
        ImageRewardScorer,
        RewardMLP,
    )
    from hgdpo.feedback.scorers import CLIPScoreScorer, PickScoreScorer

    full = arch == "full"
    options = {"device": device, "dtype": dtype, "batch_size": batch_size}
    folder = workdir / metric
    if metric in ("pickscore", "clip", "aesthetic"):
        parameters = save_random_clip(CLIP_H if full and metric == "pickscore" else CLIP_L if full else CLIP_TINY,
                                      folder / "clip", seed)
        if metric == "pickscore":
            return PickScoreScorer(folder / "clip", folder / "clip", **options), parameters
        if metric == "clip":
            return CLIPScoreScorer(folder / "clip", **options), parameters
        mlp = _random(RewardMLP((CLIP_L if full else CLIP_TINY)["projection_dim"]), seed)
        torch.save(mlp.state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
        return AestheticScorer(folder, processor=folder / "clip", **options), parameters
    if metric == "hpsv2":
        import open_clip

        config = open_clip.get_model_config("ViT-H-14") if full else OPEN_CLIP_TINY
        folder.mkdir(parents=True, exist_ok=True)
        parameters = save_random_hps(config, folder / "HPS_v2_compressed.pt", seed)
        return HPSv2Scorer(folder, architecture=config, **options), parameters
    vision = BLIP_VIT_LARGE if full else {**BLIP_VIT_LARGE, **BLIP_TINY_VISION}
    text = BLIP_MED_CONFIG if full else {**BLIP_MED_CONFIG, **BLIP_TINY_TEXT}
    parameters = save_random_imagereward(vision, text, folder, seed)
    return ImageRewardScorer(folder, processor=folder / "bert", vision_config=vision, **options), parameters


# --------------------------------------------------------------------------- measuring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Scoring throughput of the evaluation metrics vs a baseline metric.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--arch", choices=("full", "tiny"), default="full", help="full: the real architectures (random weights).")
    add("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="Metrics to time.")
    add("--baseline", choices=METRICS, default="pickscore", help="The metric every ratio is taken against.")
    add("--images", type=int, default=8, help="Images scored per metric per round.")
    add("--resolution", type=int, default=512, help="Side of the square RGB images given to the scorers.")
    add("--batch-size", type=int, default=8, help="Scorer batch size.")
    add("--rounds", type=int, default=3, help="Timed rounds per metric (each also times the baseline).")
    add("--warmup", type=int, default=1, help="Untimed rounds first.")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=tuple(DTYPES), default="fp32", help="Scorer precision.")
    add("--threads", type=int, default=None, help="torch.set_num_threads (use 1 on a shared CPU).")
    add("--seed", type=int, default=0)
    add("--json", metavar="OUT", help="Write every figure and the per-round times here.")
    return parser.parse_args(argv)


def _figures(seconds: list[float], cpu_seconds: list[float], images: int) -> dict:
    return {"images_per_second_median": statistics.median(images / s for s in seconds),
            "seconds_per_round_median": statistics.median(seconds), "seconds_per_round_rounds": seconds,
            "cpu_seconds_per_image_median": statistics.median(cpu_seconds) / images}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import transformers
    from PIL import Image

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rng = np.random.default_rng(args.seed)
    images = [Image.fromarray(rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))
              for _ in range(args.images)]
    prompts = [BENCH_PROMPTS[k % len(BENCH_PROMPTS)] for k in range(args.images)]
    others = [metric for metric in args.metrics if metric != args.baseline]
    summary: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "settings": {key: value for key, value in vars(args).items() if key != "json"},
                     "metrics": {}, "ratios_vs_baseline": {}}

    def timed(scorer) -> Callable[[], None]:
        def run() -> None:
            scores = scorer.score(prompts, images)
            assert scores.shape == (len(images),) and torch.isfinite(scores).all()
        return run

    def rounds_against(baseline, metric: str, workdir: Path, seed: int) -> dict[str, tuple[list, list]]:
        """Build ``metric``'s scorer and time it against ``baseline``; the scorer is freed on return."""
        functions = {args.baseline: timed(baseline)}
        if metric != args.baseline:
            scorer, parameters = build_scorer(metric, args.arch, workdir, device, dtype, args.batch_size, seed)
            print(f"{metric}: {parameters / 1e6:.0f}M parameters", flush=True)
            summary["metrics"][metric] = {"parameters": parameters}
            functions[metric] = timed(scorer)
        seconds, cpu_seconds = interleaved_rounds(functions, args.rounds, args.warmup, device, metric)
        return {name: (seconds[name], cpu_seconds[name]) for name in functions}

    with tempfile.TemporaryDirectory(prefix="hgdpo-score-bench-") as tmp:
        workdir = Path(tmp)
        baseline, parameters = build_scorer(args.baseline, args.arch, workdir, device, dtype, args.batch_size,
                                            args.seed)
        summary["metrics"][args.baseline] = {"parameters": parameters, "rounds": {}}
        print(f"baseline {args.baseline}: {parameters / 1e6:.0f}M parameters; {args.images} images of "
              f"{args.resolution}px per round, batch {args.batch_size}, {args.dtype} on {device}", flush=True)
        for k, metric in enumerate(others or [args.baseline]):
            timings = rounds_against(baseline, metric, workdir, args.seed + k + 1)
            gc.collect()
            summary["metrics"][args.baseline]["rounds"][metric] = _figures(*timings[args.baseline], args.images)
            if metric != args.baseline:
                summary["metrics"][metric].update(_figures(*timings[metric], args.images))
                ratio, low, high = median_ratio(timings[args.baseline][0], timings[metric][0])
                summary["ratios_vs_baseline"][metric] = {"median": ratio, "min": low, "max": high}
    summary["environment"] = {"date_start": started, "host_cpu": cpu_name(), "cpu_count": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                              "torch": torch.__version__, "transformers": transformers.__version__,
                              "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    base_rate = statistics.median(figures["images_per_second_median"]
                                  for figures in summary["metrics"][args.baseline]["rounds"].values())
    print(f"\n{'metric':12s} {'params':>8s} {'img/s':>8s} {'vs ' + args.baseline:>22s}")
    print(f"{args.baseline:12s} {summary['metrics'][args.baseline]['parameters'] / 1e6:7.0f}M {base_rate:8.3f} "
          f"{'(baseline)':>22s}")
    for metric in others:
        figures, ratio = summary["metrics"][metric], summary["ratios_vs_baseline"][metric]
        spread = f"x{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
        print(f"{metric:12s} {figures['parameters'] / 1e6:7.0f}M {figures['images_per_second_median']:8.3f} "
              f"{spread:>22s}")
    write_summary(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
