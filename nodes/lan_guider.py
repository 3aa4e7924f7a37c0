"""LAN lockstep sampling on ComfyUI's own samplers: a GUIDER that samples ``[SFT; DPO]`` in one batch.

:class:`LANGuider` is a ``comfy.samplers.CFGGuider``, so ``SamplerCustomAdvanced`` and the LAN KSampler
drive it like any guider (previews, progress bar, interrupt, img2img, masks). Its ``sample``

1. doubles noise and latent into the lockstep batch ``[sft; dpo]`` (:mod:`hgdpo.inference.lockstep_batch`),
2. runs the given SAMPLER on it, wrapped by :func:`lockstep_sampler`: the sampler's history is then
   per row (per chain), its noise sampler draws for one chain and repeats the draw, and its denoiser
   renormalises the DPO half in place before every evaluation (LAN after every step) and once at the end,
3. evaluates the model once per step on all rows through ComfyUI's own CFG code. An ``apply_model``
   wrapper routes the rows:

   * **shared weights** (the DPO model is the SFT model plus weight patches, e.g. ``HG-DPO LoRA`` on the
     same checkpoint loader): ComfyUI loads only the SFT variant; the LoRA patches the DPO adds are
     applied functionally (:class:`hgdpo.models.lora_runtime.FollowingLoRA` forward hooks, computed where
     each layer computes: offloaded, manually cast and fp8-stored layers alike) with a per-row scale, 0 on
     SFT rows and 1 on DPO rows: one batched forward, one copy of the weights, no re-patching;
   * **two checkpoints**: both models are loaded together (the DPO one as an additional model of the
     guider) and each gets its rows (both with the SFT ModelPatcher's model options: its patches and
     wrappers), with every per-row input sliced alike: SDXL's ``y`` (pooled text embedding and size
     conditioning), control, concat inputs;
4. returns the DPO half; the callback (previews, ``denoised_output``) sees the DPO half too.

Every ComfyUI internal used here comes from :mod:`.comfy_internals` (imported as ``comfy``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from hgdpo.inference import lockstep_batch
from hgdpo.models.lora_runtime import FollowingLoRA, LoRAModule

from . import comfy_internals as comfy

logger = logging.getLogger(__name__)

WRAPPER_KEY = "hgdpo_lan"


class LANError(ValueError):
    """Inputs that LAN sampling cannot use; the message is shown in ComfyUI's UI."""


# --------------------------------------------------------------------------- models


def check_pair(dpo, sft) -> None:
    """Refuse SFT and DPO models of different families or latent spaces (an SD1.5 and an SDXL model...)."""
    dpo_family, sft_family = comfy.model_family(dpo), comfy.model_family(sft)
    if dpo_family != sft_family:
        raise LANError(
            "LAN needs the SFT and the DPO model to share a latent space (the same model family): the DPO model "
            f"('model') is {dpo_family[0]} with {dpo_family[1]} latent channels, the SFT model ('sft_model') is "
            f"{sft_family[0]} with {sft_family[1]}. Connect the checkpoint the HG-DPO LoRA was trained on as "
            "sft_model."
        )


def lora_layers(dpo, sft) -> list[dict[str, LoRAModule]] | None:
    """The LoRA patches the DPO ModelPatcher adds on top of the SFT's, keyed by module path; None for two models.

    Each list entry holds one LoRA layer (the first patch every key adds, then the second...), so stacked
    LoRAs become stacked :class:`FollowingLoRA` s. ``strength`` is folded into the up weights.
    """
    if not comfy.shares_weights(dpo, sft):
        return None
    dpo_patches, sft_patches = comfy.weight_patches(dpo), comfy.weight_patches(sft)
    missing = [key for key in sft_patches if key not in dpo_patches]
    if missing:
        raise LANError(
            f"The SFT model has weight patches the DPO model lacks (e.g. {missing[0]}): the DPO model must be the "
            "SFT model plus the HG-DPO LoRA. Apply other LoRAs before the HG-DPO LoRA node, to both models."
        )
    layers: list[dict[str, LoRAModule]] = []
    for key, patches in dpo_patches.items():
        base = sft_patches.get(key, [])
        if len(patches) < len(base) or not all(comfy.same_patch(a, b) for a, b in zip(patches, base)):
            raise LANError(
                f"The DPO model's patches on {key} do not extend the SFT model's: the DPO model must be the SFT "
                "model plus the HG-DPO LoRA (apply other LoRAs before it, to both models)."
            )
        for depth, patch in enumerate(patches[len(base):]):
            lora = comfy.plain_lora(key, patch)
            if lora is None:
                raise LANError(
                    f"LAN's shared-weights path applies plain LoRA patches only; the DPO model has a "
                    f"{comfy.patch_kind(patch)!r} patch on {key}. Load the DPO model as its own checkpoint instead."
                )
            down, up, alpha = lora
            while len(layers) <= depth:
                layers.append({})
            layers[depth][key[: -len(".weight")]] = LoRAModule(down=down, up=up, alpha=alpha)
    return layers


def _take(value: Any, rows: int, index: torch.Tensor, pair: int, half: slice) -> Any:
    """``value`` with the rows of one chain: tensors of ``rows`` rows by ``index``, of ``pair`` rows by ``half``."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.shape[0] == rows:
            return value[index.to(value.device)]
        if value.shape[0] == pair:
            return value[half]
        return value
    if isinstance(value, dict):
        return {key: _take(item, rows, index, pair, half) for key, item in value.items()}
    if isinstance(value, list) or type(value) is tuple:
        return type(value)(_take(item, rows, index, pair, half) for item in value)
    return value


def _take_options(options: dict, rows: int, index: torch.Tensor, pair: int, half: slice) -> dict:
    """transformer_options for one chain: its top-level tensors (``sigmas``) sliced, the rest shared."""
    return {key: _take(value, rows, index, pair, half) if isinstance(value, torch.Tensor) else value
            for key, value in options.items()}


# --------------------------------------------------------------------------- sampler


def lockstep_sampler(sampler, batch: int, strength: float):
    """A KSAMPLER that runs ``sampler`` on the lockstep batch of ``batch`` rows per chain, with LAN."""
    parts = comfy.ksampler_parts(sampler)
    if parts is None:
        raise LANError(
            f"LAN sampling runs ComfyUI's k-diffusion samplers (KSamplerSelect, the Sampler* nodes); got a "
            f"{type(sampler).__name__}."
        )
    function, inner_options, inpaint_options = parts
    if comfy.rescales_its_latent(function):
        raise LANError(
            f"The sampler {getattr(function, '__name__', function)} is not supported by LAN: it evaluates the model "
            "on a rescaled copy of its latent, so LAN cannot renormalise its state after each step. Use euler, "
            "euler_ancestral, dpmpp_2m, dpmpp_2m_sde, ddim or another k-diffusion sampler."
        )
    make_noise = comfy.single_chain_noise(function, inner_options)
    random_inpaint = inpaint_options.get("random", False)

    def lockstep_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        seed = extra_args.get("seed")
        single = comfy.random_inpaint_noise(model, x[:batch], seed) if random_inpaint else None
        if single is not None:  # as KSAMPLER.sample draws it, per chain
            comfy.set_inpaint_noise(model, lockstep_batch.paired(single))
        if make_noise is not None and options.get("noise_sampler") is None and len(sigmas) > 1:
            options["noise_sampler"] = lockstep_batch.PairedNoiseSampler(make_noise(x[:batch], sigmas, seed))
        denoiser = lockstep_batch.InPlaceLANDenoiser(model, batch, strength)
        samples = function(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
        if samples.shape[0] != 2 * batch:  # not the lockstep batch (should not happen): leave it alone
            return samples
        return lockstep_batch.finish(samples, batch, strength)

    lockstep_function.__name__ = f"lan_{getattr(function, '__name__', 'sampler')}"
    return comfy.ksampler(lockstep_function, inner_options, inpaint_options)


# --------------------------------------------------------------------------- guider


class LANGuider(comfy.HookedCFGGuider):
    """CFG guidance of the lockstep batch: SFT rows by the SFT model, DPO rows by the DPO model, LAN between steps.

    ``model_patcher`` is the SFT model (its latent format drives previews and empty-latent channels). After
    ``sample``, ``sft_samples`` holds the SFT chain's result (the same batch of the stock sampler).
    """

    wrapper_key = WRAPPER_KEY

    def __init__(self, dpo, sft, strength: float = 1.0):
        comfy.require("LAN")  # before anything is loaded or sampled
        check_pair(dpo, sft)
        if not 0.0 <= strength <= 1.0:
            raise LANError(f"LAN strength must lie in [0, 1], got {strength}.")
        self.layers = lora_layers(dpo, sft)
        if self.layers is None:  # the DPO checkpoint is loaded together with the SFT one
            sft = comfy.with_additional_model(sft, WRAPPER_KEY, dpo)
        elif not self.layers:
            logger.info("LAN: the DPO model is the SFT model (no LoRA patches on top): LAN changes nothing.")
        super().__init__(sft)
        self.dpo = dpo
        self.strength = float(strength)
        self.batch = 0
        self._hooks: list[FollowingLoRA] = []
        self.sft_samples: torch.Tensor | None = None

    @property
    def shared_weights(self) -> bool:
        return self.layers is not None

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None, **kwargs):
        if comfy.is_nested(latent_image):
            raise LANError("LAN samples one latent per image (SD1.5 and SDXL families); this latent is a nested, "
                           "multi-part one.")
        self.batch = batch = noise.shape[0]
        if latent_image.shape[0] != batch:
            latent_image = comfy.repeat_to_batch_size(latent_image, batch)
        wrapped = lockstep_sampler(sampler, batch, self.strength)

        def dpo_callback(step, x0, x, total_steps):
            if x0 is not None and x0.shape[0] == 2 * batch:
                x0, x = x0[batch:], x[batch:]
            return callback(step, x0, x, total_steps)

        samples = super().sample(lockstep_batch.paired(noise), lockstep_batch.paired(latent_image), wrapped, sigmas,
                                 denoise_mask=denoise_mask, callback=None if callback is None else dpo_callback,
                                 disable_pbar=disable_pbar, seed=seed, **kwargs)
        if samples.shape[0] != 2 * batch:  # no steps to take: ComfyUI hands the latent back
            self.sft_samples = samples
            return samples
        self.sft_samples = samples[:batch]
        return samples[batch:]

    @contextlib.contextmanager
    def models_loaded(self):
        """Hook the LoRA layers onto the (shared) weights where they live, for the run; removed after it."""
        hooks = []
        if self.layers and comfy.is_dynamic(self.model_patcher):
            logger.debug("LAN: dynamic VRAM; the HG-DPO LoRA is added after ComfyUI's per-layer weight cast.")
        try:
            for number, layer in enumerate(self.layers or []):
                hooks.append(FollowingLoRA(comfy.submodules(self.model_patcher, layer), layer, 0.0,
                                           label=f"HG-DPO LoRA patch {number + 1}",
                                           compute_dtype=comfy.compute_dtype(self.model_patcher)))
            self._hooks = hooks
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self._hooks = []

    def wrap_apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                         transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        rows, batch = x.shape[0], self.batch
        if batch == 0 or rows % (2 * batch):
            raise LANError(f"LAN: the model was called on {rows} rows, not on lockstep batches of {2 * batch}.")
        if self.shared_weights:
            scales = lockstep_batch.row_scales(rows, batch, 1.0, device=x.device)
            for hook in self._hooks:
                hook.scale = scales
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        sft_rows, dpo_rows = lockstep_batch.half_rows(rows, batch, device=x.device)
        out = None
        for index, half, run in ((sft_rows, slice(0, batch), executor),
                                 (dpo_rows, slice(batch, 2 * batch), comfy.apply_model(self.dpo))):
            def take(value, index=index, half=half):
                return _take(value, rows, index, 2 * batch, half)

            options = transformer_options if run is executor else comfy.without_wrapper(transformer_options,
                                                                                         WRAPPER_KEY)
            options = _take_options(options, rows, index, 2 * batch, half)
            result = run(take(x), take(t), take(c_concat), take(c_crossattn), take(control), options,
                         **{key: take(value) for key, value in kwargs.items()})
            if out is None:
                out = result.new_empty((rows, *result.shape[1:]))
            out[index] = result
        return out
