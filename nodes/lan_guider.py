"""LAN lockstep sampling on ComfyUI's own samplers: a GUIDER that samples ``[SFT; DPO]`` in one batch.

:class:`LANGuider` is a ``comfy.samplers.CFGGuider``, so ``SamplerCustomAdvanced`` and the LAN KSampler
drive it like any guider (previews, progress bar, interrupt, img2img, masks). Its ``sample``

1. doubles noise and latent into the lockstep batch ``[sft; dpo]`` (:mod:`hgdpo.lockstep`),
2. runs the given SAMPLER on it, wrapped by :func:`lockstep_sampler`: the sampler's history is then
   per row (per chain), its noise sampler draws for one chain and repeats the draw, and its denoiser
   renormalises the DPO half in place before every evaluation (LAN after every step) and once at the end,
3. evaluates the model once per step on all rows through ComfyUI's own CFG code. An ``apply_model``
   wrapper routes the rows:

   * **shared weights** (the DPO model is the SFT model plus weight patches, e.g. ``HG-DPO LoRA`` on the
     same checkpoint loader): ComfyUI loads only the SFT variant; the LoRA patches the DPO adds are
     applied functionally (:class:`hgdpo.lora_runtime.FunctionalLoRA` forward hooks) with a per-row
     scale, 0 on SFT rows and 1 on DPO rows: one batched forward, one copy of the weights, no
     re-patching;
   * **two checkpoints**: both models are loaded together (the DPO one as an additional model of the
     guider) and each gets its rows (both with the SFT ModelPatcher's model options: its patches and
     wrappers);
4. returns the DPO half; the callback (previews, ``denoised_output``) sees the DPO half too.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import torch
from comfy.k_diffusion import sampling as k_sampling
from comfy.weight_adapter import LoRAAdapter

from hgdpo import lockstep
from hgdpo.lora_runtime import FunctionalLoRA, LoRAModule

logger = logging.getLogger(__name__)

WRAPPER_KEY = "hgdpo_lan"
UNSUPPORTED_SAMPLERS = ("uni_pc", "uni_pc_bh2")
"""ComfyUI samplers that evaluate the model on a rescaled copy of their latent, so LAN cannot reach their state."""


class LANError(ValueError):
    """Inputs that LAN sampling cannot use; the message is shown in ComfyUI's UI."""


# --------------------------------------------------------------------------- models


def family(patcher) -> tuple[str, int]:
    """(model family, latent channels) of a ModelPatcher, e.g. ``("SD15", 4)``."""
    model = patcher.model
    return type(model.model_config).__name__, int(model.latent_format.latent_channels)


def check_pair(dpo, sft) -> None:
    """Refuse SFT and DPO models of different families or latent spaces."""
    dpo_family, sft_family = family(dpo), family(sft)
    if dpo_family != sft_family:
        raise LANError(
            "LAN needs the SFT and the DPO model to share a latent space (the same model family): the DPO model "
            f"('model') is {dpo_family[0]} with {dpo_family[1]} latent channels, the SFT model ('sft_model') is "
            f"{sft_family[0]} with {sft_family[1]}. Connect the checkpoint the HG-DPO LoRA was trained on as "
            "sft_model."
        )


def _same_patch(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x is y or (isinstance(x, (int, float, type(None))) and x == y) for x, y in zip(a, b)
    )


def lora_layers(dpo, sft) -> list[dict[str, LoRAModule]] | None:
    """The LoRA patches the DPO ModelPatcher adds on top of the SFT's, keyed by module path; None for two models.

    Each list entry holds one LoRA layer (the first patch every key adds, then the second...), so stacked
    LoRAs become stacked :class:`FunctionalLoRA` s. ``strength`` is folded into the up weights.
    """
    if dpo.model is not sft.model:
        return None
    missing = [key for key in sft.patches if key not in dpo.patches]
    if missing:
        raise LANError(
            f"The SFT model has weight patches the DPO model lacks (e.g. {missing[0]}): the DPO model must be the "
            "SFT model plus the HG-DPO LoRA. Apply other LoRAs before the HG-DPO LoRA node, to both models."
        )
    layers: list[dict[str, LoRAModule]] = []
    for key, patches in dpo.patches.items():
        base = sft.patches.get(key, [])
        if len(patches) < len(base) or not all(_same_patch(a, b) for a, b in zip(patches, base)):
            raise LANError(
                f"The DPO model's patches on {key} do not extend the SFT model's: the DPO model must be the SFT "
                "model plus the HG-DPO LoRA (apply other LoRAs before it, to both models)."
            )
        for depth, (strength, adapter, strength_model, offset, function) in enumerate(patches[len(base):]):
            plain = (isinstance(adapter, LoRAAdapter) and key.endswith(".weight") and strength_model == 1.0
                     and offset is None and function is None and all(v is None for v in adapter.weights[3:6]))
            if not plain:
                kind = getattr(adapter, "name", type(adapter).__name__)
                raise LANError(
                    f"LAN's shared-weights path applies plain LoRA patches only; the DPO model has a {kind!r} patch "
                    f"on {key}. Load the DPO model as its own checkpoint instead."
                )
            up, down, alpha = adapter.weights[:3]
            while len(layers) <= depth:
                layers.append({})
            layers[depth][key[: -len(".weight")]] = LoRAModule(down=down, up=up * strength,
                                                               alpha=None if alpha is None else float(alpha))
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


def _without_own_wrapper(transformer_options: dict) -> dict:
    options = dict(transformer_options)
    wrappers = {kind: dict(keyed) for kind, keyed in options.get("wrappers", {}).items()}
    wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).pop(WRAPPER_KEY, None)
    options["wrappers"] = wrappers
    return options


_FP8 = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, name)}


def _check_placement(modules: dict, device) -> None:
    """The functional LoRA runs in the layers' own device and dtype: refuse fp8 storage and offloaded layers."""
    device = torch.device(device)
    for path, module in modules.items():
        weight = module.weight
        if weight.dtype in _FP8 or weight.device.type != device.type:
            raise LANError(
                f"LAN's shared-weights path adds the HG-DPO LoRA to the layers as they are stored, but {path} is "
                f"{weight.dtype} on {weight.device} (ComfyUI stored the model in fp8 or loaded it only partly, "
                "lowvram). Load the model in fp16/bf16/fp32 with enough free memory, or load the DPO model as its "
                "own checkpoint."
            )


# --------------------------------------------------------------------------- sampler


def _noise_default(function: Callable) -> tuple[str, bool]:
    """The noise sampler a k-diffusion sampler builds when given none: ``("brownian", cpu)`` or ``("default", _)``.

    Read from the source of the function and of the functions it delegates to (``sample_dpmpp_2m_sde_heun``
    calls ``sample_dpmpp_2m_sde``), so that the single-chain draw equals what the stock sampler draws.
    """
    todo, seen = [function], set()
    while todo:
        current = inspect.unwrap(todo.pop())
        if current in seen:
            continue
        seen.add(current)
        try:
            source = inspect.getsource(current)
        except (OSError, TypeError):
            continue
        if "BrownianTreeNoiseSampler(" in source:
            return "brownian", "cpu=False" not in source
        if "default_noise_sampler(" in source:
            return "default", True
        scopes = [getattr(current, "__globals__", {}), vars(k_sampling)]
        for name in re.findall(r"\b([A-Za-z_]\w*)\(", source):
            for scope in scopes:
                candidate = scope.get(name)
                if inspect.isfunction(candidate):
                    todo.append(candidate)
                    break
    return "default", True


def _takes(function: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def lockstep_sampler(sampler, batch: int, strength: float):
    """A KSAMPLER that runs ``sampler`` on the lockstep batch of ``batch`` rows per chain, with LAN."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise LANError(
            f"LAN sampling runs ComfyUI's k-diffusion samplers (KSamplerSelect, the Sampler* nodes); got a "
            f"{type(sampler).__name__}."
        )
    function = sampler.sampler_function
    if getattr(function, "__module__", "").startswith("comfy.extra_samplers"):
        raise LANError(
            f"The sampler {getattr(function, '__name__', function)} is not supported by LAN: it evaluates the model "
            "on a rescaled copy of its latent, so LAN cannot renormalise its state after each step. Use euler, "
            "euler_ancestral, dpmpp_2m, dpmpp_2m_sde, ddim or another k-diffusion sampler."
        )
    inner_options = dict(sampler.extra_options)
    wants_noise = _takes(function, "noise_sampler") and inner_options.get("noise_sampler") is None
    noise_kind, noise_on_cpu = _noise_default(function)
    random_inpaint = sampler.inpaint_options.get("random", False)

    def lockstep_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        seed = extra_args.get("seed")
        if random_inpaint and getattr(model, "noise", None) is not None:  # as KSAMPLER.sample draws it, per chain
            generator = torch.manual_seed(extra_args.get("seed", 41) + 1)
            single = torch.randn(x[:batch].shape, generator=generator, device="cpu")
            model.noise = lockstep.paired(single.to(x.dtype).to(x.device))
        if wants_noise and options.get("noise_sampler") is None and len(sigmas) > 1:
            if noise_kind == "brownian":
                positive = sigmas[sigmas > 0]
                single = k_sampling.BrownianTreeNoiseSampler(x[:batch], positive.min(), sigmas.max(), seed=seed,
                                                             cpu=noise_on_cpu)
            else:
                single = k_sampling.default_noise_sampler(x[:batch], seed=seed)
            options["noise_sampler"] = lockstep.PairedNoiseSampler(single)
        denoiser = lockstep.LANDenoiser(model, batch, strength)
        samples = function(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
        if samples.shape[0] != 2 * batch:  # not the lockstep batch (should not happen): leave it alone
            return samples
        return lockstep.finish(samples, batch, strength)

    lockstep_function.__name__ = f"lan_{getattr(function, '__name__', 'sampler')}"
    return comfy.samplers.KSAMPLER(lockstep_function, inner_options, sampler.inpaint_options)


# --------------------------------------------------------------------------- guider


class LANGuider(comfy.samplers.CFGGuider):
    """CFG guidance of the lockstep batch: SFT rows by the SFT model, DPO rows by the DPO model, LAN between steps.

    ``model_patcher`` is the SFT model (its latent format drives previews and empty-latent channels). After
    ``sample``, ``sft_samples`` holds the SFT chain's result (the same batch of the stock sampler).
    """

    def __init__(self, dpo, sft, strength: float = 1.0):
        check_pair(dpo, sft)
        if not 0.0 <= strength <= 1.0:
            raise LANError(f"LAN strength must lie in [0, 1], got {strength}.")
        self.layers = lora_layers(dpo, sft)
        if self.layers is None:
            sft = sft.clone()  # the DPO checkpoint is loaded together with it, as an additional model
            sft.set_additional_models(WRAPPER_KEY, [dpo])
        elif not self.layers:
            logger.info("LAN: the DPO model is the SFT model (no LoRA patches on top): LAN changes nothing.")
        super().__init__(sft)
        self.dpo = dpo
        self.strength = float(strength)
        self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                                    self._apply_model, self.model_options, is_model_options=True)
        self.batch = 0
        self._hooks: list[FunctionalLoRA] = []
        self.sft_samples: torch.Tensor | None = None

    @property
    def shared_weights(self) -> bool:
        return self.layers is not None

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        self.batch = batch = noise.shape[0]
        if latent_image.shape[0] != batch:
            latent_image = comfy.utils.repeat_to_batch_size(latent_image, batch)
        wrapped = lockstep_sampler(sampler, batch, self.strength)

        def dpo_callback(step, x0, x, total_steps):
            if x0 is not None and x0.shape[0] == 2 * batch:
                x0, x = x0[batch:], x[batch:]
            return callback(step, x0, x, total_steps)

        samples = super().sample(lockstep.paired(noise), lockstep.paired(latent_image), wrapped, sigmas,
                                 denoise_mask=denoise_mask, callback=None if callback is None else dpo_callback,
                                 disable_pbar=disable_pbar, seed=seed)
        if samples.shape[0] != 2 * batch:  # no steps to take: ComfyUI hands the latent back
            self.sft_samples = samples
            return samples
        self.sft_samples = samples[:batch]
        return samples[batch:]

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        # The models are loaded now: hook the LoRA layers onto the (shared) weights where they live.
        model = self.model_patcher.model
        try:
            for number, layer in enumerate(self.layers or []):
                modules = {path: model.get_submodule(path) for path in layer}
                _check_placement(modules, device)
                self._hooks.append(FunctionalLoRA(modules, layer, 0.0, label=f"HG-DPO LoRA patch {number + 1}"))
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed)
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                     **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        rows, batch = x.shape[0], self.batch
        if batch == 0 or rows % (2 * batch):
            raise LANError(f"LAN: the model was called on {rows} rows, not on lockstep batches of {2 * batch}.")
        if self.shared_weights:
            scales = lockstep.row_scales(rows, batch, 1.0, device=x.device)
            for hook in self._hooks:
                hook.scale = scales
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        sft_rows, dpo_rows = lockstep.half_rows(rows, batch, device=x.device)
        out = None
        for index, half, run in ((sft_rows, slice(0, batch), executor),
                                 (dpo_rows, slice(batch, 2 * batch), self.dpo.model.apply_model)):
            def take(value, index=index, half=half):
                return _take(value, rows, index, 2 * batch, half)

            options = transformer_options if run is executor else _without_own_wrapper(transformer_options)
            options = _take_options(options, rows, index, 2 * batch, half)
            result = run(take(x), take(t), take(c_concat), take(c_crossattn), take(control), options,
                         **{key: take(value) for key, value in kwargs.items()})
            if out is None:
                out = result.new_empty((rows, *result.shape[1:]))
            out[index] = result
        return out
