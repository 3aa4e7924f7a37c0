"""The LAN samplers of the WebUI sampler dropdown ("DPM++ 2M (HG-DPO LAN)", ...). Imports ``modules.*``.

Registration: for each sampler of :data:`extension.settings.LAN_BASE_SAMPLERS` that the WebUI has, a
``SamplerData`` named ``"<base> (HG-DPO LAN)"`` (same k-diffusion function, same options, so the same
default scheduler) is appended to ``sd_samplers.all_samplers``; ``set_samplers()`` then puts it in the
txt2img/img2img/hires dropdowns, ``/sdapi/v1/samplers``, the X/Y/Z "Sampler" axis and the name lookup
of the API and of pasted infotexts.

Sampling (:class:`LANSampler`, a ``KDiffusionSampler``): the k-diffusion function runs on the lockstep
batch ``[x; x]`` (:mod:`hgdpo.inference.lockstep_batch`, :mod:`extension.webui_lockstep`), the SFT and the DPO
chain from the same noise. :class:`LockstepCFGDenoiser`, a ``CFGDenoiserKDiffusion``, gets that batch once per step, renormalises
the DPO half in place (LAN) and runs the WebUI's own ``CFGDenoiser.forward`` once, as if on 2B images
with the conditionings given to both halves: CFG's conditional and unconditional chunks each stack both
chains, so each step is **one UNet call**, and a UNet pre-hook sets the HG-DPO LoRA's scale per row (0 on
SFT rows, the slider's weight on DPO rows). The LoRA is functional (forward hooks on the UNet's layers,
:class:`hgdpo.models.lora_runtime.FollowingLoRA`), attached once per generation: the weights are never merged
or re-patched, and other LoRAs of the prompt apply to both chains. Prompts composed with AND repeat rows
per image; for them the denoiser makes two calls per step instead (the SFT half at scale 0, then the DPO
half at the weight), rewinding ``CFGDenoiser.step`` in between. Either way the step counter, prompt
editing, NGMS and the progress bar see one step per sampler step, and the live preview and the latent
returned on interrupt show the DPO chain. Text-encoder weights of the LoRA (if any) go into a second set
of conditionings used by the DPO chain only (:mod:`extension.text_encoder_lora`).

SD1.x and SDXL alike: SDXL's conditionings are dicts (``crossattn``, ``vector``) where SD1.x has tensors; both
paths hand the WebUI's own conditioning objects (per-image schedules) to its CFG code, which stacks either
kind, so both chains carry the full SDXL conditioning (pooled bigG and size embedding included).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import k_diffusion.sampling
import torch
from modules import prompt_parser, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, shared

from hgdpo.inference.lockstep_batch import row_scales
from hgdpo.models.families import SDXL, ModelFamily
from hgdpo.models.ldm_names import ldm_unet_kohya_names
from hgdpo.models.lora_runtime import FollowingLoRA, LoRAArchitectureError, LoRAFile

from . import lora_files, text_encoder_lora, webui_lockstep
from . import settings as hs
from . import webui_backend as backend

SETTINGS_ATTRIBUTE = "hgdpo_settings"
"""Attribute of the processing object where the HG-DPO script leaves the generation's settings."""
DEFAULT_LORA_OPTION = "hgdpo_default_lora"


class HGDPOError(RuntimeError):
    """A problem the user can fix; its message is shown as is in the UI and in the API's error body."""


def default_lora() -> str:
    return str(shared.opts.data.get(DEFAULT_LORA_OPTION, "") or "")


def generation_settings(p) -> hs.Settings:
    """The settings the HG-DPO script resolved for ``p``, or the defaults (Settings > HG-DPO)."""
    settings = getattr(p, SETTINGS_ATTRIBUTE, None)
    if settings is None:
        settings = hs.check(hs.Settings(lora=default_lora()))
    if not settings.has_lora and default_lora():
        settings = replace(settings, lora=default_lora())
    return settings


def resolve_lora(settings: hs.Settings, family: ModelFamily) -> tuple[lora_files.LoRAEntry, LoRAFile]:
    """The chosen LoRA file and its contents for a model of ``family``, or HGDPOError with a message naming the
    folder or the problem (a LoRA of the other family included)."""
    try:
        entry = lora_files.resolve(settings.lora if settings.has_lora else "", backend.lora_folder())
        return entry, lora_files.load(entry.path, family)
    except (FileNotFoundError, LoRAArchitectureError, ValueError) as error:
        raise HGDPOError(str(error)) from error


def check_model(sd_model) -> ModelFamily:
    """The family of the loaded model, or HGDPOError when the LAN samplers cannot run on it."""
    problem = backend.model_family_problem(sd_model)
    if problem:
        raise HGDPOError(problem)
    return backend.model_family(sd_model)


def unet_layers(family: ModelFamily, root) -> dict:
    """The WebUI's LDM UNet's layers by the kohya names a LoRA of ``family`` may use: SD1.x's diffusers-derived
    names; for SDXL its SGM paths (kohya's SDXL names) and the diffusers-derived ones (peft/diffusers files)."""
    layers = ldm_unet_kohya_names(root)
    if family is SDXL:
        layers.update(family.ldm_unet_kohya_modules(root))
    return layers


_COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")
_COND_STATE = ("c", "uc", "hr_c", "hr_uc", "step_multiplier", "firstpass_steps", *_COND_CACHES)


def _fresh_conditioning(p):
    """``p``'s conditionings for the current pass computed again (hooks may be active), ``p`` left as it was.

    Runs the WebUI's own ``p.setup_conds()`` (so prompt editing, AND, hires and Forge's variants are
    exactly the WebUI's) with private caches, then puts every attribute it touched back.
    """
    saved = {name: getattr(p, name) for name in _COND_STATE if hasattr(p, name)}
    saved_params = dict(p.extra_generation_params)
    try:
        for name in _COND_CACHES:
            if name in saved:
                setattr(p, name, [None, None])
        p.setup_conds()
        return p.get_conds()
    finally:
        for name, value in saved.items():
            setattr(p, name, value)
        p.extra_generation_params.clear()
        p.extra_generation_params.update(saved_params)


class _Session:
    """One LAN generation (one ``sample``/``sample_img2img`` call): the hooked LoRA and the settings."""

    def __init__(self, p, batch: int, settings: hs.Settings, entry: lora_files.LoRAEntry, lora: LoRAFile):
        sd_model = shared.sd_model
        family = check_model(sd_model)
        self.batch = batch
        self.weight = settings.weight
        self.strength = settings.lan_strength
        label = f"HG-DPO LoRA {entry.name!r}"
        root = backend.unet(sd_model)
        self.cond = self.uncond = None
        self.unet_lora = FollowingLoRA(unet_layers(family, root), lora.unet, 0.0, label,
                                       compute_dtype=backend.unet_compute_dtype(sd_model))
        self.per_row = False
        self._row_scales: dict[tuple, torch.Tensor] = {}
        self._row_guard = root.register_forward_pre_hook(self._set_row_scales)
        try:
            if lora.text_encoder:
                self.cond, self.uncond = self._dpo_conditioning(p, sd_model, lora, label)
        except BaseException:
            self.close()
            raise

    def _set_row_scales(self, _module, inputs) -> None:
        """UNet pre-hook of the batched path: the LoRA scale of each row of this UNet call (SFT 0, DPO w)."""
        if not self.per_row or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0]
        key = (x.shape[0], x.device, x.dtype)
        if key not in self._row_scales:
            try:
                self._row_scales[key] = row_scales(x.shape[0], self.batch, self.weight, x.device, x.dtype)
            except ValueError as error:
                raise HGDPOError(f"The UNet got {x.shape[0]} rows, not whole SFT/DPO lockstep batches of "
                                 f"{2 * self.batch}; another extension changed the batch? ({error})") from error
        self.unet_lora.scale = self._row_scales[key]

    def _dpo_conditioning(self, p, sd_model, lora: LoRAFile, label: str):
        """The conditionings of the DPO chain: the WebUI's, computed with the LoRA's text-encoder part active."""
        encoders, parts = backend.text_encoders(sd_model), lora.text_encoders
        missing = [slot.subfolder for slot, encoder, part in zip(lora.family.text_encoders, encoders, parts)
                   if part and encoder is None]
        if missing:
            raise HGDPOError(f"{label} has weights for the text encoder(s) {missing}, which were not found in the "
                             "loaded checkpoint.")
        backend.prepare_text_encoder(sd_model)
        with text_encoder_lora.applied(encoders, parts, self.weight, label):
            return _fresh_conditioning(p)

    def close(self) -> None:
        self._row_guard.remove()
        self.unet_lora.remove()


def _uses_and(cond) -> bool:
    """Whether a prompt of the batch is composed with AND (several conditionings per image)."""
    return any(len(entry) > 1 for entry in getattr(cond, "batch", ()))


def _paired_cond(cond, dpo):
    """The multi-conditioning of the lockstep batch: the SFT images' entries, then the DPO images'."""
    other = cond if dpo is None else dpo
    return prompt_parser.MulticondLearnedConditioning(shape=(len(cond.batch) * 2,), batch=[*cond.batch, *other.batch])


def _paired_uncond(uncond, dpo, batch: int):
    """The unconditional schedules of the lockstep batch: the SFT images', then the DPO images'."""
    if isinstance(uncond, list):
        return uncond + (uncond if dpo is None else dpo)
    return _paired_rows(uncond, batch)


def _paired_rows(value, batch: int):
    """A per-image tensor (image conditioning, masks) given to both chains; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return webui_lockstep.paired(value)
    return value


class LockstepCFGDenoiser(sd_samplers_kdiffusion.CFGDenoiserKDiffusion):
    """CFG denoiser of a LAN sampler: one lockstep step = LAN + the WebUI's CFG on both chains.

    Fast path: the WebUI's ``CFGDenoiser.forward`` runs once on the lockstep batch as if it held 2B images
    (the conditionings given to both halves), so each step is one UNet call on ``[SFT; DPO]`` rows (CFG's
    conditional and unconditional chunks each stack both chains) with the LoRA's scale set per row by a
    UNet pre-hook: 0 on SFT rows, the weight on DPO rows (:func:`hgdpo.inference.lockstep_batch.row_scales`). Prompts
    composed with AND repeat rows per image, so that layout is left to the second path: two calls, the SFT
    half with the scale at 0, then the DPO half at the weight.
    """

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        session: _Session | None = getattr(self.sampler, "session", None)
        if session is None or x.shape[0] != 2 * session.batch:
            raise HGDPOError("The HG-DPO LAN denoiser was called outside a LAN generation (an extension calling "
                             "the sampler directly?); use a sampler without '(HG-DPO LAN)'.")
        if _uses_and(cond):
            return self._forward_halves(session, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        return self._forward_batched(session, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

    def _forward_batched(self, session, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        batch = session.batch
        webui_lockstep.normalize_in_place(x, batch, session.strength)
        saved = {name: getattr(self, name) for name in ("mask", "nmask")}
        for name, value in saved.items():
            setattr(self, name, _paired_rows(value, batch))
        session.per_row = True
        try:
            denoised = super().forward(x, sigma, _paired_uncond(uncond, session.uncond, batch),
                                       _paired_cond(cond, session.cond), cond_scale,
                                       s_min_uncond, _paired_rows(image_cond, batch))
        finally:
            session.per_row = False
            session.unet_lora.scale = 0.0
            for name, value in saved.items():
                setattr(self, name, value)
        # what the WebUI keeps from this call (live preview, the latent returned on interrupt): the DPO chain
        last = getattr(self.sampler, "last_latent", None)
        if isinstance(last, torch.Tensor) and last.shape[0] == 2 * batch:
            self.sampler.last_latent = last[batch:]
        current = shared.state.current_latent
        if isinstance(current, torch.Tensor) and current.shape[0] == 2 * batch:
            sd_samplers_common.store_latent(current[batch:])
        return denoised

    def _forward_halves(self, session, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        batch, step, init_latent = session.batch, self.step, self.init_latent
        parent = super()

        def model(x_half, sigma_half, dpo: bool):
            self.step = step  # one step per lockstep call, whichever half runs
            session.unet_lora.scale = session.weight if dpo else 0.0
            half_cond = session.cond if dpo and session.cond is not None else cond
            half_uncond = session.uncond if dpo and session.cond is not None else uncond
            return parent.forward(x_half, sigma_half, half_uncond, half_cond, cond_scale, s_min_uncond, image_cond)

        if init_latent is not None and init_latent.shape[0] == 2 * batch:
            self.init_latent = init_latent[:batch]  # img2img: masks and blending see one chain
        try:
            return webui_lockstep.evaluate(x, sigma, batch, session.strength, model)
        finally:
            session.unet_lora.scale = 0.0
            self.init_latent = init_latent


class LANSampler(sd_samplers_kdiffusion.KDiffusionSampler):
    """A k-diffusion sampler running the SFT and the DPO chain in lockstep with LAN."""

    def __init__(self, funcname, sd_model):
        check_model(sd_model)
        super().__init__(funcname, sd_model)
        self.model_wrap_cfg = LockstepCFGDenoiser(self)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.session: _Session | None = None

    def initialize(self, p) -> dict:
        extra_params = super().initialize(p)
        # ancestral samplers draw noise through k_diffusion.sampling.torch.randn_like: same noise for both chains
        k_diffusion.sampling.torch = webui_lockstep.PairedRandn(p.rng.next, k_diffusion.sampling.torch)
        return extra_params

    def create_noise_sampler(self, x, sigmas, p):
        half = x[: x.shape[0] // 2]
        inner = super().create_noise_sampler(half, sigmas, p)
        if inner is None:  # the WebUI's "no batch determinism" option: an unseeded tree, shared by both chains
            sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
            inner = k_diffusion.sampling.BrownianTreeNoiseSampler(half, sigma_min, sigma_max)
        return webui_lockstep.PairedNoiseSampler(inner)

    @contextmanager
    def _lockstep(self, p, batch: int) -> Iterator[_Session]:
        settings = generation_settings(p)
        entry, lora = resolve_lora(settings, check_model(shared.sd_model))
        self.session = _Session(p, batch, settings, entry, lora)
        try:
            yield self.session
        finally:
            self.session.close()
            self.session = None

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        batch = x.shape[0]
        with self._lockstep(p, batch) as session:
            samples = super().sample(p, webui_lockstep.paired(x), conditioning, unconditional_conditioning, steps=steps,
                                     image_conditioning=image_conditioning)
            return webui_lockstep.dpo_result(samples, batch, session.strength)

    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        batch = x.shape[0]
        with self._lockstep(p, batch) as session:
            samples = super().sample_img2img(
                p,
                webui_lockstep.paired(x),
                webui_lockstep.paired(noise),
                conditioning,
                unconditional_conditioning,
                steps=steps,
                image_conditioning=image_conditioning,
            )
            return webui_lockstep.dpo_result(samples, batch, session.strength)


def _constructor(funcname):
    return lambda model: LANSampler(funcname, model)


def register() -> list[str]:
    """Add the LAN samplers to the WebUI's sampler lists (idempotent); returns the names present."""
    functions = {label: funcname for label, funcname, *_ in sd_samplers_kdiffusion.samplers_k_diffusion}
    added, present = [], []
    for base in hs.LAN_BASE_SAMPLERS:
        data = sd_samplers.all_samplers_map.get(base)
        funcname = functions.get(base)
        if data is None or funcname is None or not (callable(funcname) or hasattr(k_diffusion.sampling, funcname)):
            continue
        name = hs.lan_sampler_name(base)
        present.append(name)
        if name in sd_samplers.all_samplers_map:
            continue
        options = {**dict(data.options), "hgdpo_lan": True}
        aliases = [f"{alias}_hgdpo_lan" for alias in data.aliases]
        sampler = sd_samplers_common.SamplerData(name, _constructor(funcname), aliases, options)
        sd_samplers.all_samplers.append(sampler)
        sd_samplers.all_samplers_map[name] = sampler
        added.append(name)
    if added:
        sd_samplers.set_samplers()
        cache_clear = getattr(sd_samplers.get_sampler_and_scheduler, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
    return present
