#!/usr/bin/env python
"""LAN sampling cost: lockstep SFT + DPO sampling against plain sampling of the DPO model, and best-of-N.

A benchmark, not a test. One process, one model (random weights, ``--arch sd15`` is the real SD1.5
architecture), one LoRA (rank 8 on the attention linears, like the trainer's), one prompt, batch 1,
the paper's sampler (DPM-Solver++ 2M) and CFG 5. Warm-up, then interleaved rounds (the order rotates
each round); a ratio is the median of the per-round ratios. Variants:

* ``diffusers``   the named baseline: diffusers' ``StableDiffusionPipeline`` with the LoRA loaded by
                  ``load_lora_weights`` and merged by ``fuse_lora(lora_scale=w)``: plain sampling of the
                  DPO model at no LoRA cost per step (on its own copy of the UNet).
* ``plain``       ``hgdpo.inference.sampling.ImageGenerator`` without LAN (the LoRA added by forward hooks).
* ``lan_fast``    LAN, shared weights, SFT and DPO halves in one batched UNet forward (per-sample LoRA scale).
* ``lan_2fwd``    LAN, shared weights, two UNet forwards per step (SFT, then DPO).
* ``lan_2unet``   LAN with a separate DPO checkpoint (a second copy of the UNet, the LoRA on it).

Best-of-N: ``hgdpo.inference.sampling.best_of_n`` with ``--best-of`` candidates in batches of ``--best-of-batch``,
scored by a cheap brightness ``FunctionScorer``, per candidate against ``plain``.

Peak memory: each variant again in a fresh process; on the CPU the resident-set high-water mark after
building that variant's models (``VmHWM`` reset through ``/proc/self/clear_refs``), on CUDA
``max_memory_allocated``.

    python bench/lan_sampling.py --arch sd15 --resolution 256 --steps 10 --threads 2
    python bench/lan_sampling.py --arch sd15 --device cuda --resolution 512 --steps 50 --dtype fp16
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from benchlib import BENCH_PROMPTS, cpu_name, interleaved_rounds, median_ratio, proc_status, synchronize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgdpo.training.config import DTYPES  # noqa: E402

VARIANTS = ("diffusers", "plain", "lan_fast", "lan_2fwd", "lan_2unet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--arch", choices=("tiny", "sd15"), default="sd15")
    add("--resolution", type=int, default=256)
    add("--steps", type=int, default=10)
    add("--lora-weight", type=float, default=0.5)
    add("--rounds", type=int, default=3)
    add("--warmup", type=int, default=1)
    add("--best-of", type=int, default=4)
    add("--best-of-batch", type=int, default=4)
    add("--device", default="cpu")
    add("--dtype", choices=tuple(DTYPES), default="fp32")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    add("--memory", choices=("subprocess", "none"), default="subprocess")
    add("--output", default=None, help="JSON results file (default: bench/results/lan-<device>-<arch>-<res>.json).")
    add("--probe", default=None, help=argparse.SUPPRESS)
    add("--probe-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_models(args, variants: tuple[str, ...]):
    """The SFT model, a LoRA file for it, and what each variant needs, built offline with random weights."""
    from hgdpo.models.loading import load_sd15
    from hgdpo.inference.sampling import ImageGenerator, make_scheduler
    from hgdpo.models.tiny import build_models as build
    from hgdpo.models.tiny import save_diffusers_folder, sd15_configs, tiny_sd15_configs
    from tests.sd15_factory import save_random_lora

    configs = sd15_configs() if args.arch == "sd15" else tiny_sd15_configs()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    built: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="lan-bench-") as tmp:  # everything is read into memory below
        folder = Path(tmp)
        models = build(configs, seed=0)
        model_dir = save_diffusers_folder(models, configs, folder / "model")
        lora = save_random_lora(models["unet"], folder / "hgdpo.safetensors", std=0.02)
        del models
        gc.collect()
        sft = load_sd15(model_dir)
        if {"plain", "lan_fast", "lan_2fwd"} & set(variants):
            built["generator"] = ImageGenerator(sft, lora=lora, device=device, dtype=dtype)
        if "lan_2unet" in variants:
            built["two_unets"] = ImageGenerator(sft, lora=lora, dpo_components=load_sd15(model_dir), device=device,
                                                dtype=dtype)
        if "diffusers" in variants:
            own = copy.copy(sft)
            own.unet = copy.deepcopy(sft.unet)
            pipeline = own.pipeline(scheduler=make_scheduler(sft.noise_scheduler.config)).to(device, dtype)
            pipeline.load_lora_weights(str(lora))
            pipeline.fuse_lora(lora_scale=args.lora_weight)
            pipeline.set_progress_bar_config(disable=True)
            built["pipeline"] = pipeline
    return built


def make_runs(args, built: dict[str, object]) -> dict[str, object]:
    from hgdpo.inference.sampling import SamplingConfig

    prompt, seed = BENCH_PROMPTS[0], 0
    plain = SamplingConfig(steps=args.steps, width=args.resolution, height=args.resolution,
                           lora_weight=args.lora_weight)
    lan = SamplingConfig(**{**plain.__dict__, "lan_strength": 1.0})
    runs = {}
    if "pipeline" in built:
        pipeline = built["pipeline"]
        runs["diffusers"] = lambda: pipeline(prompt, num_inference_steps=args.steps, guidance_scale=5.0,
                                             height=args.resolution, width=args.resolution,
                                             generator=torch.Generator().manual_seed(seed))
    if "generator" in built:
        generator = built["generator"]
        runs["plain"] = lambda: generator.generate([prompt], [seed], plain)
        runs["lan_fast"] = lambda: generator.generate([prompt], [seed], lan)
        runs["lan_2fwd"] = lambda: generator.generate([prompt], [seed], lan, shared_forward=False)
    if "two_unets" in built:
        runs["lan_2unet"] = lambda: built["two_unets"].generate([prompt], [seed], lan)
    return runs


def brightness(prompts, images):
    import numpy as np

    return [float(np.asarray(image.convert("L"), dtype=np.float32).mean()) for image in images]


def bench_best_of(args, generator) -> dict:
    from hgdpo.inference.sampling import SamplingConfig, best_of_n
    from hgdpo.feedback.scorers import FunctionScorer

    config = SamplingConfig(steps=args.steps, width=args.resolution, height=args.resolution,
                            lora_weight=args.lora_weight)
    scorer = FunctionScorer(brightness, name="brightness")
    runs = {
        "single": lambda: generator.generate([BENCH_PROMPTS[0]], [0], config),
        "best_of": lambda: best_of_n(generator, BENCH_PROMPTS[0], 0, args.best_of, scorer, config, args.best_of_batch),
    }
    seconds, cpu = interleaved_rounds(runs, args.rounds, args.warmup, torch.device(args.device), "best-of")
    per_candidate = [b / args.best_of for b in seconds["best_of"]]
    median, low, high = median_ratio(per_candidate, seconds["single"])
    return {"count": args.best_of, "batch": args.best_of_batch, "seconds": seconds, "cpu_seconds": cpu,
            "per_candidate_over_single": {"median": median, "min": low, "max": high}}


def memory_probe(args) -> dict:
    """In a fresh process: build one variant's models, then its peak memory over two samplings."""
    built = build_models(args, (args.probe,))
    run = make_runs(args, built)[args.probe]
    gc.collect()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(), run()
        synchronize(device)
        return {"kind": "cuda max_memory_allocated", "base_bytes": base,
                "peak_bytes": torch.cuda.max_memory_allocated(device)}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (models included)
    base = proc_status("VmRSS")
    run(), run()
    return {"kind": "cpu VmHWM after clear_refs", "base_bytes": base, "peak_bytes": proc_status("VmHWM")}


def measure_memory(argv: list[str]) -> dict[str, dict]:
    results = {}
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "probe.json"
            print(f"  memory: {variant} in a fresh process ...", flush=True)
            completed = subprocess.run([sys.executable, __file__, *argv, "--probe", variant, "--probe-out", str(out)],
                                       capture_output=True, text=True, check=False)
            results[variant] = (json.loads(out.read_text()) if out.exists()
                                else {"error": completed.stderr[-2000:]})
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        Path(args.probe_out).write_text(json.dumps(memory_probe(args)))
        return 0
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    built = build_models(args, VARIANTS)
    seconds, cpu_seconds = interleaved_rounds(make_runs(args, built), args.rounds, args.warmup,
                                              torch.device(args.device), "sampling")
    ratios = {}
    for baseline in ("diffusers", "plain"):
        for variant in VARIANTS:
            if variant != baseline:
                median, low, high = median_ratio(seconds[variant], seconds[baseline])
                cpu_median = statistics.median(a / b for a, b in zip(cpu_seconds[variant], cpu_seconds[baseline]))
                ratios[f"{variant}/{baseline}"] = {"median": median, "min": low, "max": high, "cpu_median": cpu_median}
    best_of = bench_best_of(args, built["generator"])
    del built
    gc.collect()
    memory = measure_memory(argv) if args.memory == "subprocess" else {}
    summary = {
        "benchmark": "lan_sampling", "started_utc": started, "arch": args.arch, "resolution": args.resolution,
        "steps": args.steps, "lora_weight": args.lora_weight, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "cpu": cpu_name(), "python": platform.python_version(),
        "torch": torch.__version__, "rounds": args.rounds,
        "seconds_median": {name: statistics.median(values) for name, values in seconds.items()},
        "seconds": seconds, "cpu_seconds": cpu_seconds, "ratios": ratios, "best_of": best_of,
        "peak_memory_mib": {name: round(value["peak_bytes"] / 2**20) for name, value in memory.items()
                            if "peak_bytes" in value},
        "memory": memory,
    }
    default_output = Path(__file__).parent / "results" / f"lan-{args.device}-{args.arch}-{args.resolution}.json"
    output = Path(args.output or default_output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: summary[key] for key in ("seconds_median", "ratios", "peak_memory_mib")}, indent=2))
    print("best-of per candidate / single:", best_of["per_candidate_over_single"])
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
