#!/usr/bin/env python
"""Dataset-building throughput: ``hgdpo.data.builder.build_dataset`` against a naive diffusers loop, and scoring.

A benchmark, not a test. One process, one model, one resolution, one step count, one DPM-Solver++
scheduler configuration; warm-up, then interleaved rounds (A B, B A, A B, ...); medians over rounds, and
ratios as medians of the per-round ratios (the two variants of a round ran back to back):

* ``builder``  one whole call of our ``build_dataset`` on a fresh output folder: ``--prompts`` prompts x
               ``--pool-size`` images each, sampled ``--batch-size`` images per UNet batch by
               ``PoolGenerator`` (one text encoding per prompt, per-image seeded generators), every image
               scored on the fly, winner and loser PNG-encoded and written atomically, one JSON record per
               prompt, and the final ``index.parquet``. The scorer is a cheap ``FunctionScorer`` (mean
               brightness), so this part measures generation plus the builder's own bookkeeping.
* ``naive``    a plain loop calling a diffusers ``StableDiffusionPipeline`` once per image:
               ``pipe(prompt, num_inference_steps=S, guidance_scale=5.0, height=H, width=W,
               generator=torch.Generator(device).manual_seed(seed))``: batch 1, the prompt (and the empty
               negative prompt) re-encoded for every image. Same modules, same DPM-Solver++ scheduler
               config, same seeds. It neither scores nor writes anything, which favours it.

Scoring throughput (``--skip-scoring`` to skip): ``hgdpo.feedback.scorers.PickScoreScorer`` on a randomly
initialised CLIP with PickScore's architecture (ViT-H/14 vision tower, 1024-wide 24-layer text tower,
projection 1024; ``--scorer-arch pickscore``, the default) or a tiny CLIP (``--scorer-arch tiny``), saved
with ``save_pretrained`` to a temporary folder with a ``CLIPProcessor`` made offline (the scorer loads it
as it would the real weights). Images/s at scorer batch sizes 1 and 8, interleaved rounds, on
``--score-images`` RGB images of ``--score-resolution`` (the processor resizes them to 224).

Examples::

    python bench/build_throughput.py --arch tiny --resolution 64 --threads 1
    python bench/build_throughput.py --arch sd15 --resolution 64 --steps 4 --pool-size 4 --threads 1
    python bench/build_throughput.py --arch sd15 --device cuda --resolution 512
    python bench/build_throughput.py --arch sd15 --device cuda --resolution 704x1024 --skip-scoring

Models have random weights (``hgdpo.models.tiny.build_models``; ``--arch sd15`` is the real SD1.5 architecture),
so timings are those of the real model; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import BENCH_PROMPTS as _PROMPTS
from benchlib import cpu_name, interleaved_rounds, median_ratio, write_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.training.config import DTYPES as _DTYPES  # noqa: E402


def _ratio(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    median, low, high = median_ratio(numerators, denominators)
    return {"median": median, "min": low, "max": high}


PICKSCORE_VISION = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14}
PICKSCORE_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "max_position_embeddings": 77, "vocab_size": 49408}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 224, "patch_size": 14}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77, "vocab_size": 49408}


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Dataset-building throughput: hgdpo's build_dataset vs a naive per-image diffusers loop; "
                    "PickScore scoring throughput.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="sd15",
                        help="tiny: the test-size SD1.5-structured model; sd15: the real SD1.5 architecture "
                             "(random weights).")
    parser.add_argument("--resolution", default=None, help="N or WxH. Default: 64 on cpu, 512 on cuda.")
    parser.add_argument("--steps", type=int, default=None,
                        help="DPM-Solver++ steps per image. Default: 20 on cpu, 50 (the paper's) on cuda.")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="Images per prompt. Default: 8 on cpu, 20 (the paper's N) on cuda.")
    parser.add_argument("--batch-size", type=int, default=4, help="Builder images per UNet batch.")
    parser.add_argument("--prompts", type=int, default=None,
                        help="Prompts per round (images per round = prompts x pool size). Default: 2 on cpu, "
                             "4 on cuda.")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (paper: 5.0).")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Timed rounds; each runs both variants, the order alternating. Default: 4 on cpu, "
                             "6 on cuda.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                        help="Weights of the generator and the scorer (auto: fp16 on cuda, fp32 on cpu).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's). Use 1 on a CPU shared with other jobs.")
    parser.add_argument("--skip-generation", action="store_true", help="Only the scoring benchmark.")
    parser.add_argument("--skip-scoring", action="store_true", help="Only the generation benchmark.")
    parser.add_argument("--scorer-arch", choices=("pickscore", "tiny"), default="pickscore",
                        help="pickscore: PickScore's CLIP-H architecture (random weights, ~986M parameters); "
                             "tiny: a 2-layer 32-wide CLIP.")
    parser.add_argument("--score-images", type=int, default=8, help="Images scored per variant per round.")
    parser.add_argument("--score-resolution", default="512", help="Size of the images given to the scorer.")
    parser.add_argument("--score-rounds", type=int, default=None,
                        help="Scoring rounds (default: 3 on cpu, 6 on cuda).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="Write all figures (and the raw per-round times) here.")
    args = parser.parse_args(argv)

    from hgdpo.options import parse_resolution

    cpu = args.device == "cpu"
    args.resolution = args.resolution or ("64" if cpu else "512")
    args.steps = args.steps or (20 if cpu else 50)
    args.pool_size = args.pool_size or (8 if cpu else 20)
    args.prompts = args.prompts or (2 if cpu else 4)
    args.rounds = args.rounds or (4 if cpu else 6)
    args.score_rounds = args.score_rounds or (3 if cpu else 6)
    args.size = parse_resolution(args.resolution)
    args.score_size = parse_resolution(args.score_resolution)
    if args.dtype == "auto":
        args.dtype = "fp32" if cpu else "fp16"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    if args.dtype == "fp16" and cpu:
        parser.error("--dtype fp16 needs --device cuda.")
    if args.prompts > len(_PROMPTS):
        parser.error(f"--prompts: at most {len(_PROMPTS)}.")
    if args.pool_size < 2:
        parser.error("--pool-size: at least 2.")
    return args


def _per_variant(seconds: dict[str, list[float]], cpu_seconds: dict[str, list[float]], images: int) -> dict:
    return {
        name: {
            "images_per_round": images,
            "seconds_per_round_median": statistics.median(values),
            "seconds_per_round_min": min(values),
            "seconds_per_round_max": max(values),
            "images_per_second_median": statistics.median(images / v for v in values),
            "seconds_per_image_median": statistics.median(values) / images,
            "cpu_seconds_per_image_median": statistics.median(cpu_seconds[name]) / images,
            "seconds_per_round_rounds": values,
            "cpu_seconds_per_round_rounds": cpu_seconds[name],
        }
        for name, values in seconds.items()
    }


# --------------------------------------------------------------------------- generation


def brightness(prompts, images):
    """Mean grey level in [0, 1] of each image: the cheap stand-in scorer."""
    import numpy as np

    return [float(np.asarray(image.convert("L"), dtype=np.float32).mean()) / 255.0 for image in images]


def bench_generation(args, workdir: Path) -> dict:
    from diffusers import DPMSolverMultistepScheduler

    from hgdpo.data.builder import BuildConfig, build_dataset, derive_seed
    from hgdpo.models.loading import load_sd15
    from hgdpo.feedback.scorers import FunctionScorer
    from hgdpo.models.tiny import build_models, save_diffusers_folder, sd15_configs, tiny_sd15_configs

    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    started = time.perf_counter()
    configs = sd15_configs() if args.arch == "sd15" else tiny_sd15_configs()
    model_dir = workdir / f"model-{args.arch}"
    models = build_models(configs, seed=args.seed)
    save_diffusers_folder(models, configs, model_dir)
    del models
    gc.collect()
    components = load_sd15(str(model_dir))
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device=device, dtype=dtype)
    unet_parameters = sum(p.numel() for p in components.unet.parameters())
    setup_seconds = time.perf_counter() - started
    print(f"  {args.arch}: UNet {unet_parameters / 1e6:.1f}M parameters, set-up {setup_seconds:.1f}s", flush=True)

    prompts = list(_PROMPTS[: args.prompts])
    prompt_file = workdir / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    scorer = FunctionScorer(brightness, name="brightness")
    width, height = args.size
    counter = {"builder": 0}

    def builder():
        counter["builder"] += 1
        config = BuildConfig(
            model=str(model_dir), prompts=str(prompt_file), output_dir=str(workdir / f"out-{counter['builder']}"),
            pool_size=args.pool_size, steps=args.steps, guidance_scale=args.guidance_scale,
            resolution=f"{width}x{height}", batch_size=args.batch_size, seed=args.seed, scorer="brightness",
            device=args.device, dtype=args.dtype,
        )
        result = build_dataset(config, scorer, components=components, show_progress=False)
        assert result.generated_prompts == len(prompts), result

    naive_pipe = components.pipeline(
        scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config,
                                                          algorithm_type="dpmsolver++"))
    naive_pipe.set_progress_bar_config(disable=True)

    def naive():
        for i, prompt in enumerate(prompts):
            for j in range(args.pool_size):
                generator = torch.Generator(device).manual_seed(derive_seed(args.seed, i, j))
                naive_pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           height=height, width=width, generator=generator).images[0]

    images = args.prompts * args.pool_size
    print(f"generation: {args.prompts} prompts x {args.pool_size} images = {images} images per round, "
          f"{args.steps} steps, {width}x{height}, {args.dtype}; warm-up {args.warmup}, {args.rounds} rounds",
          flush=True)
    seconds, cpu_seconds = interleaved_rounds(
        {"builder": builder, "naive": naive}, args.rounds, args.warmup, device, "gen"
    )
    return {
        "model": {"arch": args.arch, "unet_parameters": unet_parameters, "setup_seconds": round(setup_seconds, 1),
                  "latent_shape": [4, height // 8, width // 8]},
        "variants": _per_variant(seconds, cpu_seconds, images),
        "ratios": {"speedup_builder_vs_naive": _ratio(seconds["naive"], seconds["builder"])},
        "ratios_by_process_cpu_time": {"speedup_builder_vs_naive": _ratio(cpu_seconds["naive"],
                                                                                 cpu_seconds["builder"])},
    }


# --------------------------------------------------------------------------- scoring


def make_clip_folder(arch: str, folder: Path, seed: int) -> tuple[Path, Path, int]:
    """A random-weight CLIPModel (PickScore's architecture or tiny) and a processor folder, offline."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from hgdpo.models.loading import clip_tokenizer
    from hgdpo.models.tiny import randomize_parameters

    vision, text = (PICKSCORE_VISION, PICKSCORE_TEXT) if arch == "pickscore" else (TINY_VISION, TINY_TEXT)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024 if arch == "pickscore" else 32)
    torch.manual_seed(seed)
    with init_empty_weights():
        model = CLIPModel(config)
    randomize_parameters(model, torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # ln(100), as trained CLIP/PickScore
    parameters = sum(p.numel() for p in model.parameters())
    model_dir, processor_dir = folder / "model", folder / "processor"
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    gc.collect()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=clip_tokenizer(),
    )
    processor.save_pretrained(processor_dir)
    return model_dir, processor_dir, parameters


def bench_scoring(args, workdir: Path) -> dict:
    from PIL import Image

    from hgdpo.feedback.scorers import PickScoreScorer

    device = torch.device(args.device)
    started = time.perf_counter()
    model_dir, processor_dir, parameters = make_clip_folder(args.scorer_arch, workdir / "clip", args.seed)
    scorer = PickScoreScorer(model_dir, processor_dir, device=device, dtype=_DTYPES[args.dtype], batch_size=1)
    setup_seconds = time.perf_counter() - started
    print(f"scoring: PickScoreScorer, {args.scorer_arch} CLIP {parameters / 1e6:.0f}M parameters "
          f"(set-up {setup_seconds:.1f}s), {args.score_images} images of {args.score_size[0]}x{args.score_size[1]} "
          f"per round, {args.score_rounds} rounds", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    width, height = args.score_size
    images = [Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
                              .numpy(), "RGB") for _ in range(args.score_images)]
    prompts = [_PROMPTS[k % len(_PROMPTS)] for k in range(args.score_images)]

    def at(batch_size):
        def run():
            scorer.batch_size = batch_size
            scores = scorer.score(prompts, images)
            assert scores.shape == (len(images),) and torch.isfinite(scores).all()
        return run

    seconds, cpu_seconds = interleaved_rounds({"batch1": at(1), "batch8": at(8)}, args.score_rounds, 1, device, "score")
    return {
        "scorer": {"class": "hgdpo.feedback.scorers.PickScoreScorer", "arch": args.scorer_arch, "parameters": parameters,
                   "vision_config": PICKSCORE_VISION if args.scorer_arch == "pickscore" else TINY_VISION,
                   "text_config": PICKSCORE_TEXT if args.scorer_arch == "pickscore" else TINY_TEXT,
                   "setup_seconds": round(setup_seconds, 1), "image_size_wxh": list(args.score_size)},
        "variants": _per_variant(seconds, cpu_seconds, args.score_images),
        "ratios": {"speedup_batch8_vs_batch1": _ratio(seconds["batch1"], seconds["batch8"])},
    }


# --------------------------------------------------------------------------- report


def environment(args, started_utc: str, load_start) -> dict:
    import diffusers
    import transformers

    cpu = cpu_name()
    env = {
        "date_start": started_utc,
        "date_end": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def print_summary(summary: dict) -> None:
    print()
    gen = summary.get("generation")
    if gen:
        s = summary["settings"]
        print(f"generation ({s['arch']}, {s['resolution_wxh'][0]}x{s['resolution_wxh'][1]}, {s['steps']} steps, "
              f"pool {s['pool_size']}, batch {s['batch_size']}, {s['prompts']} prompts, {s['dtype']}):")
        for name, label in (("builder", "ours build_dataset (+brightness scorer, PNG, records, index)"),
                            ("naive", "naive pipe() per image, batch 1")):
            v = gen["variants"][name]
            print(f"  {label:62s} {v['images_per_second_median']:8.3f} img/s  "
                  f"({v['seconds_per_image_median']:.3f} s/img, CPU {v['cpu_seconds_per_image_median']:.3f} s/img)")
        r = gen["ratios"]["speedup_builder_vs_naive"]
        c = gen["ratios_by_process_cpu_time"]["speedup_builder_vs_naive"]
        print(f"  speed-up builder vs naive: x{r['median']:.2f} (rounds x{r['min']:.2f} to x{r['max']:.2f}); "
              f"by CPU time x{c['median']:.2f}")
    sc = summary.get("scoring")
    if sc:
        print(f"scoring (PickScoreScorer, {sc['scorer']['arch']} CLIP, {sc['scorer']['parameters'] / 1e6:.0f}M):")
        for name in ("batch1", "batch8"):
            v = sc["variants"][name]
            print(f"  {name}: {v['images_per_second_median']:8.3f} img/s ({v['seconds_per_image_median']:.3f} s/img)")
        r = sc["ratios"]["speedup_batch8_vs_batch1"]
        print(f"  batch 8 vs batch 1: x{r['median']:.2f} (rounds x{r['min']:.2f} to x{r['max']:.2f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("ACCELERATE_USE_CPU", "true" if args.device == "cpu" else "false")
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "arch": args.arch, "resolution_wxh": list(args.size), "steps": args.steps, "pool_size": args.pool_size,
            "batch_size": args.batch_size, "prompts": args.prompts, "guidance_scale": args.guidance_scale,
            "rounds": args.rounds, "warmup_rounds": args.warmup, "device": args.device, "dtype": args.dtype,
            "threads": args.threads, "seed": args.seed, "scheduler": "DPMSolverMultistepScheduler(dpmsolver++)",
            "builder_scorer": "FunctionScorer(mean brightness)", "scorer_arch": args.scorer_arch,
            "score_images": args.score_images, "score_rounds": args.score_rounds,
        },
    }
    with tempfile.TemporaryDirectory(prefix="hgdpo-build-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_generation:
            summary["generation"] = bench_generation(args, workdir)
            gc.collect()
        if not args.skip_scoring:
            summary["scoring"] = bench_scoring(args, workdir)
    summary["environment"] = environment(args, started_utc, load_start)
    write_summary(args.json, summary)
    print_summary(summary)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
