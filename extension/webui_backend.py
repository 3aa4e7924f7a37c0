"""Where the WebUI keeps what LAN needs, in AUTOMATIC1111 1.10 and in Forge. Imports ``modules.*``.

=================  =========================================  =====================================================
                   AUTOMATIC1111 1.10                          Forge (backend/, 2024+)
=================  =========================================  =====================================================
UNet (LDM names)   ``sd_model.model.diffusion_model``           ``sd_model.forge_objects.unet.model.diffusion_model``
CLIP text model    ``sd_model.cond_stage_model.wrapped``        ``sd_model.forge_objects.clip.cond_stage_model``
                   ``.transformer``                             ``.clip_l.transformer``
Model family       ``is_sd1/is_sd2/is_sdxl/is_sd3``             the same flags on the engine (Flux has none set)
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

from . import best_of, settings

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


def model_family_problem(sd_model) -> str | None:
    """Why the LAN samplers cannot run on ``sd_model`` (not SD1.x), or None."""
    return settings.model_family_problem(sd_model, model_title(sd_model))


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


def text_encoder(sd_model) -> nn.Module | None:
    """The transformers ``CLIPTextModel`` of an SD1.x model (None if none is found)."""
    if hasattr(sd_model, "forge_objects"):
        root = sd_model.forge_objects.clip.cond_stage_model
    else:
        root = sd_model.cond_stage_model
    for module in root.modules():
        if type(module).__name__ == "CLIPTextModel":
            return module
    return None


def prepare_text_encoder(sd_model) -> None:
    """Forge: load the text encoder where it will run before hooks are attached to it."""
    if hasattr(sd_model, "forge_objects"):
        from backend import memory_management

        memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
