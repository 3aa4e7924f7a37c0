"""Random-weight SD1.5-structured models: the built-in offline demo model, and test fixtures.

:func:`tiny_sd15_configs` keeps SD1.5's *structure* (cross-attention down/up blocks, 4 latent
channels, a CLIP text encoder with the real 49,408-token vocabulary) at a tiny width, so the whole
pipeline (loading, LoRA, training, sampling, export) runs in seconds on a CPU. :func:`sd15_configs`
gives the real SD1.5 architecture from the bundled configs, for full-size smoke tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hgdpo.models.loading import SD15_CONFIG_DIR

_COMPONENTS = ("unet", "vae", "text_encoder")


def sd15_configs() -> dict[str, dict[str, Any]]:
    """Diffusers configs of the real Stable Diffusion 1.5 components (the bundled files)."""
    return {name: json.loads((SD15_CONFIG_DIR / name / "config.json").read_text()) for name in _COMPONENTS}


def tiny_sd15_configs(layers_per_block: int = 1) -> dict[str, dict[str, Any]]:
    """SD1.5's configs shrunk: 2 UNet levels of 32/64 channels, a 2-layer 32-wide CLIP text model."""
    configs = sd15_configs()
    configs["unet"].update(
        sample_size=8,
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=layers_per_block,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    configs["vae"].update(
        sample_size=32,
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=layers_per_block,
        norm_num_groups=8,
    )
    configs["text_encoder"].update(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
    )
    return configs


def _init_kwargs(config: dict) -> dict:
    """Config without bookkeeping entries (``_class_name``, ``architectures``, ``model_type``)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@torch.no_grad()
def randomize_parameters(model: nn.Module, generator: torch.Generator, std: float = 0.02,
                         dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every parameter with N(0, std) noise (norm weights 1 + noise), in place, each cast to ``dtype`` as
    it is drawn (drawn in float32 always, so the values do not depend on ``dtype``; no float32 copy of the model).

    No layer stays zero-initialised, so a wrong key mapping cannot hide. Works on parameters still
    on the ``meta`` device (they are materialised on the CPU); buffers are left untouched.
    """
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            value = torch.empty(parameter.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            if is_norm and name == "weight":
                value += 1.0
            module._parameters[name] = nn.Parameter(value.to(dtype), requires_grad=parameter.requires_grad)
    return model


def build_models(configs: dict[str, dict], seed: int = 0, std: float = 0.02) -> dict[str, nn.Module]:
    """``{"unet", "vae", "text_encoder"}`` (and ``"text_encoder_2"``, a ``CLIPTextModelWithProjection``,
    when ``configs`` has one, as SDXL's do) with deterministic random weights (fp32, CPU, eval mode)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    with init_empty_weights():  # parameters on meta (no costly default init), buffers real
        models = {
            "unet": UNet2DConditionModel.from_config(_init_kwargs(configs["unet"])),
            "vae": AutoencoderKL.from_config(_init_kwargs(configs["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_init_kwargs(configs["text_encoder"]))),
        }
        if "text_encoder_2" in configs:
            config = CLIPTextConfig(**_init_kwargs(configs["text_encoder_2"]))
            models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    for model in models.values():
        randomize_parameters(model, generator, std=std).eval()
    return models


def text_encoder_state_dict(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """CLIP text weights keyed ``text_model.*`` whatever the transformers version's layout."""
    state = text_encoder.state_dict()
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}


def save_diffusers_folder(models: dict[str, nn.Module], configs: dict[str, dict], path: str | Path) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (no tokenizer/, no safety checker).

    The text encoder's weights keep the ``text_model.`` prefix (the layout of the hub's SD1.5 and of
    transformers 4): transformers 5 would drop it, and ComfyUI's diffusers loader then silently
    leaves the text encoder uninitialised. transformers 5 reads either layout. The UNet and VAE write their
    own configs, without the local folder a loaded model would record; ``configs`` gives the text encoder's.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae"):
        models[name].save_pretrained(path / name, safe_serialization=True)
        config_file = path / name / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("_name_or_path", None)  # a model loaded from a folder would record that folder's local path
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    text_dir = path / "text_encoder"
    text_dir.mkdir(exist_ok=True)
    (text_dir / "config.json").write_text(json.dumps(configs["text_encoder"], indent=2) + "\n")
    weights = {key: value.contiguous() for key, value in text_encoder_state_dict(models["text_encoder"]).items()}
    save_file(weights, str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(SD15_CONFIG_DIR / "scheduler", path / "scheduler", dirs_exist_ok=True)
    model_index = json.loads((SD15_CONFIG_DIR / "model_index.json").read_text())
    model_index.update(tokenizer=[None, None], requires_safety_checker=False)
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return path


def build_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny random-weight demo model as a diffusers folder; return its path."""
    configs = tiny_sd15_configs()
    return save_diffusers_folder(build_models(configs, seed=seed), configs, path)
