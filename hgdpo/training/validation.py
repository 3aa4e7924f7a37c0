"""The trainer's validation images, drawn through the toolkit's one generation path."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from hgdpo.inference.sampling import GuidedUNet, decode_images, latent_shape, make_scheduler, sample_latents
from hgdpo.training.config import TrainConfig

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.models.families import Conditioning
    from hgdpo.models.loading import SD15Components


def validation_images(config: TrainConfig, components: SD15Components, unet, prompts: Conditioning,
                      negative_prompt: Conditioning) -> list[list[Image]]:
    """The validation images, one row per ``config.validation_lora_weights`` entry (prompts x seeds in each).

    They come from the toolkit's one generation path (:func:`hgdpo.inference.sampling.sample_latents`,
    DPM-Solver++ 2M, the seed rule of :func:`~hgdpo.inference.sampling.seed_noise`) with the trained
    LoRA at each weight, so a validation seed starts from the noise that seed gives in the dataset
    builder, ``trainer/sample.py`` and the evaluation.
    """
    width, height = config.size
    shape = latent_shape(unet, components.vae, width, height)
    seeds = config.validation_seeds
    same_row = torch.zeros(len(seeds), dtype=torch.long)
    negative = negative_prompt.rows(same_row).to(unet.device, unet.dtype)
    rows = []
    for weight in config.validation_lora_weights:
        lora_unet = partial(unet, cross_attention_kwargs={"scale": weight})
        images = []
        for index in range(len(prompts)):
            positive = prompts.rows(same_row + index).to(unet.device, unet.dtype)
            denoise = GuidedUNet(lora_unet, positive, negative, config.validation_guidance_scale)
            scheduler = make_scheduler(components.noise_scheduler.config, "dpmpp_2m")
            latents = sample_latents(denoise, scheduler, seeds, shape, config.validation_inference_steps, unet.device)
            images += decode_images(components.vae, latents)
        rows.append(images)
    return rows
