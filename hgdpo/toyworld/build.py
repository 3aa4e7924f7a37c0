"""Build the toy world's models from scratch: the SFT model (an SD1.5-structured pipeline) and the scorer.

``python -m hgdpo.toyworld build OUT`` renders a training set of the world (most figures correct, some
malformed, so the model learns the world's typical failures too), trains a tiny AutoencoderKL on it,
then a tiny UNet2DConditionModel with a tiny CLIP text encoder (the real CLIP tokenizer) on its latents,
and trains the world's scorer (:mod:`hgdpo.toyworld.scorer`). Every step is seeded, so a build is
deterministic on a given machine and torch version. The SFT model is written as a diffusers folder,
which ``--model`` of every command loads like any SD1.5 model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hgdpo.models.loading import clip_tokenizer
from hgdpo.models.tiny import build_models, save_diffusers_folder, sd15_configs
from hgdpo.toyworld import world
from hgdpo.toyworld.scorer import train_scorer

logger = logging.getLogger("hgdpo.toyworld")


@dataclass
class BuildSettings:
    """How the world's models are trained (the defaults are the shipped world's)."""

    seed: int = 0
    num_images: int = 12000  # rendered training images
    malformed_share: float = 0.3  # share of the SFT training images with a malformation
    vae_steps: int = 800
    unet_steps: int = 2500
    batch_size: int = 32
    learning_rate: float = 1e-3
    uncond_share: float = 0.1  # prompts dropped to "" so that classifier-free guidance works
    ema_decay: float = 0.995
    scorer_steps: int = 1000


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


def render_training_set(settings: BuildSettings) -> tuple[torch.Tensor, list[str]]:
    """``num_images`` examples of the world: images in [-1, 1] and their prompts."""
    stream = world.training_examples(settings.seed, settings.malformed_share)
    examples = [next(stream) for _ in range(settings.num_images)]
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


def train_denoiser(unet, text_encoder, latents: torch.Tensor, prompts: list[str], settings: BuildSettings) -> None:
    """Noise prediction (SD1.5's DDPM schedule, epsilon target) for UNet and text encoder together, with EMA."""
    from diffusers import DDPMScheduler

    from hgdpo.models.loading import SD15_CONFIG_DIR

    scheduler = DDPMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler")
    generator = torch.Generator().manual_seed(settings.seed + 2)
    ids, empty = _token_ids(prompts), _token_ids([""])[0]
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    ema = [parameter.detach().clone() for parameter in parameters]
    unet.train()
    text_encoder.train()
    for step, index in enumerate(_batches(len(latents), settings.batch_size, settings.unet_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, settings.unet_steps, settings.learning_rate)
        batch_ids = ids[index].clone()
        batch_ids[torch.rand(len(index), generator=generator) < settings.uncond_share] = empty
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, text_encoder(batch_ids)[0]).sample
        loss = (prediction - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            for average, parameter in zip(ema, parameters):
                average.lerp_(parameter, 1.0 - settings.ema_decay)
        if step % 100 == 0 or step == settings.unet_steps - 1:
            logger.info("unet step %d/%d: loss %.4f", step + 1, settings.unet_steps, loss.item())
    with torch.no_grad():
        for average, parameter in zip(ema, parameters):
            parameter.copy_(average)
    unet.eval()
    text_encoder.eval()


def build_world(output_dir: str | Path, settings: BuildSettings | None = None) -> Path:
    """Train the SFT model and the scorer into ``output_dir`` (``sft/``, ``scorer.safetensors``, ``world.json``)."""
    settings = settings or BuildSettings()
    output_dir = Path(output_dir)
    if (output_dir / "sft").exists():
        raise FileExistsError(f"{output_dir / 'sft'} exists: choose a new output folder (nothing is overwritten).")
    torch.manual_seed(settings.seed)
    # Adam's moments of the never-used token embeddings decay into denormal floats, which slow a CPU 20x
    torch.set_flush_denormal(True)
    started = time.monotonic()
    images, prompts = render_training_set(settings)
    configs = world_configs()
    models = build_models(configs, seed=settings.seed)
    train_vae(models["vae"], images, settings)
    latents = encode_latents(models["vae"], images)
    configs["vae"]["scaling_factor"] = round(float(1.0 / latents.std()), 5)
    models["vae"].register_to_config(scaling_factor=configs["vae"]["scaling_factor"])
    train_denoiser(models["unet"], models["text_encoder"], latents * configs["vae"]["scaling_factor"], prompts,
                   settings)
    for name in ("unet", "vae"):  # half the bytes; diffusers loads them back as fp32
        models[name].half()
    save_diffusers_folder(models, configs, output_dir / "sft")
    train_scorer(output_dir / "scorer.safetensors", seed=settings.seed, steps=settings.scorer_steps)
    record = {"settings": asdict(settings), "build_seconds": round(time.monotonic() - started, 1),
              "torch": torch.__version__}
    (output_dir / "world.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("toy world built in %s in %.0f s", output_dir, record["build_seconds"])
    return output_dir
