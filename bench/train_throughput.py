#!/usr/bin/env python
"""Training throughput: the HG-DPO trainer's step against diffusers' Diffusion-DPO recipe.

A benchmark, not a test. One process, one UNet (with one LoRA), one batch size and resolution; three
variants measured in interleaved rounds (A B C, B C A, C A B, ...) after a warm-up; medians over rounds,
and ratios as medians of the per-round ratios (the variants of a round ran minutes or less apart):

* ``hgdpo``     our trainer's optimizer step: cached latents and text embeddings read from the on-disk
                cache (``hgdpo.training.latent_cache``) through the trainer's sampler, ``hgdpo.training.loop.micro_step_loss``
                with ``loss="hgdpo"`` (DPO + statistic matching, lambda_stat 10000), backward, gradient
                clipping with the trainer's finiteness check, AdamW on the LoRA parameters. The
                reference is the same UNet with its LoRA disabled.
* ``dpo``       the same with ``loss="dpo"`` (lambda_stat 0): ``hgdpo`` / ``dpo`` is the cost of the
                statistic-matching term (goal: under 2 %).
* ``diffusers`` the per-step recipe of diffusers'
                ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (SD1.5, LoRA), written
                anew here (see :func:`diffusers_recipe_step`): both images through the VAE encoder and the
                prompt through the CLIP text encoder at every step, then the same two UNet passes.

Peak memory is measured per variant in a fresh subprocess (``--memory subprocess``, the default),
so that one variant's peak cannot hide or inflate another's: on CUDA ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``; on the CPU the kernel's resident-set high-water mark (``VmHWM``),
reset through ``/proc/self/clear_refs`` once the models are built, so the figure covers the training
steps only (model construction has its own, unrelated peak). A CPU process's RSS also keeps freed heap
pages, which is why the variants are not measured one after another in the same process.

Examples::

    python bench/train_throughput.py --arch tiny
    python bench/train_throughput.py --arch sd15 --resolution 64 --json bench/results/cpu-sd15-64.json
    python bench/train_throughput.py --arch sd15 --device cuda --resolution 512 --mixed-precision bf16
    python bench/train_throughput.py --arch sd15 --device cuda --resolution 704x1024 --mixed-precision fp16 \\
        --gradient-checkpointing

Models have random weights (``hgdpo.models.tiny.build_models``): the real SD1.5 architecture with ``--arch sd15``,
so timings are those of the real model; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from benchlib import BENCH_PROMPTS as _PROMPTS  # noqa: E402
from benchlib import cpu_name, median_ratio, proc_status, synchronize, write_summary  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.training.config import DTYPES as _DTYPES  # noqa: E402

VARIANTS = ("hgdpo", "dpo", "diffusers")
LABELS = {
    "hgdpo": "ours: HG-DPO (DPO + stat, lambda 1e4)",
    "dpo": "ours: DPO only (lambda 0)",
    "diffusers": "diffusers train_diffusion_dpo.py",
}


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training throughput of the HG-DPO trainer's step vs diffusers' train_diffusion_dpo.py recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="sd15",
                        help="tiny: the test-size SD1.5-structured model; sd15: the real SD1.5 architecture "
                             "(random weights).")
    parser.add_argument("--resolution", default=None,
                        help="N or WxH (e.g. 512, 704x1024). Default: 64 on cpu, 512 on cuda.")
    parser.add_argument("--batch-size", type=int, default=1, help="Pairs per micro-batch.")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="Micro-batches per optimizer step (gradient accumulation).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps per variant per round. Default: 1 on cpu, 5 on cuda.")
    parser.add_argument("--rounds", type=int, default=6,
                        help="Timed rounds; each runs every variant, in an order rotated by one each round "
                             "(a multiple of the number of variants puts each variant in each slot equally).")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Untimed optimizer steps per variant first. Default: 2 on cpu, 3 on cuda.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="As the trainers' flag: frozen weights in this dtype, autocast UNet forward, fp32 "
                             "LoRA; fp16 adds a gradient scaler (CUDA only).")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="UNet gradient checkpointing.")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw",
                        help="Optimizer of every variant (adamw8bit needs bitsandbytes and CUDA).")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha = rank) on to_q/to_k/to_v/to_out.0.")
    parser.add_argument("--beta", type=float, default=2500.0,
                        help="DPO beta of ours; the diffusers recipe uses beta_dpo = this value (same loss).")
    parser.add_argument("--lambda-stat", type=float, default=10000.0, help="lambda_stat of the hgdpo variant.")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="Comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--memory", choices=("subprocess", "none"), default="subprocess",
                        help="Peak memory per variant, each in a fresh subprocess (or skip).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's). On a CPU shared with other jobs use 1: "
                             "OpenMP threads that wait for a busy core make wall-clock times swing by 5x.")
    parser.add_argument("--no-mkldnn", action="store_true",
                        help="CPU: PyTorch's native convolutions instead of oneDNN's (oneDNN re-lays out every "
                             "conv weight at every call: for sd15 about 5 GB of fresh pages per training step).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="Write all figures (and the raw per-round times) here.")
    parser.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: memory subprocess
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from hgdpo.options import parse_resolution

    args.resolution = args.resolution or ("64" if args.device == "cpu" else "512")
    if args.warmup is None:
        args.warmup = 2 if args.device == "cpu" else 3
    if args.steps is None:
        args.steps = 1 if args.device == "cpu" else 5
    args.size = parse_resolution(args.resolution)  # (width, height)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    if args.mixed_precision == "fp16" and args.device != "cuda":
        parser.error("--mixed-precision fp16 needs CUDA (as in the trainer); use bf16 or no on the CPU.")
    if min(args.batch_size, args.accumulation, args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch-size, --accumulation, --steps and --rounds must be >= 1, --warmup >= 0.")
    return args


# --------------------------------------------------------------------------- set-up


class PreparedUNet(torch.nn.Module):
    """What ``accelerator.prepare`` makes of the UNet on one device, as both trainers use it.

    Under mixed precision the forward runs in ``torch.autocast`` and its output is converted to fp32
    (accelerate's ``convert_outputs_to_fp32``). The UNet is ``.module`` (like DDP), which is where
    ``hgdpo.training.loop`` looks for it to switch the adapter off.
    """

    def __init__(self, unet, device_type: str, mixed_precision: str):
        super().__init__()
        self.module = unet
        self.device_type = device_type
        self.amp_dtype = None if mixed_precision == "no" else _DTYPES[mixed_precision]

    def forward(self, *args, **kwargs):
        if self.amp_dtype is None:
            return self.module(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.amp_dtype):
            output = self.module(*args, **kwargs)
        return SimpleNamespace(sample=output.sample.float())


class Optimizer:
    """AdamW (+ GradScaler under fp16) + constant LR schedule, as accelerate drives them on one device."""

    def __init__(self, parameters, args, device: torch.device, learning_rate: float):
        from diffusers.optimization import get_scheduler

        options = {"lr": learning_rate, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
        if args.optimizer == "adamw8bit":
            import bitsandbytes

            self.optimizer = bitsandbytes.optim.AdamW8bit(parameters, **options)
        else:
            self.optimizer = torch.optim.AdamW(parameters, **options)
        self.parameters = parameters
        self.scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        self.accumulation = args.accumulation
        self.skipped = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accumulation  # accelerator.backward under gradient accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self, max_norm: float) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)

    def step(self, finite: bool = True) -> None:
        if self.scaler:
            if finite:
                self.scaler.step(self.optimizer)
            # Always update the scaler, so it backs off after an overflow. (hgdpo.training.loop skips
            # optimizer.step() on non-finite gradients; with accelerate's fp16 scaler that also skips
            # scaler.update(), and the next unscale_() then fails. Not reproduced here.)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.skipped += not finite
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class SyntheticPairs:
    """A preference dataset in memory (random images, people prompts), with the interface ``build_cache`` reads."""

    def __init__(self, num_pairs: int, size: tuple[int, int], seed: int):
        from PIL import Image

        generator = torch.Generator().manual_seed(seed)
        width, height = size

        def image():
            # smooth random colours: upsampled noise, so the VAE sees image-like input
            low = torch.rand(1, 3, max(1, height // 16), max(1, width // 16), generator=generator)
            pixels = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
            return Image.fromarray(pixels.mul(255).round().byte().permute(1, 2, 0).numpy())

        self.pairs = [(image(), image()) for _ in range(num_pairs)]
        self.prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(num_pairs)]

    def __len__(self) -> int:
        return len(self.pairs)

    def load_pair(self, index: int):
        return self.pairs[index]

    def prompt(self, index: int) -> str:
        return self.prompts[index]


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    weight_dtype: torch.dtype
    unet: PreparedUNet
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    lora: list
    cache_dir: tempfile.TemporaryDirectory
    encoded: object
    pixel_batches: list  # diffusers recipe: (pixel_values [B, 6, H, W], input_ids [B, 77]) per micro-batch
    steps: dict = field(default_factory=dict)  # variant -> callable running one optimizer step
    optimizers: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def setup(args, variants) -> Bench:
    """Models, LoRA, the latent cache and the raw batches; then one step function per variant."""
    from diffusers import DDPMScheduler

    from hgdpo.training.latent_cache import build_cache, finalize_cache, preprocess_image
    from hgdpo.models.lora import add_lora, lora_parameters
    from hgdpo.models.families import SD15
    from hgdpo.models.loading import SD15_CONFIG_DIR, clip_tokenizer
    from hgdpo.models.tiny import build_models, sd15_configs, tiny_sd15_configs

    device = torch.device(args.device)
    weight_dtype = torch.float32 if args.mixed_precision == "no" else _DTYPES[args.mixed_precision]
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    configs = sd15_configs() if args.arch == "sd15" else tiny_sd15_configs()
    models = build_models(configs, seed=args.seed)
    unet, vae, text_encoder = models["unet"], models["vae"], models["text_encoder"]
    tokenizer = clip_tokenizer()
    scheduler = DDPMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler")

    # ---- the dataset, encoded once into the trainer's on-disk cache (fp32 encoders, as the trainer does)
    pairs_per_step = args.batch_size * args.accumulation
    num_pairs = max(4, 2 * pairs_per_step)
    dataset = SyntheticPairs(num_pairs, args.size, args.seed)
    vae.to(device)
    text_encoder.to(device)
    cache_dir = tempfile.TemporaryDirectory(prefix="hgdpo-bench-cache-")
    components = SimpleNamespace(vae=vae, family=SD15, tokenizers=(tokenizer,), text_encoder_modules=(text_encoder,))
    build_cache(dataset, components, args.size, cache_dir.name)
    encoded = finalize_cache(cache_dir.name, len(dataset))

    # ---- what diffusers' script gets from its data loader: winner and loser stacked on channels, token ids
    pixel_batches = []
    for start in range(0, num_pairs - args.batch_size + 1, args.batch_size):
        indices = range(start, start + args.batch_size)
        pixels = torch.stack([torch.cat([preprocess_image(image, args.size) for image in dataset.load_pair(i)])
                              for i in indices])
        ids = tokenizer([dataset.prompt(i) for i in indices], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        pixel_batches.append((pixels.contiguous(), ids))

    # ---- frozen weights in the weight dtype. hgdpo.training.loop keeps the VAE on the device and moves the
    # text encoder to the CPU; diffusers' script keeps both on the device.
    vae.to(device, dtype=weight_dtype)
    needs_text_encoder = "diffusers" in variants
    text_encoder.to(device if needs_text_encoder else "cpu", dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype)
    # one LoRA for every variant: rank r, alpha r (diffusers' script sets lora_alpha=rank; our default is 8/8)
    add_lora(unet, args.lora_rank, float(args.lora_rank))
    lora = lora_parameters(unet)
    for parameter in lora:  # fp32 trainable weights (diffusers' script upcasts them only under fp16)
        parameter.data = parameter.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    bench = Bench(
        args=args, device=device, weight_dtype=weight_dtype, unet=PreparedUNet(unet, device.type, args.mixed_precision),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, lora=lora,
        cache_dir=cache_dir, encoded=encoded, pixel_batches=pixel_batches,
    )
    bench.info = {
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "lora_parameters": sum(p.numel() for p in lora),
        "latent_shape": list(encoded[0]["win"].shape),
        "pairs_per_step": pairs_per_step,
        "setup_seconds": round(time.perf_counter() - started, 1),
        "load_average_start": load_average,
        "started_utc": started_utc,
    }
    for variant in variants:
        bench.steps[variant] = (diffusers_recipe_step if variant == "diffusers" else ours_step)(bench, variant)
    return bench


# --------------------------------------------------------------------------- the three recipes


def ours_step(bench: Bench, variant: str):
    """One optimizer step of ``hgdpo.training.loop.train``, with its own model calls (``micro_step_loss``)."""
    from hgdpo.training.config import TrainConfig
    from hgdpo.models.families import Conditioning
    from hgdpo.training.loop import ForwardProcess, ResumableBatchSampler, StepInputs, micro_step_loss

    args, device, weight_dtype = bench.args, bench.device, bench.weight_dtype
    config = TrainConfig(loss=variant, beta=args.beta, lambda_stat=args.lambda_stat if variant == "hgdpo" else 0.0)
    optimizer = bench.optimizers[variant] = Optimizer(bench.lora, args, device, config.learning_rate)
    sampler = ResumableBatchSampler(len(bench.encoded), args.batch_size, args.seed, rank=0, world_size=1, start=0)

    def collate(items):  # hgdpo.training.loop's collate: stack each tensor of the items
        return {name: torch.stack([item[name] for item in items]) for name in items[0]}

    batches = iter(torch.utils.data.DataLoader(bench.encoded, batch_sampler=sampler, collate_fn=collate))
    noise = ForwardProcess.of(bench.scheduler, torch.Generator(device).manual_seed(args.seed * 1009))

    def step():
        logs: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.accumulation):
            batch = next(batches)
            inputs = StepInputs(
                latents=torch.cat([batch["win"], batch["lose"]]).to(device, weight_dtype),
                text=Conditioning(batch["text"].to(device, weight_dtype)),
            )
            loss = micro_step_loss(config, bench.unet, noise, inputs, logs)
            optimizer.backward(loss)
        grad_norm = optimizer.clip(config.max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
        optimizer.step(finite)
        # the trainer logs every step (log_every=1): means of the micro-batch scalars and the grad norm
        scalars = {name: sum(values) / len(values) for name, values in logs.items()}
        scalars["train/grad_norm"] = float(grad_norm)

    return step


def diffusers_recipe_step(bench: Bench, variant: str = "diffusers"):
    """One optimizer step following diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``.

    The LoRA (SD1.5) script's training-loop body, re-stated: every micro-batch encodes winner and loser
    pixels with the VAE (a posterior *sample*, in chunks of ``vae_encode_batch_size`` = 8) and the prompt
    with the text encoder; one noise draw and one timestep per pair are shared by both images; the policy
    predicts with gradients, the reference (adapters disabled) without; the loss is
    ``-logsigmoid(beta_dpo * (ref_diff - model_diff))`` with ``diff = mse_w - mse_l`` per pair.
    (The script's first version, until diffusers PR #6788 of January 2024, wrote the same thing as
    ``-logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff))``; Salesforce's original code still does.
    Either way the cost is the same; ``beta_dpo = --beta`` makes it numerically equal to our ``beta``.)
    No statistic-matching term. Then clip at 1.0, AdamW step, constant LR.
    Not timed here, to the script's advantage: JPEG decoding, resizing and tokenising in its data loader.
    """
    args, device, weight_dtype = bench.args, bench.device, bench.weight_dtype
    optimizer = bench.optimizers[variant] = Optimizer(bench.lora, args, device, learning_rate=1e-5)
    batches = itertools.cycle(bench.pixel_batches)
    unet, vae, text_encoder, scheduler = bench.unet, bench.vae, bench.text_encoder, bench.scheduler
    vae_encode_batch_size, beta_dpo, max_grad_norm = 8, args.beta, 1.0

    def per_pair_mse(prediction, target):
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return error.mean(dim=list(range(1, error.ndim)))

    def step():
        for _ in range(args.accumulation):
            pixel_values, input_ids = next(batches)
            pixel_values = pixel_values.to(device, weight_dtype)  # the prepared loader puts batches on the device
            images = torch.cat(pixel_values.chunk(2, dim=1))  # [B, 6, H, W] -> [2B, 3, H, W], winners first
            latents = torch.cat([vae.encode(images[i: i + vae_encode_batch_size]).latent_dist.sample()
                                 for i in range(0, images.shape[0], vae_encode_batch_size)])
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)  # one draw per pair
            pairs = latents.shape[0] // 2
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), device=latents.device,
                                      dtype=torch.long).repeat(2)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                text = text_encoder(input_ids.to(text_encoder.device))[0]
            text = text.repeat(2, 1, 1)
            prediction = unet(noisy, timesteps, text).sample
            if scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = scheduler.get_velocity(latents, noise, timesteps)
            model_losses = per_pair_mse(prediction, target)
            model_w, model_l = model_losses.chunk(2)
            raw_model_loss = 0.5 * (model_w.mean() + model_l.mean())
            model_diff = model_w - model_l
            unet.module.disable_adapters()
            with torch.no_grad():
                reference = unet(noisy, timesteps, text).sample.detach()
                reference_losses = per_pair_mse(reference, target)
                reference_w, reference_l = reference_losses.chunk(2)
                ref_diff = reference_w - reference_l
                raw_ref_loss = reference_losses.mean()
            unet.module.enable_adapters()
            logits = ref_diff - model_diff
            loss = -F.logsigmoid(beta_dpo * logits).mean()
            implicit_acc = (logits > 0).sum().float() / logits.size(0)
            implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
            optimizer.backward(loss)
            # the script logs these after every micro-batch
            _ = (loss.detach().item(), raw_model_loss.detach().item(), raw_ref_loss.detach().item(),
                 implicit_acc.detach().item())
        optimizer.clip(max_grad_norm)
        optimizer.step()

    return step


# --------------------------------------------------------------------------- measuring


def timed(bench: Bench, variant: str, steps: int) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds per optimizer step over ``steps`` consecutive steps."""
    gc.collect()
    synchronize(bench.device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        bench.steps[variant]()
    synchronize(bench.device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure_speed(bench: Bench, variants: list[str]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round seconds per step of every variant: wall clock, and CPU time of this process (all threads)."""
    args = bench.args
    for variant in variants:  # warm-up: allocator, kernels, optimizer state
        for _ in range(args.warmup):
            bench.steps[variant]()
        synchronize(bench.device)
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    cpu_seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)  # ABC, BCA, CAB, ...: no variant runs twice in a row across rounds
        order = variants[shift:] + variants[:shift]
        for variant in order:
            wall, cpu = timed(bench, variant, args.steps)
            seconds[variant].append(wall)
            cpu_seconds[variant].append(cpu)
        print(f"  round {round_index + 1}/{args.rounds}: "
              + "  ".join(f"{variant} {seconds[variant][-1]:.3f}s/step (cpu {cpu_seconds[variant][-1]:.3f}s)"
                          for variant in variants), flush=True)
    return seconds, cpu_seconds


def measure_stat_term(bench: Bench, repeats: int = 40) -> dict:
    """The statistic-matching term alone: ``hgdpo_loss`` with lambda_stat vs 0, on tensors of the UNet's shapes.

    Forward, logging scalars and backward down to the predictions, as in ``micro_step_loss`` (the UNet's own
    backward runs once either way: the two gradients are summed before it). Alternated, medians. Much less
    noisy than the difference of two whole training steps, which is what makes a 2 % goal checkable on a busy
    machine.
    """
    from hgdpo.training.losses import hgdpo_loss

    args, device = bench.args, bench.device
    pairs = args.batch_size
    shape = (2 * pairs, *bench.info["latent_shape"])
    generator = torch.Generator(device).manual_seed(args.seed)
    policy_values, reference, target, noisy = (torch.randn(shape, generator=generator, device=device) for _ in range(4))
    timesteps = torch.randint(0, bench.scheduler.config.num_train_timesteps, (pairs,), generator=generator,
                              device=device).repeat(2)
    alphas_cumprod = bench.scheduler.alphas_cumprod.to(device)

    def once(lambda_stat: float) -> float:
        policy = policy_values.clone().requires_grad_()  # fp32, as the prepared UNet returns it
        synchronize(device)
        started = time.perf_counter()
        result = hgdpo_loss(policy, reference, target, noisy, timesteps, alphas_cumprod, beta=args.beta,
                            lambda_stat=lambda_stat)
        result.scalars()
        result.loss.backward()
        synchronize(device)
        return time.perf_counter() - started

    for _ in range(5):
        once(args.lambda_stat), once(0.0)
    with_stat, without = [], []
    for index in range(repeats):
        if index % 2:
            without.append(once(0.0))
            with_stat.append(once(args.lambda_stat))
        else:
            with_stat.append(once(args.lambda_stat))
            without.append(once(0.0))
    extra = statistics.median(a - b for a, b in zip(with_stat, without))
    return {
        "loss_ms_with_stat": 1e3 * statistics.median(with_stat),
        "loss_ms_without": 1e3 * statistics.median(without),
        "extra_ms_per_micro_batch": 1e3 * extra,
        "repeats": repeats,
    }


def memory_probe(args) -> dict:
    """In a fresh process: build everything, then the peak memory of ``warmup + 1`` steps of one variant."""
    import resource

    variant = args.probe
    bench = setup(args, [variant])
    gc.collect()
    synchronize(bench.device)
    steps = max(2, args.warmup + 1)  # the first step also allocates the AdamW state
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
        for _ in range(steps):
            bench.steps[variant]()
        synchronize(bench.device)
        peak = torch.cuda.max_memory_allocated(bench.device)
        return {"kind": "cuda max_memory_allocated", "base_bytes": base, "peak_bytes": peak,
                "step_growth_bytes": peak - base, "steps": steps,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(bench.device), "torch": torch.__version__}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        kind = "cpu VmHWM after clear_refs"
    except OSError:
        kind = "cpu ru_maxrss (includes model construction)"
    base = proc_status("VmRSS")
    for _ in range(steps):
        bench.steps[variant]()
    if kind.startswith("cpu VmHWM"):
        peak = proc_status("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "base_bytes": base, "peak_bytes": peak, "step_growth_bytes": peak - base, "steps": steps,
            "torch": torch.__version__}


def measure_memory(argv: list[str], variants: list[str]) -> dict[str, dict]:
    results = {}
    for variant in variants:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "probe.json"
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--probe", variant,
                       "--probe-out", str(out), "--memory", "none"]
            print(f"  memory: {variant} in a fresh process ...", flush=True)
            completed = subprocess.run(command, check=False, capture_output=True, text=True)
            if completed.returncode or not out.exists():
                print(f"  memory probe for {variant} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
                results[variant] = {"error": completed.stderr[-2000:]}
                continue
            results[variant] = json.loads(out.read_text())
    return results


# --------------------------------------------------------------------------- reporting


def environment(args, bench: Bench) -> dict:
    cpu = cpu_name()
    import diffusers
    import peft
    import transformers

    env = {
        "date_start": bench.info.get("started_utc"),
        "date_end": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": bench.info.get("load_average_start"),
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if bench.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(bench.device)
    return env


def _ratios(seconds: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    ratios = {}
    if "hgdpo" in seconds and "diffusers" in seconds:
        ratios["speedup_hgdpo_vs_diffusers"] = median_ratio(seconds["diffusers"], seconds["hgdpo"])
    if "dpo" in seconds and "diffusers" in seconds:
        ratios["speedup_dpo_vs_diffusers"] = median_ratio(seconds["diffusers"], seconds["dpo"])
    if "hgdpo" in seconds and "dpo" in seconds:
        median, low, high = median_ratio(seconds["hgdpo"], seconds["dpo"])
        ratios["stat_overhead_percent"] = (100 * (median - 1), 100 * (low - 1), 100 * (high - 1))
    return {name: {"median": value[0], "min": value[1], "max": value[2]} for name, value in ratios.items()}


def summarize(args, bench: Bench, seconds: dict, cpu_seconds: dict, memory: dict, stat_term: dict | None) -> dict:
    pairs = bench.info["pairs_per_step"]
    variants = {}
    for variant, values in seconds.items():
        variants[variant] = {
            "label": LABELS[variant],
            "seconds_per_step_median": statistics.median(values),
            "seconds_per_step_min": min(values),
            "seconds_per_step_max": max(values),
            "pairs_per_second_median": statistics.median(pairs / value for value in values),
            "cpu_seconds_per_step_median": statistics.median(cpu_seconds[variant]),
            "seconds_per_step_rounds": values,
            "cpu_seconds_per_step_rounds": cpu_seconds[variant],
            "skipped_nonfinite_steps": bench.optimizers[variant].skipped,
            "memory": memory.get(variant),
        }
    if stat_term and "dpo" in seconds:
        step = statistics.median(seconds["dpo"])
        stat_term["percent_of_dpo_step"] = 100 * stat_term["extra_ms_per_micro_batch"] * 1e-3 * args.accumulation / step
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "arch": args.arch, "resolution_wxh": list(args.size), "batch_size_pairs": args.batch_size,
            "accumulation": args.accumulation, "pairs_per_step": pairs, "steps_per_round": args.steps,
            "rounds": args.rounds, "warmup_steps": args.warmup, "device": args.device,
            "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
            "optimizer": args.optimizer, "lora_rank": args.lora_rank, "beta": args.beta,
            "lambda_stat": args.lambda_stat, "seed": args.seed, "threads": args.threads,
            "mkldnn": torch.backends.mkldnn.enabled,
        },
        "model": bench.info,
        "environment": environment(args, bench),
        "variants": variants,
        "ratios": _ratios(seconds),
        "ratios_by_process_cpu_time": _ratios(cpu_seconds),
        "stat_term_isolated": stat_term,
    }


def _mib(value) -> str:
    return f"{value / 2**20:,.0f}" if isinstance(value, (int, float)) else "-"


def _print_ratios(ratios: dict, basis: str) -> None:
    for key, name in (("speedup_hgdpo_vs_diffusers", "ours HG-DPO"), ("speedup_dpo_vs_diffusers", "ours DPO-only")):
        if key in ratios:
            r = ratios[key]
            print(f"speed-up ({basis}), {name} vs diffusers recipe: x{r['median']:.2f} "
                  f"(rounds: x{r['min']:.2f} to x{r['max']:.2f})")
    if "stat_overhead_percent" in ratios:
        r = ratios["stat_overhead_percent"]
        verdict = "within" if r["median"] < 2.0 else "ABOVE"
        print(f"statistic-loss overhead ({basis}), whole steps hgdpo/dpo - 1: {r['median']:+.2f}% "
              f"(rounds: {r['min']:+.2f}% to {r['max']:+.2f}%), {verdict} the 2% goal")


def print_table(summary: dict) -> None:
    settings, env = summary["settings"], summary["environment"]
    width, height = settings["resolution_wxh"]
    on_cpu = settings["device"] == "cpu"
    print()
    print(f"arch {settings['arch']}, {width}x{height}, {settings['batch_size_pairs']} pair(s)/micro-batch x "
          f"{settings['accumulation']} = {settings['pairs_per_step']} pair(s)/step, device {settings['device']}"
          f" ({env.get('gpu') or env['host_cpu']}, {env['torch_threads']} threads), mixed precision "
          f"{settings['mixed_precision']}, gradient checkpointing {settings['gradient_checkpointing']}, "
          f"{settings['rounds']} rounds x {settings['steps_per_round']} steps")
    memory_kind = next((v["memory"]["kind"] for v in summary["variants"].values()
                        if v["memory"] and "kind" in v["memory"]), "not measured")
    header = (f"{'variant':<40} {'s/step':>8} {'(min-max)':>15} {'pairs/s':>8} "
              + (f"{'cpu-s/step':>10} " if on_cpu else "") + f"{'peak MiB':>9} {'step +MiB':>9}")
    print(header)
    print("-" * len(header))
    for variant in summary["variants"].values():
        memory = variant["memory"] or {}
        spread = f"{variant['seconds_per_step_min']:.3f}-{variant['seconds_per_step_max']:.3f}"
        print(f"{variant['label']:<40} {variant['seconds_per_step_median']:>8.3f} {spread:>15} "
              f"{variant['pairs_per_second_median']:>8.3f} "
              + (f"{variant['cpu_seconds_per_step_median']:>10.3f} " if on_cpu else "")
              + f"{_mib(memory.get('peak_bytes')):>9} {_mib(memory.get('step_growth_bytes')):>9}")
    print(f"(wall-clock medians over rounds{'; cpu-s = CPU time of the process, all threads' if on_cpu else ''}; "
          f"memory: {memory_kind}, each variant in its own process; 'step +MiB' = peak minus the memory held "
          "when the first step began)")
    _print_ratios(summary["ratios"], "wall clock")
    if on_cpu:
        _print_ratios(summary["ratios_by_process_cpu_time"], "process CPU time")
    stat = summary.get("stat_term_isolated")
    if stat and "percent_of_dpo_step" in stat:
        verdict = "within" if stat["percent_of_dpo_step"] < 2.0 else "ABOVE"
        print(f"statistic-loss overhead, isolated: +{stat['extra_ms_per_micro_batch']:.3f} ms per micro-batch "
              f"(loss fwd+bwd {stat['loss_ms_without']:.3f} -> {stat['loss_ms_with_stat']:.3f} ms) = "
              f"{stat['percent_of_dpo_step']:.3f}% of a DPO step, {verdict} the 2% goal")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    if args.probe:
        result = memory_probe(args)
        Path(args.probe_out).write_text(json.dumps(result))
        return 0
    # memory first, each variant in its own process, while this one holds no model (on a GPU the two
    # processes would otherwise share its memory)
    memory = measure_memory(argv, args.variants) if args.memory == "subprocess" else {}
    print(f"setting up {args.arch} at {args.size[0]}x{args.size[1]} on {args.device} ...", flush=True)
    bench = setup(args, args.variants)
    print(
        f"  UNet {bench.info['unet_parameters'] / 1e6:.1f}M parameters, "
        f"LoRA {bench.info['lora_parameters'] / 1e6:.2f}M, "
        f"latents {bench.info['latent_shape']}, set-up {bench.info['setup_seconds']}s",
        flush=True,
    )
    print(f"warm-up ({args.warmup} steps each), then {args.rounds} rounds of {args.steps} steps per variant:",
          flush=True)
    seconds, cpu_seconds = measure_speed(bench, args.variants)
    stat_term = measure_stat_term(bench) if {"hgdpo", "dpo"} <= set(args.variants) else None
    summary = summarize(args, bench, seconds, cpu_seconds, memory, stat_term)
    write_summary(args.json, summary)
    print_table(summary)
    if args.json:
        print(f"wrote {args.json}")
    bench.cache_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
