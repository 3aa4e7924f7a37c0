"""HG-DPO inference with diffusers: the LoRA at a weight, LAN lockstep sampling, best-of-N.

This is the toolkit's one generation path: the dataset builder, ``trainer/sample.py``, the evaluation
and the trainer's validation images all draw noise with :func:`seed_noise`, sample with
:func:`sample_latents` and decode with :func:`decode_images`, so a recorded seed regenerates its image.

    generator = ImageGenerator(load_model("model.safetensors"), lora="hgdpo.safetensors")  # SD1.5 or SDXL
    output = generator.generate(["a woman singing on the stage"], seeds=[7],
                                config=SamplingConfig(lora_weight=0.5, lan_strength=1.0))
    output.images[0].save("out.png")

LAN (Eq. 7) samples the SFT and the DPO model in lockstep. Both trajectories live in one latent batch
``[x_sft; x_dpo]`` that any diffusers scheduler steps as usual: schedulers keep their multistep
history per element, so each trajectory has its own solver state, and the stochastic ones draw their
noise from one generator per element (:func:`seed_noise`), seeded so that both halves get the same draws. After every
step :func:`hgdpo.inference.lan.normalize_stacked` renormalises the DPO half to the SFT half.

When the DPO model is the SFT model plus a LoRA (the common case), one UNet evaluates both halves in
one forward with the LoRA scaled per sample (0 for SFT rows, w for DPO rows; see
:class:`hgdpo.models.lora_runtime.FunctionalLoRA`): one copy of the weights, nothing re-patched per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hgdpo.inference.lan import normalize_stacked
from hgdpo.models.families import Conditioning, ModelFamily, ModelFamilyError, cat_conditioning
from hgdpo.models.lora_runtime import FunctionalLoRA, LoRAFile, attach_lora, read_lora, refuse_family_mismatch
from hgdpo.options import check_fields, option

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.models.loading import SD15Components
    from hgdpo.feedback.scorers import Scorer
    from hgdpo.feedback.selection import ScoredImage

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

SAMPLERS: dict[str, tuple[str, dict[str, object], str]] = {
    # name: (diffusers scheduler class, config overrides, the WebUI's label)
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                     "DPM++ 2M SDE"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
SCHEDULES = ("normal", "karras")


@dataclass
class SamplingConfig:
    """Sampling settings; the defaults are the paper's (DPM-Solver++, 50 steps, CFG 5, LoRA weight 0.5)."""

    steps: int = option(50, "Sampling steps (paper: 50).", at_least=1, at_most=1000)
    guidance_scale: float = option(5.0, "Classifier-free guidance scale (paper: 5.0).", at_least=0, flag="--cfg")
    sampler: str = option("dpmpp_2m", "Sampler (diffusers scheduler; paper: DPM-Solver++, dpmpp_2m).",
                          tuple(SAMPLERS))
    schedule: str = option("normal", "Noise schedule (karras: Karras sigmas).", SCHEDULES)
    width: int | None = option(None, "Image width, a multiple of 8 (default: the model family's, SD1.5 512, "
                                     "SDXL 1024).", at_least=8, at_most=8192)
    height: int | None = option(None, "Image height, a multiple of 8 (default: the model family's).", at_least=8,
                                at_most=8192)
    negative_prompt: str = option("", "Negative prompt for guidance.")
    lora_weight: float = option(0.5, "LoRA weight (paper: 0.5).", at_least=-10, at_most=10)
    lan_strength: float = option(
        0.0, "Latent adaptive normalization: sample SFT and DPO in lockstep and renormalise the DPO latent after "
             "each step (Eq. 7). Bare --lan means strength 1 (the paper); 0 turns it off.",
        at_least=0, at_most=1, flag="--lan", metavar="STRENGTH", const=1.0)
    """0 samples the DPO model alone; (0, 1] samples SFT and DPO in lockstep with LAN (1 = Eq. 7)."""

    def validate(self) -> None:
        """Check every setting (type, range, finiteness) before anything is loaded; one-line ValueError."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        check_fields(self)
        if (self.width or 8) % 8 or (self.height or 8) % 8:
            raise ValueError(f"Width and height must be positive multiples of 8, got {self.width}x{self.height}.")

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height), or None while either is left to the model family."""
        return (self.width, self.height) if self.width and self.height else None

    def for_family(self, family: ModelFamily) -> SamplingConfig:
        """These settings with a missing width or height set to the family's default resolution."""
        return replace(self, width=self.width or family.default_resolution,
                       height=self.height or family.default_resolution)

    @property
    def sampler_label(self) -> str:
        """The sampler as the WebUI names it, for the image's parameters."""
        return SAMPLERS[self.sampler][2]


def make_scheduler(base_config, sampler: str = "dpmpp_2m", schedule: str = "normal"):
    """A fresh diffusers scheduler for ``sampler`` built on the model's training noise schedule."""
    import diffusers

    class_name, overrides, _ = SAMPLERS[sampler]
    scheduler_class = getattr(diffusers, class_name)
    options = dict(overrides)
    if schedule == "karras":
        if "use_karras_sigmas" not in inspect.signature(scheduler_class.__init__).parameters:
            raise ValueError(f"The {sampler} sampler has no Karras schedule in diffusers; use schedule 'normal'.")
        options["use_karras_sigmas"] = True
    return scheduler_class.from_config(base_config, **options)


def _step_kwargs(scheduler, generator: list[torch.Generator]) -> dict[str, object]:
    """The optional ``step`` arguments this scheduler accepts (as diffusers' pipelines pass them)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def vae_scale_factor(vae) -> int:
    """How many pixels one latent cell spans (8 for SD1.5)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(unet, vae, width: int, height: int) -> tuple[int, int, int]:
    """``(C, H/8, W/8)``: the latent of one ``width`` x ``height`` image."""
    factor = vae_scale_factor(vae)
    return unet.config.in_channels, height // factor, width // factor


NOISE_RULE = "per-image CPU generator, float32 (seed_noise)"  # in the evaluation cache's digest: a new rule, new images


def seed_noise(seeds: Sequence[int], shape: tuple[int, int, int],
               device: str | torch.device) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The seed-to-noise rule of every image the toolkit generates: ``(noise [N, *shape], generators)``.

    Image ``k`` has its own CPU generator ``torch.Generator().manual_seed(seeds[k])``; its initial
    latent noise ``[1, C, H/8, W/8]`` is drawn from it on the CPU in float32, then moved to ``device``
    (as ComfyUI's ``prepare_noise`` and the WebUI's CPU RNG draw it). A seed thus gives the same noise
    on every device, at every precision and batch position. The generators are returned advanced past
    that draw: samplers draw their per-step noise (ancestral, SDE) from them, each image from its own.
    """
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    noise = [torch.randn((1, *shape), generator=generator, dtype=torch.float32) for generator in generators]
    return torch.cat(noise).to(device), generators


@torch.no_grad()
def sample_latents(
    denoise: Denoiser,
    scheduler,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    steps: int,
    device: str | torch.device,
    chains: int = 1,
    after_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Sample one float32 latent per seed (:func:`seed_noise`) with a diffusers scheduler.

    ``chains`` > 1 stacks that many copies of the batch (``[x_sft; x_dpo]`` for LAN), each copy with
    its own generators seeded alike, so that every chain gets the same initial and per-step noise.
    ``after_step`` transforms the latents after each step; ``callback(i, t, latents)`` sees them after
    step ``i`` (after ``after_step``).
    """
    from tqdm.auto import tqdm

    draws = [seed_noise(seeds, shape, device) for _ in range(chains)]
    generators = [generator for _, chain in draws for generator in chain]
    scheduler.set_timesteps(steps, device=device)
    latents = torch.cat([noise for noise, _ in draws]) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not show_progress, leave=False)):
        model_output = denoise(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(latents)
        if callback is not None:
            callback(i, t, latents)
    return latents


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> list[Image]:
    """RGB images of SD latents (the VAE decoder and diffusers' post-processing)."""
    from diffusers.image_processor import VaeImageProcessor

    pixels = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).postprocess(pixels, output_type="pil")


class GuidedUNet:
    """Classifier-free guidance (Ho & Salimans): one UNet forward over ``[uncond; cond]`` rows.

    The UNet runs in the conditioning's dtype; the guided output comes back in the latents' dtype (the
    sampler's float32). ``unet`` is any callable with the diffusers UNet's signature; the conditioning
    (:class:`~hgdpo.models.families.Conditioning`) carries SDXL's added inputs too. ``lora_scale`` is written to
    ``lora.scale`` before the forward; a per-sample tensor (one entry per latent row) is repeated for the
    unconditional and conditional halves.
    """

    def __init__(self, unet, positive: Conditioning, negative: Conditioning | None, guidance_scale: float,
                 lora: FunctionalLoRA | None = None, lora_scale: float | torch.Tensor = 0.0) -> None:
        self.unet = unet
        self.guided = negative is not None and guidance_scale > 1.0
        self.conditioning = cat_conditioning([negative, positive]) if self.guided else positive
        self.guidance_scale = guidance_scale
        self.lora = lora
        if isinstance(lora_scale, torch.Tensor) and self.guided:
            lora_scale = lora_scale.repeat(2)
        self.lora_scale = lora_scale

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:
            self.lora.scale = self.lora_scale
        model_input = (torch.cat([latents, latents]) if self.guided else latents).to(self.conditioning.dtype)
        output = self.unet(model_input, timestep, **self.conditioning.unet_kwargs(), return_dict=False)[0]
        output = output.to(latents.dtype)
        if not self.guided:
            return output
        uncond, cond = output.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


class LockstepUNets:
    """Two denoisers for a lockstep batch ``[x_sft; x_dpo]``: each half through its own model."""

    def __init__(self, sft: Denoiser, dpo: Denoiser) -> None:
        self.sft, self.dpo = sft, dpo

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sft, dpo = latents.chunk(2)
        return torch.cat([self.sft(sft, timestep), self.dpo(dpo, timestep)])


@dataclass
class GenerationOutput:
    """Decoded images of the DPO model (or the only model), and the final latents."""

    images: list[Image]
    latents: torch.Tensor
    seeds: list[int]
    sft_latents: torch.Tensor | None = None
    sft_images: list[Image] = field(default_factory=list)


class ImageGenerator:
    """Generates with an SD1.5- or SDXL-family model, an optional HG-DPO LoRA and optional LAN (see the module doc).

    Args:
        components: the SFT model (the base the LoRA was trained on).
        lora: a LoRA file path or :class:`LoRAFile`; the DPO model is the SFT model plus this LoRA.
        dpo_components: a separate DPO model (e.g. a merged checkpoint); the LoRA, if any, is then
            added to this model. Costs a second copy of the weights.
    """

    def __init__(self, components: SD15Components, *, lora: str | Path | LoRAFile | None = None,
                 dpo_components: SD15Components | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.sft = components
        self.dpo = dpo_components or components
        self.family = components.family
        if self.dpo.family is not self.family:
            raise ModelFamilyError(
                f"The SFT model is {self.family.label} and the DPO model {self.dpo.family.label}: LAN and the "
                "LoRA need both of one family (one latent space). Pass the DPO model of the SFT model's family.")
        for model in {id(part): part for part in (components, self.dpo)}.values():
            for module in (model.unet, *model.text_encoder_modules):
                module.to(self.device, dtype)
            model.vae.to(self.device, self.family.vae_dtype(dtype))
        if dpo_components is not None and dpo_components.unet.config.in_channels != components.unet.config.in_channels:
            raise ValueError("The SFT and DPO models have different latent channels; LAN needs one latent space.")
        self.lora = read_lora(lora, self.family) if isinstance(lora, (str, Path)) else lora
        self.unet_lora: FunctionalLoRA | None = None
        self.text_lora: FunctionalLoRA | None = None
        if self.lora is not None:
            refuse_family_mismatch(self.lora.family, self.family, self.lora.path or "The LoRA")
            self.unet_lora, self.text_lora = attach_lora(self.dpo.unet, self.dpo.text_encoder_modules, self.lora,
                                                         scale=0.0)

    @property
    def shares_weights(self) -> bool:
        """True when the DPO model is the SFT model plus the LoRA (the one-UNet fast path applies)."""
        return self.dpo is self.sft

    def _encode(self, model: SD15Components, prompts: Sequence[str], config: SamplingConfig,
                text_scale: float) -> tuple[Conditioning, Conditioning | None]:
        """Conditioning per row of ``prompts`` and of the negative prompt; each distinct prompt is encoded once
        (a pool shares one)."""
        distinct = list(dict.fromkeys(prompts))
        if self.text_lora is not None and model is self.dpo:
            self.text_lora.scale = text_scale
        size = (config.height, config.width)
        positive = model.encode_prompts(distinct, size).to(self.device, self.dtype)
        rows = torch.tensor([distinct.index(prompt) for prompt in prompts], device=self.device)
        if config.guidance_scale <= 1.0:
            return positive.rows(rows), None
        negative = model.encode_prompts([config.negative_prompt], size).to(self.device, self.dtype)
        return positive.rows(rows), negative.rows(torch.zeros_like(rows))

    def denoiser(self, prompts: Sequence[str], config: SamplingConfig, lockstep: bool,
                 shared_forward: bool = True) -> Denoiser:
        """The model function: the DPO model alone, or SFT and DPO for a lockstep batch."""
        weight = config.lora_weight if self.lora is not None else 0.0
        dpo_text = self._encode(self.dpo, prompts, config, weight)
        if not lockstep:
            return GuidedUNet(self.dpo.unet, *dpo_text, config.guidance_scale, self.unet_lora, weight)
        same_text_encoder = self.text_lora is None and self.sft.text_encoder is self.dpo.text_encoder
        sft_text = dpo_text if same_text_encoder else self._encode(self.sft, prompts, config, 0.0)
        if self.shares_weights and shared_forward:
            count = len(prompts)
            scales = torch.tensor([0.0] * count + [weight] * count, device=self.device, dtype=self.dtype)
            positive = cat_conditioning([sft_text[0], dpo_text[0]])
            negative = None if sft_text[1] is None else cat_conditioning([sft_text[1], dpo_text[1]])
            return GuidedUNet(self.dpo.unet, positive, negative, config.guidance_scale, self.unet_lora, scales)
        sft_lora = self.unet_lora if self.shares_weights else None
        return LockstepUNets(GuidedUNet(self.sft.unet, *sft_text, config.guidance_scale, sft_lora, 0.0),
                             GuidedUNet(self.dpo.unet, *dpo_text, config.guidance_scale, self.unet_lora, weight))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], config: SamplingConfig | None = None, *,
                 callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
                 return_sft: bool = False, shared_forward: bool = True,
                 show_progress: bool = False) -> GenerationOutput:
        """One image per (prompt, seed). With ``config.lan_strength > 0`` SFT and DPO sample in lockstep.

        ``callback(i, t, dpo_latents, sft_latents)`` runs after every step (``sft_latents`` is None
        without LAN). ``shared_forward=False`` evaluates a shared-weights lockstep batch with two
        forwards instead of one (the reference for the fast path).
        """
        config = (config or SamplingConfig()).for_family(self.family)
        config.validate()
        if len(prompts) != len(seeds):
            raise ValueError(f"Got {len(prompts)} prompts for {len(seeds)} seeds.")
        lockstep = config.lan_strength > 0.0
        if lockstep and self.lora is None and self.shares_weights:
            raise ValueError("LAN needs a DPO model that differs from the SFT model: give an HG-DPO LoRA "
                             "or a separate DPO checkpoint.")
        denoise = self.denoiser(prompts, config, lockstep, shared_forward)
        scheduler = make_scheduler(self.sft.noise_scheduler.config, config.sampler, config.schedule)
        after_step, step_callback = None, None
        if lockstep:
            after_step = partial(normalize_stacked, strength=config.lan_strength)
        if callback is not None:
            def step_callback(i: int, t: torch.Tensor, latents: torch.Tensor) -> None:
                if lockstep:
                    sft, dpo = latents.chunk(2)
                    callback(i, t, dpo, sft)
                else:
                    callback(i, t, latents, None)
        shape = latent_shape(self.sft.unet, self.sft.vae, config.width, config.height)
        latents = sample_latents(denoise, scheduler, seeds, shape, config.steps, self.device, 2 if lockstep else 1,
                                 after_step, step_callback, show_progress)
        sft_latents = None
        if lockstep:
            sft_latents, latents = latents.chunk(2)
        if self.unet_lora is not None:
            self.unet_lora.scale = 0.0
        return GenerationOutput(
            images=decode_images(self.dpo.vae, latents),
            latents=latents,
            seeds=[int(seed) for seed in seeds],
            sft_latents=sft_latents,
            sft_images=decode_images(self.sft.vae, sft_latents) if return_sft and sft_latents is not None else [],
        )


def best_of_n(generator: ImageGenerator, prompt: str, seed: int, count: int, scorer: Scorer,
              config: SamplingConfig | None = None, batch_size: int = 4,
              show_progress: bool = False) -> list[ScoredImage]:
    """Generate ``count`` candidates (seeds ``seed .. seed+count-1``, in batches) and rank them best first.

    ``ScoredImage.index`` is the candidate's offset from ``seed``.
    """
    from tqdm.auto import tqdm

    from hgdpo.feedback.selection import rank_candidates

    if count < 1:
        raise ValueError(f"Best-of-N needs N >= 1, got {count}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    images: list[Image] = []
    with tqdm(total=count, desc="candidates", disable=not show_progress) as progress:
        for start in range(0, count, batch_size):
            seeds = list(range(seed + start, seed + min(start + batch_size, count)))
            images += generator.generate([prompt] * len(seeds), seeds, config).images
            progress.update(len(seeds))
    return rank_candidates(scorer, prompt, images)
