"""Where the WebUI keeps what LAN needs, in AUTOMATIC1111 1.10 and in Forge. Imports ``modules.*``.

=================  =========================================  =====================================================
                   AUTOMATIC1111 1.10                          Forge (backend/, 2024+)
=================  =========================================  =====================================================
UNet (LDM names)   ``sd_model.model.diffusion_model``           ``sd_model.forge_objects.unet.model.diffusion_model``
CLIP text model    ``sd_model.cond_stage_model.wrapped``        ``sd_model.forge_objects.clip.cond_stage_model``
                   ``.transformer``                             ``.clip_l.transformer``
SDXL CLIP-L        ``sd_model.conditioner.embedders[0]``        ``...cond_stage_model.clip_l.transformer``
                   ``.wrapped.transformer``
SDXL OpenCLIP      ``sd_model.conditioner.embedders[1]``        ``...cond_stage_model.clip_g.transformer``
bigG               ``.wrapped.model`` (OpenCLIP names)          (a transformers ``CLIPTextModel``)
Model family       ``is_sd1/is_sd2/is_sdxl/is_sd3`` (+``is_ssd``) the same flags on the engine (Flux has none set)
Lora folder        ``cmd_opts.lora_dir``                        ``cmd_opts.lora_dir``
API auth           the ``dependencies`` of its ``/sdapi/v1/txt2img`` route (``Api.auth`` under ``--api-auth``), in both
=================  =========================================  =====================================================

Forge Neo (Haoming02's ``neo`` branch of sd-webui-forge-classic) has Forge's layout in every row above; it is
told apart only for the name it reports (``modules_forge.forge_version``).

Both run the k-diffusion samplers through ``KDiffusionSampler`` and ``CFGDenoiser.forward(x, sigma, uncond,
cond, cond_scale, s_min_uncond, image_cond)``, which is what the LAN samplers subclass.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from modules import paths, shared
from torch import nn

from hgdpo.models.families import SDXL, ModelFamily

from . import best_of, settings, text_encoder_lora

IS_FORGE = importlib.util.find_spec("modules_forge") is not None
API_ROUTE = "/sdapi/v1/txt2img"
"""A route the WebUI's own ``Api`` class mounts (through ``Api.add_api_route``, with ``--api-auth``'s check)."""


def _name() -> str:
    if not IS_FORGE:
        return "AUTOMATIC1111"
    try:
        from modules_forge import forge_version
    except ImportError:
        return "Forge"
    return "Forge Neo" if str(getattr(forge_version, "version", "")).startswith("neo") else "Forge"


NAME = _name()


def api_dependencies(app) -> list | None:
    """The dependencies of the WebUI's own API routes on ``app`` (its ``--api-auth`` check), or None when the
    WebUI's API is not mounted there (started without ``--api``).

    An extension route given these is refused or allowed exactly like ``/sdapi/v1/txt2img``. With
    ``--api-auth`` set and no dependency found, ``RuntimeError``: better no route than an open one.
    """
    for route in getattr(app, "routes", ()):
        if getattr(route, "path", None) == API_ROUTE and hasattr(route, "dependencies"):
            dependencies = list(route.dependencies)
            if getattr(shared.cmd_opts, "api_auth", None) and not dependencies:
                raise RuntimeError(f"--api-auth is set but {NAME}'s {API_ROUTE} route carries no auth dependency.")
            return dependencies
    return None


def lora_folder() -> Path:
    folder = getattr(shared.cmd_opts, "lora_dir", None)
    return Path(folder) if folder else Path(paths.models_path) / "Lora"


def default_scorer_folder() -> Path:
    return Path(paths.models_path) / "pickscore"


def scorer_folder(configured: str) -> Path:
    """The accordion's folder, else Settings > HG-DPO, else ``models/pickscore``; relative to the WebUI data folder.

    A folder given in the accordion (or an API call) must lie in the WebUI's models folder or in the one set in
    Settings > HG-DPO (:func:`extension.best_of.check_scorer_folder`); the setting itself is the admin's choice.
    """
    setting = str(shared.opts.data.get("hgdpo_scorer_dir", "") or "").strip()
    text = (configured or "").strip()
    if not text:
        return _data_relative(setting) if setting else default_scorer_folder()
    allowed = [Path(paths.models_path), *([_data_relative(setting)] if setting else [])]
    return best_of.check_scorer_folder(_data_relative(text), allowed)


def _data_relative(text: str) -> Path:
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else Path(paths.data_path) / path


def model_title(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return getattr(info, "title", None) or getattr(info, "name", None) or "the loaded checkpoint"


def context_width(sd_model) -> int | None:
    """The UNet's cross-attention context width (768 SD1.x, 2048 SDXL base, 1280 the SDXL refiner), or None."""
    for name, module in unet(sd_model).named_modules():
        if name.endswith("attn2.to_k"):
            return getattr(module, "in_features", None)
    return None


def model_family_problem(sd_model) -> str | None:
    """Why the LAN samplers cannot run on ``sd_model`` (not SD1.x or SDXL base), or None."""
    if sd_model is None:
        return settings.model_family_problem(None)
    width = context_width(sd_model) if settings.model_family(sd_model) is SDXL else None
    return settings.model_family_problem(sd_model, model_title(sd_model), width)


def model_family(sd_model) -> ModelFamily:
    """The loaded model's family, SD1.5 or SDXL (call :func:`model_family_problem` first)."""
    return settings.model_family(sd_model)


def unet(sd_model) -> nn.Module:
    """The LDM-layout UNet (``input_blocks``/``middle_block``/``output_blocks``)."""
    if IS_FORGE or hasattr(sd_model, "forge_objects"):
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def unet_compute_dtype(sd_model):
    """Forge may store the UNet's weights in another dtype than it computes in: the compute dtype (A1111: None)."""
    if hasattr(sd_model, "forge_objects"):
        return getattr(sd_model.forge_objects.unet.model, "computation_dtype", None)
    return None


def text_encoders(sd_model) -> list[tuple[nn.Module, str] | None]:
    """The text encoders of the family's slots (SD1.x: CLIP-L; SDXL: CLIP-L, OpenCLIP bigG) as ``(module,
    layout)`` pairs (layout ``"transformers"`` or ``"open_clip"``, :mod:`extension.text_encoder_lora`); None
    for one not found."""
    if hasattr(sd_model, "forge_objects"):
        root = sd_model.forge_objects.clip.cond_stage_model
        roots = [getattr(root, "clip_l", None), getattr(root, "clip_g", None)] if model_family(sd_model) is SDXL else [root]
    elif model_family(sd_model) is SDXL:
        roots = [getattr(embedder, "wrapped", embedder) for embedder in sd_model.conditioner.embedders]
    else:
        roots = [sd_model.cond_stage_model]
    return [_text_encoder(root) for root in roots]


def _text_encoder(root: nn.Module | None) -> tuple[nn.Module, str] | None:
    """The transformers ``CLIPTextModel`` under ``root``, else its OpenCLIP text model (``transformer.resblocks``)."""
    if root is None:
        return None
    for module in root.modules():
        if type(module).__name__ == "CLIPTextModel":
            return module, text_encoder_lora.TRANSFORMERS
    model = getattr(root, "model", None)
    if model is not None and hasattr(getattr(model, "transformer", None), "resblocks"):
        return model, text_encoder_lora.OPEN_CLIP
    return None


def prepare_text_encoder(sd_model) -> None:
    """Forge: load the text encoder where it will run before hooks are attached to it."""
    if hasattr(sd_model, "forge_objects"):
        from backend import memory_management

        memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
