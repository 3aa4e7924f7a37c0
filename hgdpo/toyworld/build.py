"""Build the toy world's models from scratch: the SFT model (an SD1.5-structured pipeline) and the scorer.

``python -m hgdpo.toyworld build OUT`` renders a training set of the world (most figures correct, some
malformed, so the model learns the world's typical failures too) and trains in three phases, each written
to its own folder so that an interrupted build resumes after the last finished one:

1. **Base** (``OUT/base/``): a tiny AutoencoderKL, then a tiny UNet2DConditionModel with a tiny CLIP text
   encoder (the real CLIP tokenizer) on its latents, epsilon prediction with plain noise.
2. **Offset noise** (``OUT/offset/``): the base UNet and text encoder trained on new renders with offset
   noise (a per-channel constant added to the training noise). SD1.5's schedule keeps sqrt(alpha_bar_T) =
   0.068 of the image at the last step, and the per-channel mean of 16x16 noise spreads about as much
   (1/16), so with plain noise the model reads shirt and background colours off the noise's channel means
   and not off the prompt. From scratch with offset noise, 2,500 steps did not train this model; after the
   base phase, 300 steps do.
3. **v-prediction** (``OUT/sft/``): the same model turned into a v-prediction model on a zero-terminal-SNR
   schedule (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", as NoobAI's
   v-pred models use). The last step is pure noise, so the background and pose come from the prompt: with
   offset noise alone the seed still decided the background of 27.5% of the held-out images.

Then it trains the world's scorer (:mod:`hgdpo.toyworld.scorer`). Every step is seeded, so a build is
deterministic on a given machine and torch version. The SFT model is written as a diffusers folder, which
``--model`` of every command loads like any SD1.5 model (its scheduler config says v-prediction).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hgdpo.models.loading import clip_tokenizer, load_sd15
from hgdpo.models.tiny import build_models, save_diffusers_folder, sd15_configs
from hgdpo.options import SEED_LIMITS, check_fields, option
from hgdpo.toyworld import world
from hgdpo.toyworld.scorer import train_scorer
from hgdpo.training.losses import denoising_target

logger = logging.getLogger("hgdpo.toyworld")

RECORD = "phase.json"  # in each finished phase's folder: the settings it depends on and its time, written last
V_PREDICTION = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@dataclass(frozen=True)
class Phase:
    """One phase of denoiser training: its renders, steps, learning rate, offset noise and noise schedule."""

    seed: int
    num_images: int
    steps: int
    learning_rate: float
    offset_noise: float
    schedule: tuple[tuple[str, object], ...] = ()  # overrides of SD1.5's DDPM scheduler config


@dataclass
class BuildSettings:
    """How the world's models are trained (the defaults are the shipped world's)."""

    seed: int = option(0, "Seed of the renders, the initial weights and every training step.", **SEED_LIMITS)
    num_images: int = option(12000, "Rendered training images of the base phase.", at_least=1)
    malformed_share: float = option(0.3, "Share of the training images with a malformation.", at_least=0, at_most=1)
    vae_steps: int = option(800, "VAE training steps.", at_least=1)
    unet_steps: int = option(2500, "Base phase: UNet and text encoder steps (plain noise).", at_least=1)
    batch_size: int = option(32, "Batch size of every training phase.", at_least=1)
    learning_rate: float = option(1e-3, "Base phase learning rate.", above=0)
    uncond_share: float = option(0.1, "Share of prompts dropped to \"\" so that classifier-free guidance works.",
                                 at_least=0, at_most=1)
    ema_decay: float = option(0.995, "Decay of the weights' moving average.", at_least=0, below=1)
    offset_noise: float = option(0.25, "Offset phase: the per-channel noise constant's standard deviation.",
                                 at_least=0)
    offset_steps: int = option(300, "Offset phase: UNet and text encoder steps.", at_least=1)
    offset_learning_rate: float = option(3e-4, "Offset phase learning rate.", above=0)
    offset_images: int = option(6000, "Offset phase: new renders.", at_least=1)
    v_steps: int = option(1200, "v-prediction phase: UNet and text encoder steps.", at_least=1)
    v_learning_rate: float = option(5e-4, "v-prediction phase learning rate.", above=0)
    v_images: int = option(6000, "v-prediction phase: new renders.", at_least=1)
    scorer_steps: int = option(1000, "Scorer training steps.", at_least=1)

    def validate(self) -> None:
        """Check every setting before anything is rendered; raise a one-line ValueError naming the option."""
        check_fields(self)

    def base_phase(self) -> Phase:
        """Phase 1: the training set, plain noise."""
        return Phase(self.seed, self.num_images, self.unet_steps, self.learning_rate, offset_noise=0.0)

    def offset_phase(self) -> Phase:
        """Phase 2: new renders (another seed), offset noise."""
        return Phase(self.seed + 5, self.offset_images, self.offset_steps, self.offset_learning_rate, self.offset_noise)

    def v_phase(self) -> Phase:
        """Phase 3: new renders (a third seed), v-prediction on a zero-terminal-SNR schedule."""
        return Phase(self.seed + 11, self.v_images, self.v_steps, self.v_learning_rate, offset_noise=0.0,
                     schedule=tuple(V_PREDICTION.items()))

    def record(self, folder: str) -> dict:
        """The settings the phase written to ``folder`` (base or offset) depends on; a resumed build must match."""
        names = ["seed", "num_images", "malformed_share", "vae_steps", "unet_steps", "batch_size", "learning_rate",
                 "uncond_share", "ema_decay"]
        if folder == "offset":
            names += ["offset_noise", "offset_steps", "offset_learning_rate", "offset_images"]
        return {name: getattr(self, name) for name in names}


def world_configs() -> dict[str, dict]:
    """SD1.5's component configs at toy size: 32 px images, 16x16x4 latents, a 2-layer 32-wide CLIP."""
    configs = sd15_configs()
    configs["unet"].update(
        sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=32,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        norm_num_groups=8, attention_head_dim=4,
    )
    configs["vae"].update(
        sample_size=world.SIZE, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    configs["text_encoder"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
    )
    return configs


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def render_training_set(seed: int, count: int, malformed_share: float) -> tuple[torch.Tensor, list[str]]:
    """``count`` examples of the world: images in [-1, 1] and their prompts."""
    stream = world.training_examples(seed, malformed_share)
    examples = [next(stream) for _ in range(count)]
    return images_to_tensor([example.image for example in examples]), [example.scene.prompt for example in examples]


def _schedule(step: int, steps: int, learning_rate: float) -> float:
    """Linear warm-up over 100 steps, then linear decay to a tenth."""
    warm = min(1.0, (step + 1) / 100)
    return learning_rate * warm * (1.0 - 0.9 * step / steps)


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


def train_vae(vae, images: torch.Tensor, settings: BuildSettings) -> None:
    """Reconstruction (L1 + L2) with a small KL term, on sampled latents so the decoder tolerates error."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    vae.train()
    for step, index in enumerate(_batches(len(images), settings.batch_size, settings.vae_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, settings.vae_steps, settings.learning_rate)
        batch = images[index]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = (reconstruction - batch).abs().mean() + (reconstruction - batch).pow(2).mean()
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == settings.vae_steps - 1:
            logger.info("vae step %d/%d: loss %.4f", step + 1, settings.vae_steps, loss.item())
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of ``images`` (unscaled)."""
    return torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


def _token_ids(prompts: list[str]) -> torch.Tensor:
    tokenizer = clip_tokenizer()
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def training_noise(shape: torch.Size, offset_noise: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus, per image and channel, a constant of standard deviation ``offset_noise``."""
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def phase_scheduler(phase: Phase):
    """SD1.5's DDPM training scheduler with ``phase``'s overrides (v-prediction, zero terminal SNR)."""
    from diffusers import DDPMScheduler

    from hgdpo.models.loading import SD15_CONFIG_DIR

    return DDPMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler", **dict(phase.schedule))


def train_denoiser(unet, text_encoder, latents: torch.Tensor, prompts: list[str], phase: Phase,
                   settings: BuildSettings) -> None:
    """Denoising (SD1.5's DDPM schedule with the phase's overrides; epsilon or v target) for UNet and text
    encoder together, with EMA."""
    scheduler = phase_scheduler(phase)
    generator = torch.Generator().manual_seed(phase.seed + 2)
    ids, empty = _token_ids(prompts), _token_ids([""])[0]
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=phase.learning_rate, weight_decay=0.0)
    ema = [parameter.detach().clone() for parameter in parameters]
    unet.train()
    text_encoder.train()
    for step, index in enumerate(_batches(len(latents), settings.batch_size, phase.steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, phase.steps, phase.learning_rate)
        batch_ids = ids[index].clone()
        batch_ids[torch.rand(len(index), generator=generator) < settings.uncond_share] = empty
        clean = latents[index]
        noise = training_noise(clean.shape, phase.offset_noise, generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, text_encoder(batch_ids)[0]).sample
        loss = (prediction - denoising_target(scheduler, clean, noise, timesteps)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            for average, parameter in zip(ema, parameters):
                average.lerp_(parameter, 1.0 - settings.ema_decay)
        if step % 100 == 0 or step == phase.steps - 1:
            logger.info("unet step %d/%d: loss %.4f", step + 1, phase.steps, loss.item())
    with torch.no_grad():
        for average, parameter in zip(ema, parameters):
            parameter.copy_(average)
    unet.eval()
    text_encoder.eval()


def save_model(models: dict, output_dir: Path, phase: Phase, record: dict) -> None:
    """The diffusers folder with ``phase``'s scheduler, UNet and VAE in fp16 (half the bytes; diffusers loads
    them back as fp32), and last the phase's ``record``, through a temporary folder."""
    for name in ("unet", "vae"):
        models[name].half()
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a stopped build's own leftovers
    save_diffusers_folder(models, world_configs(), partial)
    phase_scheduler(phase).save_config(partial / "scheduler")
    (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(output_dir)


def train_base(output_dir: Path, settings: BuildSettings) -> None:
    """Phase 1: the VAE, then UNet and text encoder with plain noise; written to ``output_dir`` in one piece."""
    started = time.monotonic()
    images, prompts = render_training_set(settings.seed, settings.num_images, settings.malformed_share)
    models = build_models(world_configs(), seed=settings.seed)
    train_vae(models["vae"], images, settings)
    latents = encode_latents(models["vae"], images)
    models["vae"].register_to_config(scaling_factor=round(float(1.0 / latents.std()), 5))
    phase = settings.base_phase()
    train_denoiser(models["unet"], models["text_encoder"], latents * models["vae"].config.scaling_factor, prompts,
                   phase, settings)
    record = {"settings": settings.record("base"), "seconds": round(time.monotonic() - started, 1)}
    save_model(models, output_dir, phase, record)


def check_record(phase_dir: Path, settings: BuildSettings) -> dict:
    """The record of a finished phase to resume from; refuses one trained with other settings."""
    if not (phase_dir / RECORD).is_file():
        raise ValueError(f"{phase_dir} is not a phase this build wrote (no {RECORD}): build into a new folder.")
    record = json.loads((phase_dir / RECORD).read_text())
    wanted = settings.record(phase_dir.name)
    if record["settings"] != wanted:
        differences = "; ".join(f"{name} {record['settings'].get(name)} there, {value} asked"
                                for name, value in wanted.items() if record["settings"].get(name) != value)
        raise ValueError(f"{phase_dir} was trained with other settings ({differences}): build into a new folder, "
                         "or pass the same settings to resume.")
    return record


def train_phase(source_dir: Path, output_dir: Path, phase: Phase, settings: BuildSettings, record: dict) -> None:
    """Phase 2 or 3: the UNet and text encoder of ``source_dir``, trained on new renders of ``phase``."""
    started = time.monotonic()
    models = load_sd15(source_dir)
    images, prompts = render_training_set(phase.seed, phase.num_images, settings.malformed_share)
    latents = encode_latents(models.vae, images) * models.vae.config.scaling_factor
    unet, text_encoder = models.unet.requires_grad_(True), models.text_encoder.requires_grad_(True)
    train_denoiser(unet, text_encoder, latents, prompts, phase, settings)
    record = {**record, "seconds": round(time.monotonic() - started, 1)}
    save_model({"unet": unet, "vae": models.vae, "text_encoder": text_encoder}, output_dir, phase, record)


def build_world(output_dir: str | Path, settings: BuildSettings | None = None) -> Path:
    """Train the SFT model and the scorer into ``output_dir`` (``base/``, ``offset/``, ``sft/``,
    ``scorer.safetensors``, ``world.json``), resuming after the last phase whose folder is there."""
    settings = settings or BuildSettings()
    settings.validate()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a folder: choose a new output folder (nothing is "
                              "overwritten).")
    if (output_dir / "sft").exists():
        raise FileExistsError(f"{output_dir / 'sft'} exists: choose a new output folder (nothing is overwritten).")
    base_dir, offset_dir = output_dir / "base", output_dir / "offset"
    for phase_dir in (base_dir, offset_dir):
        if phase_dir.exists():
            check_record(phase_dir, settings)
            logger.info("resuming after the phase in %s", phase_dir)
    torch.manual_seed(settings.seed)
    # Adam's moments of the never-used token embeddings decay into denormal floats, which slow a CPU 20x
    torch.set_flush_denormal(True)
    if not offset_dir.exists():
        if not base_dir.exists():
            train_base(base_dir, settings)
        train_phase(base_dir, offset_dir, settings.offset_phase(), settings, {"settings": settings.record("offset")})
    train_phase(offset_dir, output_dir / "sft", settings.v_phase(), settings, {"settings": asdict(settings)})
    started = time.monotonic()
    train_scorer(output_dir / "scorer.safetensors", seed=settings.seed, steps=settings.scorer_steps)
    seconds = {phase: json.loads((output_dir / folder / RECORD).read_text())["seconds"]
               for phase, folder in (("base", "base"), ("offset", "offset"), ("v_prediction", "sft"))
               if (output_dir / folder).exists()}
    seconds["scorer"] = round(time.monotonic() - started, 1)
    record = {"settings": asdict(settings), "seconds": seconds, "torch": torch.__version__}
    (output_dir / "world.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("toy world built in %s: %s", output_dir,
                ", ".join(f"{name} {value} s" for name, value in seconds.items()))
    return output_dir
