"""EVERY ComfyUI internal the HG-DPO node pack reaches into, and nothing else: the one place to fix when ComfyUI
changes. The other modules of ``nodes/`` use ComfyUI only through this module (and ``folder_paths``, ComfyUI's
documented model-folder interface for custom nodes).

Checked on ComfyUI 0.3.64 (commit a125cd8, Oct 2025), 0.28.0 (6665515, Jul 2026) and 0.33.0 (de6b062, Aug 2026).
What the pack uses, and for what:

* **Node API**: ``comfy_api.v0_0_2`` (``io``, ``ui``, ``ComfyExtension``); see the comment at the import.
* **Sampling chain** (``comfy.samplers``):

  - ``CFGGuider``, subclassed by :class:`HookedCFGGuider`: ``__init__(model_patcher)``, ``set_conds``,
    ``set_cfg``, ``model_patcher``, ``model_options``; ``sample(noise, latent_image, sampler, sigmas,
    denoise_mask, callback, disable_pbar, seed)`` (the public entry of SamplerCustomAdvanced and KSampler);
    ``inner_sample``, which ``outer_sample`` calls once the models are loaded. ``inner_sample`` is overridden
    with ``*args, **kwargs`` and ``sample`` passes extra keyword arguments on: 0.28 added ``latent_shapes`` to
    ``outer_sample``/``inner_sample`` (a fixed signature failed with a TypeError there), and 0.28 also packs
    nested latents in ``sample`` (SD1.5 and SDXL latents are plain tensors; a nested one is refused).
  - ``KSAMPLER(sampler_function, extra_options, inpaint_options)``, its three attributes and its calling
    convention ``sampler_function(model, x, sigmas, extra_args=, callback=, disable=, **extra_options)``;
    with ``inpaint_options["random"]`` it sets ``model.noise`` (``KSamplerX0Inpaint``) from ``seed + 1``.
  - samplers whose function lives in ``comfy.extra_samplers`` (uni_pc) rescale their latent before the
    model sees it, so LAN cannot reach their state.
  - ``KSampler(...).sigmas``, ``KSampler.SAMPLERS``/``SCHEDULERS``, ``sampler_object``; ``comfy.sample.
    fix_empty_latent_channels``/``prepare_noise``; ``latent_preview.prepare_callback``;
    ``comfy.utils.PROGRESS_BAR_ENABLED``/``repeat_to_batch_size``; ``comfy.model_management.
    intermediate_device``: what ``nodes.common_ksampler`` does, for the LAN KSampler.
* **Noise**: ``comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=, cpu=)`` and
  ``default_noise_sampler(x, seed=)``; which one a sampler builds when given none is read from its source
  (:func:`noise_default`), so that the single-chain draw equals the stock sampler's.
* **Models** (``comfy.model_patcher``): ``ModelPatcher.model`` (``model_config``, whose class name (or a base
  class's) ``SD15``/``SDXL`` of ``comfy.supported_models`` names the family, ``latent_format.
  latent_channels``, ``apply_model``, ``manual_cast_dtype``, its submodules), ``patches`` (key -> list of ``(strength, adapter,
  strength_model, offset, function)``, the tuples ``add_patches`` appends), ``clone``,
  ``set_additional_models``, ``is_dynamic`` (0.28+; absent in 0.3.64: not dynamic), ``create_model_options_clone``;
  ``comfy.weight_adapter.LoRAAdapter`` (``weights = (up, down, alpha, mid, dora_scale, reshape)``, ``name``).
* **Wrappers** (``comfy.patcher_extension``): ``add_wrapper_with_key(WrappersMP.APPLY_MODEL, ...)`` and the
  ``transformer_options["wrappers"]`` dict; the wrapped call is ``BaseModel._apply_model(x, t, c_concat,
  c_crossattn, control, transformer_options, **kwargs)`` (extra keyword arguments are passed on).
* **LoRA node**: ``comfy.lora.model_lora_keys_unet``, ``comfy.sd.load_lora_for_models``,
  ``comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)``.
* **PickScore**: ``comfy.model_management.get_torch_device``/``unet_offload_device``/``should_use_fp16``/
  ``load_models_gpu(..., force_full_load=True)``, and a plain ``ModelPatcher`` around the CLIP model.

**Dynamic VRAM** (0.28+, ``ModelPatcherDynamic`` with comfy-aimdo, on by default on GPUs; off under ``--cpu``,
where ``ModelPatcherDynamic`` falls back to ``ModelPatcher``): it leaves the large layers' weights on the
offload device and casts them (with the loading patcher's own patches, ``LowVramPatch``) inside each layer's
forward. The shared-weights fast path reads only ``ModelPatcher.patches`` (the same dict in both classes) and
adds the LoRA by forward hooks on the layers, after ComfyUI's cast forward, computing the LoRA term on the
device and dtype of the layer's input; the guider loads the SFT patcher, whose patches the dynamic loader
applies, and the HG-DPO LoRA's extra patches are never loaded. So the path needs no resident weights, and it
does not refuse layers that live on the offload device (lowvram or dynamic VRAM). This reading was not run on a
GPU (no GPU here): ``tests/test_comfyui_nodes.py`` on a CUDA ComfyUI 0.33 without ``--cpu`` checks it.

When an internal is missing, :func:`require` raises :class:`ComfyUIVersionError` before anything is loaded,
naming the ComfyUI version and what is missing (:func:`missing_internals` lists it).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import torch
from comfy.k_diffusion import sampling as k_sampling

# The numbered API, not comfy_api.latest: both load on every version tested (0.3.64 to 0.33.0), and there
# v0_0_2 re-exports latest's io/ui/ComfyExtension, so the nodes behave the same either way. But `latest` is
# marked STABLE = False (it may change in any release), while v0_0_2 is a listed supported version
# (comfy_api/version_list.py) that ComfyUI keeps importable when it adds newer ones.
from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401 - re-exported for the node modules

from hgdpo.models.families import SD15, SDXL, ModelFamily

logger = logging.getLogger(__name__)

TESTED_VERSIONS = "0.3.64 to 0.33.0"
APPLY_MODEL = "comfy.patcher_extension:WrappersMP.APPLY_MODEL"

# feature -> the internals it needs: "module:attribute.path", optionally with the keyword parameters it must take
INTERNALS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "LAN": (
        ("comfy.samplers:CFGGuider.sample", ("denoise_mask", "callback", "disable_pbar", "seed")),
        ("comfy.samplers:CFGGuider.inner_sample", ()),
        ("comfy.samplers:CFGGuider.outer_sample", ()),
        ("comfy.samplers:CFGGuider.set_conds", ()),
        ("comfy.samplers:CFGGuider.set_cfg", ()),
        ("comfy.samplers:KSAMPLER", ("sampler_function", "extra_options", "inpaint_options")),
        ("comfy.samplers:KSampler", ("steps", "device", "sampler", "scheduler", "denoise", "model_options")),
        ("comfy.samplers:KSampler.SAMPLERS", ()),
        ("comfy.samplers:KSampler.SCHEDULERS", ()),
        ("comfy.samplers:sampler_object", ()),
        ("comfy.sample:fix_empty_latent_channels", ()),
        ("comfy.sample:prepare_noise", ()),
        ("latent_preview:prepare_callback", ()),
        ("comfy.utils:repeat_to_batch_size", ()),
        ("comfy.model_management:intermediate_device", ()),
        ("comfy.model_patcher:create_model_options_clone", ()),
        ("comfy.model_patcher:ModelPatcher.add_patches", ()),
        ("comfy.model_patcher:ModelPatcher.set_additional_models", ()),
        ("comfy.patcher_extension:add_wrapper_with_key", ("is_model_options",)),
        (APPLY_MODEL, ()),
        ("comfy.weight_adapter:LoRAAdapter", ()),
        ("comfy.k_diffusion.sampling:BrownianTreeNoiseSampler", ("seed", "cpu")),
        ("comfy.k_diffusion.sampling:default_noise_sampler", ("seed",)),
    ),
    "LoRA": (
        ("comfy.lora:model_lora_keys_unet", ()),
        ("comfy.sd:load_lora_for_models", ()),
        ("comfy.utils:load_torch_file", ("safe_load", "return_metadata")),
    ),
    "PickScore": (
        ("comfy.model_management:get_torch_device", ()),
        ("comfy.model_management:unet_offload_device", ()),
        ("comfy.model_management:should_use_fp16", ()),
        ("comfy.model_management:load_models_gpu", ("force_full_load",)),
        ("comfy.model_patcher:ModelPatcher", ("load_device", "offload_device")),
    ),
}


class ComfyUIVersionError(RuntimeError):
    """This ComfyUI lacks an internal the pack needs; the message names the version and what is missing."""


# --------------------------------------------------------------------------- version and probe


def comfyui_version() -> str:
    """ComfyUI's ``comfyui_version.__version__`` (its root folder is on ``sys.path``), or "unknown"."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return "unknown"


def _resolve(path: str) -> Any:
    module_name, _, attributes = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for attribute in attributes.split("."):
        target = getattr(target, attribute)
    return target


def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` accepts the keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def missing_internals(feature: str | None = None) -> list[str]:
    """The internals of ``feature`` (all features when None) this ComfyUI lacks, e.g. ``comfy.sd.load_lora_for_models``
    or ``comfy.utils.load_torch_file(return_metadata=)``; empty when everything is there."""
    missing = []
    for name in INTERNALS if feature is None else (feature,):
        for path, parameters in INTERNALS[name]:
            shown = path.replace(":", ".")
            try:
                target = _resolve(path)
            except (ImportError, AttributeError):
                missing.append(shown)
                continue
            missing.extend(f"{shown}({parameter}=)" for parameter in parameters if not _takes(target, parameter))
    return missing


def require(feature: str) -> None:
    """Raise :class:`ComfyUIVersionError` (one line, before anything is loaded) when ``feature`` cannot run here."""
    missing = missing_internals(feature)
    if missing:
        raise ComfyUIVersionError(
            f"HG-DPO {feature} cannot run on ComfyUI {comfyui_version()}: it lacks {', '.join(missing)}. Update "
            f"ComfyUI (the pack is tested on {TESTED_VERSIONS}) or update the HG-DPO node pack."
        )


# --------------------------------------------------------------------------- models and their patches


def model_family(patcher) -> tuple[str, int]:
    """(model family, latent channels) of a ModelPatcher, e.g. ``("SD15", 4)``, ``("SDXL", 4)``."""
    model = patcher.model
    return type(model.model_config).__name__, int(model.latent_format.latent_channels)


# ComfyUI's model configs (comfy.supported_models) -> hgdpo's families. SDXL fine-tunes (Pony, Illustrious,
# NoobAI, v-prediction ones included) are detected as SDXL; subclasses (SSD1B, Segmind_Vega, KOALA,
# SD15_instructpix2pix ...) map to their base's family by their class hierarchy, and the LoRA node's fit check
# then names the modules they lack.
CORE_FAMILIES = {"SD15": SD15, "SDXL": SDXL}


def core_family(patcher) -> ModelFamily | None:
    """hgdpo's :class:`ModelFamily` of a ModelPatcher's model (SD15 or SDXL), or None for other architectures."""
    for kind in type(patcher.model.model_config).__mro__:
        if kind.__name__ in CORE_FAMILIES:
            return CORE_FAMILIES[kind.__name__]
    return None


def shares_weights(a, b) -> bool:
    """Whether two ModelPatchers patch the same model object (e.g. a LoRA node's output and its input)."""
    return a.model is b.model


def weight_patches(patcher) -> dict[str, list[tuple]]:
    """The weight patches of a ModelPatcher: key -> ``[(strength, adapter, strength_model, offset, function)]``."""
    return patcher.patches


def same_patch(a: tuple, b: tuple) -> bool:
    """The same patch entry (the same adapter object and the same numbers)."""
    return len(a) == len(b) and all(
        x is y or (isinstance(x, (int, float, type(None))) and x == y) for x, y in zip(a, b)
    )


def plain_lora(key: str, patch: tuple) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    """``(down, up * strength, alpha)`` of a plain LoRA patch on a ``.weight`` key; None for anything else
    (LoHa/LoKr/DoRA, offsets, functions, model strength)."""
    from comfy.weight_adapter import LoRAAdapter  # here, not at the top: missing_internals() must import on any version

    strength, adapter, strength_model, offset, function = patch
    if not (isinstance(adapter, LoRAAdapter) and key.endswith(".weight") and strength_model == 1.0
            and offset is None and function is None and all(v is None for v in adapter.weights[3:6])):
        return None
    up, down, alpha = adapter.weights[:3]
    return down, up * strength, None if alpha is None else float(alpha)


def patch_kind(patch: tuple) -> str:
    adapter = patch[1]
    return str(getattr(adapter, "name", type(adapter).__name__))


def with_additional_model(patcher, key: str, other):
    """A clone of ``patcher`` that ComfyUI loads together with ``other``."""
    clone = patcher.clone()
    clone.set_additional_models(key, [other])
    return clone


def is_dynamic(patcher) -> bool:
    """Whether ComfyUI loads this model with dynamic VRAM (0.33+, GPUs): weights stay offloaded, cast per layer."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def compute_dtype(patcher) -> torch.dtype | None:
    """The dtype the model computes in when it differs from its storage (``manual_cast_dtype``: fp8 weights...)."""
    return getattr(patcher.model, "manual_cast_dtype", None)


def submodules(patcher, paths) -> dict[str, torch.nn.Module]:
    """The layers of the loaded model by module path (``diffusion_model.input_blocks.1.1.proj_in``)."""
    return {path: patcher.model.get_submodule(path) for path in paths}


def apply_model(patcher) -> Callable:
    """The model's ``apply_model`` (the call the APPLY_MODEL wrappers wrap)."""
    return patcher.model.apply_model


# --------------------------------------------------------------------------- guider, wrappers, samplers


class HookedCFGGuider(getattr(comfy.samplers, "CFGGuider", object)):  # object: require("LAN") names what is missing
    """ComfyUI's CFGGuider with a hook that runs around ``inner_sample`` (the models are loaded then) and an
    APPLY_MODEL wrapper, both passing on every argument they do not use."""

    wrapper_key = "hgdpo"

    def __init__(self, model_patcher):
        super().__init__(model_patcher)
        self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                    self.wrapper_key, self.wrap_apply_model, self.model_options,
                                                    is_model_options=True)

    def inner_sample(self, *args, **kwargs):
        with self.models_loaded():
            return super().inner_sample(*args, **kwargs)

    def models_loaded(self):
        """A context manager entered while the sampler runs on the loaded models (override)."""
        return contextlib.nullcontext()

    def wrap_apply_model(self, executor, *args, **kwargs):
        """The APPLY_MODEL wrapper (override): ``executor(*args, **kwargs)`` runs the rest of the chain."""
        return executor(*args, **kwargs)


def is_nested(latent: torch.Tensor) -> bool:
    """A multi-part latent (``comfy.nested_tensor.NestedTensor``, 0.28+: video with audio...)."""
    return bool(getattr(latent, "is_nested", False))


def without_wrapper(transformer_options: dict, key: str) -> dict:
    """A copy of ``transformer_options`` without our APPLY_MODEL wrapper (for a second model's own call)."""
    options = dict(transformer_options)
    wrappers = {kind: dict(keyed) for kind, keyed in options.get("wrappers", {}).items()}
    wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).pop(key, None)
    options["wrappers"] = wrappers
    return options


def ksampler_parts(sampler) -> tuple[Callable, dict, dict] | None:
    """``(sampler_function, extra_options, inpaint_options)`` of a k-diffusion KSAMPLER; None for other SAMPLERs."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        return None
    return sampler.sampler_function, dict(sampler.extra_options), sampler.inpaint_options


def rescales_its_latent(function: Callable) -> bool:
    """Samplers of ``comfy.extra_samplers`` (uni_pc) hand the model a rescaled copy of their latent."""
    return getattr(function, "__module__", "").startswith("comfy.extra_samplers")


def ksampler(function: Callable, extra_options: dict, inpaint_options: dict):
    return comfy.samplers.KSAMPLER(function, extra_options, inpaint_options)


def noise_default(function: Callable) -> tuple[str, bool]:
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


def single_chain_noise(function: Callable, extra_options: dict) -> Callable | None:
    """For a sampler that takes a ``noise_sampler`` and was given none: ``make(x, sigmas, seed)``, building the
    noise sampler the stock sampler would build for ``x`` (one chain); None otherwise."""
    if not _takes(function, "noise_sampler") or extra_options.get("noise_sampler") is not None:
        return None
    kind, on_cpu = noise_default(function)

    def make(x: torch.Tensor, sigmas: torch.Tensor, seed):
        if kind == "brownian":
            positive = sigmas[sigmas > 0]
            return k_sampling.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed, cpu=on_cpu)
        return k_sampling.default_noise_sampler(x, seed=seed)

    return make


def random_inpaint_noise(model, like: torch.Tensor, seed) -> torch.Tensor | None:
    """The noise KSAMPLER.sample draws for ``inpaint_options["random"]``, for a batch shaped like ``like``;
    None when the sampler's model holds no such noise."""
    if getattr(model, "noise", None) is None:
        return None
    generator = torch.manual_seed((41 if seed is None else seed) + 1)
    return torch.randn(like.shape, generator=generator, device="cpu").to(like.dtype).to(like.device)


def set_inpaint_noise(model, noise: torch.Tensor) -> None:
    model.noise = noise


def repeat_to_batch_size(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return comfy.utils.repeat_to_batch_size(tensor, batch)


# --------------------------------------------------------------------------- the LAN KSampler's plumbing


def lan_sampler_names() -> list[str]:
    """ComfyUI's sampler names that LAN can drive: k-diffusion KSAMPLERs that hand the model their own latent
    (detected per sampler, so a sampler ComfyUI adds later is offered or left out by what it is)."""
    if missing_internals("LAN"):  # the node still registers; running it says what is missing
        return []
    names = []
    for name in comfy.samplers.KSampler.SAMPLERS:
        parts = ksampler_parts(comfy.samplers.sampler_object(name))
        if parts is not None and not rescales_its_latent(parts[0]):
            names.append(name)
    return names


def scheduler_names() -> list[str]:
    return list(getattr(getattr(comfy.samplers, "KSampler", None), "SCHEDULERS", []))


def ksampler_inputs(patcher, latent_image: dict, seed: int, steps: int, sampler_name: str, scheduler: str,
                    denoise: float) -> dict:
    """What ``nodes.common_ksampler`` prepares for a guider's ``sample``: latent, noise, sigmas, sampler,
    callback (previews, progress) and the keyword arguments, for ``patcher``."""
    import comfy.sample
    import latent_preview

    latent = comfy.sample.fix_empty_latent_channels(patcher, latent_image["samples"])
    sigmas = comfy.samplers.KSampler(patcher, steps=steps, device=patcher.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=patcher.model_options).sigmas
    return {
        "noise": comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index")),
        "latent_image": latent,
        "sampler": comfy.samplers.sampler_object(sampler_name),
        "sigmas": sigmas,
        "denoise_mask": latent_image.get("noise_mask"),
        "callback": latent_preview.prepare_callback(patcher, steps),
        "disable_pbar": not comfy.utils.PROGRESS_BAR_ENABLED,
        "seed": seed,
    }


def intermediate_device() -> torch.device:
    return comfy.model_management.intermediate_device()


# --------------------------------------------------------------------------- LoRA node


def unet_lora_keys(patcher) -> dict[str, str]:
    """ComfyUI's kohya/diffusers LoRA name -> model weight key map of the model's UNet."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(patcher.model, {})


def model_weights(patcher) -> dict[str, torch.Tensor]:
    return patcher.model.state_dict()


def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a ``.safetensors`` file, through ComfyUI's loader (no pickle)."""
    state_dict, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    return state_dict, metadata or {}


def apply_lora(model, clip, state_dict: dict, strength: float):
    """ComfyUI's own LoRA loading (weight patches on clones): ``(model, clip)``."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, state_dict, strength, strength)


# --------------------------------------------------------------------------- PickScore


def scorer_devices() -> tuple[torch.device, torch.device, bool]:
    """(load device, offload device, whether ComfyUI runs models in fp16 there)."""
    load_device = comfy.model_management.get_torch_device()
    return load_device, comfy.model_management.unet_offload_device(), comfy.model_management.should_use_fp16(
        load_device)


def managed_model(module: torch.nn.Module, load_device, offload_device):
    """A (non-dynamic) ModelPatcher, so that ComfyUI's model management loads and offloads ``module``."""
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def load_fully(patcher) -> None:
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
