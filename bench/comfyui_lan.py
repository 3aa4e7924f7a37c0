#!/usr/bin/env python
"""LAN KSampler against ComfyUI's stock KSampler, in one ComfyUI process, at the same settings.

A benchmark, not a test. Run it with the python that has ComfyUI's requirements, ComfyUI named by
``--comfyui-dir`` (or ``HGDPO_COMFYUI_DIR``); ComfyUI is imported into this process with ``--cpu`` (or on
its default device with ``--device auto``) and this repository is loaded by ComfyUI's custom-node loader.

The model is a random-weight single-file checkpoint of the full SD1.5 architecture (``--checkpoint`` to use
your own), the LoRA a random rank-8 HG-DPO LoRA on the attention linears (the trainer's layout) at weight
0.5, one prompt, batch 1, CFG 5, the paper's sampler (``dpmpp_2m``, karras). Variants (ComfyUI nodes):

* ``ksampler``     stock ``KSampler`` on the DPO model (checkpoint + HG-DPO LoRA node): plain DPO sampling,
                   the LoRA merged into the weights by ComfyUI.
* ``lan``          ``LAN KSampler``, DPO model and SFT model from the same loader: shared weights, one
                   batched forward per step with the LoRA on the DPO rows only (the fast path).
* ``lan_2ckpt``    (``--two-checkpoints``) ``LAN KSampler`` with the DPO model loaded from its own
                   checkpoint: two UNets in memory.

ComfyUI keeps one patched variant of a shared base model loaded, so switching between ``ksampler`` (LoRA
merged into the weights) and ``lan`` (the SFT weights, the LoRA as hooks) re-patches the LoRA layers once
per run; that is part of each timed run, as when a user alternates the two (``--steady`` times the second
of two back-to-back runs instead). Warm-up, then interleaved rounds (the order rotates each round); a ratio
is the median of the per-round ratios (``benchlib``). The timer covers the node call (sampling, and the
loading and patching ComfyUI does in it), not text encoding or VAE decoding.

Peak memory (``--memory``): each variant first in a fresh process, before this one loads any model: the RSS
high-water mark over one run after a warm-up run (``VmHWM`` reset through ``/proc/self/clear_refs``), on CUDA
``max_memory_allocated``.

    HGDPO_COMFYUI_DIR=~/ComfyUI ~/ComfyUI/venv/bin/python bench/comfyui_lan.py --resolution 256 --steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import BENCH_PROMPTS, cpu_name, median_ratio, proc_status, synchronize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("ksampler", "lan", "lan_2ckpt")
CHECKPOINT = "sd15_random.safetensors"
LORA = "hgdpo_lora.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--comfyui-dir", default=os.environ.get("HGDPO_COMFYUI_DIR"), help="the ComfyUI folder")
    add("--device", choices=("cpu", "auto"), default="cpu", help="cpu: ComfyUI --cpu; auto: ComfyUI's default")
    add("--checkpoint", help="an SD1.5 single-file checkpoint (default: random weights, full architecture)")
    add("--resolution", type=int, default=256)
    add("--steps", type=int, default=10)
    add("--sampler", default="dpmpp_2m")
    add("--scheduler", default="karras")
    add("--cfg", type=float, default=5.0)
    add("--lora-weight", type=float, default=0.5)
    add("--rounds", type=int, default=3)
    add("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add("--steady", action="store_true", help="time the second of two back-to-back runs of each variant")
    add("--warmup", type=int, default=1)
    add("--two-checkpoints", action="store_true", help="also time LAN with the DPO model as its own checkpoint")
    add("--memory", action="store_true", help="also measure each variant's peak memory in a fresh process")
    add("--work-dir", help="where the random checkpoint and ComfyUI's base directory go (default: a temp dir)")
    add("--json", help="write the results here")
    add("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # memory probe of one variant (internal)
    return parser.parse_args(argv)


def prepare_files(args, work: Path) -> tuple[Path, Path]:
    """The checkpoint and the LoRA (random, written once into the work dir) and a ComfyUI base directory."""
    from hgdpo.models.tiny import build_models, sd15_configs
    from tests.sd15_factory import save_random_lora, save_single_file

    checkpoint, lora = work / CHECKPOINT, work / LORA
    if not checkpoint.exists() or not lora.exists():
        models = build_models(sd15_configs(), seed=0)
        if args.checkpoint is None:
            save_single_file(models, checkpoint, dtype=torch.float16)
        save_random_lora(models["unet"], lora, std=0.02)
        del models
        gc.collect()
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint).resolve()
    base = work / "comfyui"
    for folder in ("models/checkpoints", "models/loras", "custom_nodes", "output", "input", "user", "temp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for link, target in ((base / "models/checkpoints" / CHECKPOINT, checkpoint), (base / "models/loras" / LORA, lora),
                         (base / "custom_nodes" / "hgdpo", ROOT)):
        if not link.exists():
            link.symlink_to(target)
    return base, checkpoint


def start_comfyui(args, base: Path):
    """Import ComfyUI into this process (its CLI defaults, ``--cpu``) and load the pack with its own loader."""
    comfy_dir = Path(args.comfyui_dir).expanduser().resolve()
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = args.device == "cpu"
    comfy_args.base_directory = str(base)
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(base / "custom_nodes" / "hgdpo"))):
        raise SystemExit("ComfyUI could not load the pack; see the log above.")
    version = "unknown"
    version_file = comfy_dir / "comfyui_version.py"
    if version_file.is_file():
        version = version_file.read_text().split("=")[-1].strip().strip("\"'")
    return nodes, version


def build_runs(args, nodes, checkpoint: Path, variants) -> dict:
    """One callable per variant, each running the node graph's sampler part once."""
    import comfy.sd
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:2]
    positive = nodes.CLIPTextEncode().encode(clip, BENCH_PROMPTS[0])[0]
    negative = nodes.CLIPTextEncode().encode(clip, "lowres, bad anatomy")[0]
    latent = nodes.EmptyLatentImage().generate(args.resolution, args.resolution, 1)[0]
    lora_node = nodes.NODE_CLASS_MAPPINGS["HGDPOLoraLoader"]
    lan_node = nodes.NODE_CLASS_MAPPINGS["HGDPOLANKSampler"]
    dpo = lora_node.execute(model=model, lora_name=LORA, strength=args.lora_weight).args[0]
    settings = {"seed": 1, "steps": args.steps, "cfg": args.cfg, "sampler_name": args.sampler,
                "scheduler": args.scheduler, "positive": positive, "negative": negative, "latent_image": latent,
                "denoise": 1.0}
    runs = {}
    if "ksampler" in variants:
        runs["ksampler"] = lambda: nodes.KSampler().sample(
            dpo, settings["seed"], args.steps, args.cfg, args.sampler, args.scheduler, positive, negative, latent)
    if "lan" in variants:
        runs["lan"] = lambda: lan_node.execute(model=dpo, sft_model=model, lan_strength=1.0, **settings)
    if "lan_2ckpt" in variants:
        second = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
        dpo_checkpoint = lora_node.execute(model=second, lora_name=LORA, strength=args.lora_weight).args[0]
        runs["lan_2ckpt"] = lambda: lan_node.execute(model=dpo_checkpoint, sft_model=model, lan_strength=1.0,
                                                     **settings)
    return runs


def memory_probe(args, runs, device) -> dict:
    (name,) = runs
    runs[name]()  # warm-up (loads and patches the weights)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runs[name]()
        synchronize(device)
        return {"kind": "cuda max_memory_allocated", "base_bytes": base,
                "peak_bytes": torch.cuda.max_memory_allocated(device)}
    base = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (models loaded)
    runs[name]()
    return {"kind": "cpu VmHWM after clear_refs", "base_bytes": base, "peak_bytes": proc_status("VmHWM")}


def measure_memory(argv: list[str], variants) -> dict[str, dict]:
    results = {}
    for name in variants:
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", name, "--json", handle.name]
            finished = subprocess.run(command, check=False)
            if finished.returncode != 0:
                results[name] = {"error": f"the probe exited with {finished.returncode}"}
                print(f"  memory {name}: the probe failed ({finished.returncode})", flush=True)
                continue
            results[name] = json.loads(Path(handle.name).read_text())["memory"]
        print(f"  memory {name}: peak {results[name]['peak_bytes'] / 2**20:.0f} MiB "
              f"(+{(results[name]['peak_bytes'] - results[name]['base_bytes']) / 2**20:.0f} MiB over the run)",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.comfyui_dir:
        raise SystemExit("Name the ComfyUI folder: --comfyui-dir or HGDPO_COMFYUI_DIR.")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work_dir or temporary).resolve()
        work.mkdir(parents=True, exist_ok=True)
        base, checkpoint = prepare_files(args, work)
        memory = None
        if args.memory and not args.only:  # first, in fresh processes, while this one holds no model
            probe_argv = [arg for arg in argv if arg != "--memory"]
            if "--work-dir" not in probe_argv:
                probe_argv += ["--work-dir", str(work)]
            memory = measure_memory(probe_argv, ["ksampler", "lan"] + (["lan_2ckpt"] if args.two_checkpoints else []))
        nodes, version = start_comfyui(args, base)
        import comfy.model_management

        device = comfy.model_management.get_torch_device()
        variants = [args.only] if args.only else ["ksampler", "lan"] + (["lan_2ckpt"] if args.two_checkpoints else [])
        runs = build_runs(args, nodes, checkpoint, variants)
        if args.only:
            result = {"memory": memory_probe(args, runs, device)}
            Path(args.json).write_text(json.dumps(result))
            return 0

        timed = {}
        for name, run in runs.items():
            def timed_run(run=run):
                if args.steady:
                    run()
                synchronize(device)
                start, cpu = time.perf_counter(), time.process_time()
                run()
                synchronize(device)
                return time.perf_counter() - start, time.process_time() - cpu
            timed[name] = timed_run
        names = list(runs)
        for w in range(args.warmup):
            print(f"  warm-up {w + 1}: " + ", ".join(f"{name} {timed[name]()[0]:.2f}s" for name in names), flush=True)
        seconds = {name: [] for name in runs}
        cpu_seconds = {name: [] for name in runs}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            line = []
            for name in order:
                gc.collect()
                wall, cpu = timed[name]()
                seconds[name].append(wall)
                cpu_seconds[name].append(cpu)
                line.append(f"{name} {wall:.2f}s (cpu {cpu:.2f}s)")
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(line), flush=True)

        ratio, low, high = median_ratio(seconds["lan"], seconds["ksampler"])
        cpu_ratio, cpu_low, cpu_high = median_ratio(cpu_seconds["lan"], cpu_seconds["ksampler"])
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "comfyui_version": version, "device": str(device),
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "settings": {key: getattr(args, key) for key in ("resolution", "steps", "sampler", "scheduler", "cfg",
                                                            "lora_weight", "rounds", "warmup", "steady")},
            "checkpoint": "random-weight SD1.5 (full architecture)" if args.checkpoint is None else args.checkpoint,
            "seconds": seconds, "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
            "lan_over_ksampler": {"median": ratio, "min": low, "max": high},
            "cpu_seconds": cpu_seconds,
            "lan_over_ksampler_cpu_time": {"median": cpu_ratio, "min": cpu_low, "max": cpu_high},
            "load_average": os.getloadavg(),
        }
        if "lan_2ckpt" in seconds:
            ratio2, low2, high2 = median_ratio(seconds["lan_2ckpt"], seconds["ksampler"])
            results["lan_2ckpt_over_ksampler"] = {"median": ratio2, "min": low2, "max": high2}
            results["lan_2ckpt_over_ksampler_cpu_time"] = dict(zip(
                ("median", "min", "max"), median_ratio(cpu_seconds["lan_2ckpt"], cpu_seconds["ksampler"])))
        print(f"LAN KSampler / KSampler: {ratio:.2f}x wall (min {low:.2f}, max {high:.2f}), {cpu_ratio:.2f}x CPU time "
              f"(min {cpu_low:.2f}, max {cpu_high:.2f}) over {args.rounds} rounds; "
              + ", ".join(f"{name} {statistics.median(values):.2f}s" for name, values in seconds.items()))
        if memory is not None:
            results["memory"] = memory
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
