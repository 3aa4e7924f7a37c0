"""Test fixtures: tiny SDXL-structured models with random weights, saved the way users have them.

* :func:`tiny_sdxl_configs` shrinks the bundled SDXL base configs (2 UNet levels of 32/64 channels, a
  ``text_time`` additional embedding, CLIP-L 32 wide + OpenCLIP-bigG 48 wide, context 80).
* :func:`to_ldm_state_dict` / :func:`save_single_file` write the original SGM single-file layout of
  Civitai SDXL downloads: ``model.diffusion_model.*`` (with ``label_emb``), ``first_stage_model.*``,
  ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, transformers names) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP bigG, OpenCLIP names: fused ``in_proj`` q/k/v,
  ``text_projection`` as ``[hidden, projection]``). The bigG part is the inverse of diffusers'
  ``convert_open_clip_checkpoint``.
* :func:`save_diffusers_folder` writes a ``StableDiffusionXLPipeline`` folder.
* ``save_fake_*`` write the identifying keys of refused kinds (refiner, SD3, Flux).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from hgdpo.models.families import SDXL
from tests import sd15_factory

BIGG_PREFIX = "conditioner.embedders.1.model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
_BIGG_SIMPLE = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_BIGG_LAYER_RENAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def tiny_sdxl_configs(layers_per_block: int = 2) -> dict[str, dict]:
    """SDXL base's configs shrunk (same block types and conditioning, tiny widths)."""
    configs = {
        name: json.loads((SDXL.config_dir / name / "config.json").read_text())
        for name in ("unet", "text_encoder_2")
    }
    configs["unet"].update(
        sample_size=8,
        block_out_channels=[32, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2],
        layers_per_block=layers_per_block,
        cross_attention_dim=32 + 48,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8,
        norm_num_groups=8,
    )
    tiny_sd15 = sd15_factory.tiny_sd15_configs(layers_per_block=1)  # SDXL's VAE and CLIP-L have SD1.5's structure
    configs["vae"] = {**tiny_sd15["vae"], "scaling_factor": SDXL.latent_scale}
    configs["text_encoder"] = tiny_sd15["text_encoder"]
    configs["text_encoder_2"].update(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=48
    )
    return configs


def build_models(configs: dict[str, dict] | None = None, seed: int = 0) -> dict[str, nn.Module]:
    """Random-weight ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` (tiny by default)."""
    return sd15_factory.build_models(configs if configs is not None else tiny_sdxl_configs(), seed=seed)


def open_clip_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP's names (no ``conditioner.embedders.1.model.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key in _BIGG_SIMPLE:
            out[_BIGG_SIMPLE[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        layer, rest = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key).groups()
        projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if projection:
            qkv.setdefault((layer, projection.group(2)), {})[projection.group(1)] = value
            continue
        for old, new in _BIGG_LAYER_RENAMES:
            rest = rest.replace(old, new)
        out[f"transformer.resblocks.{layer}.{rest}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return out


def to_ldm_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The models as one SGM-layout SDXL state dict (see the module docstring)."""
    state = {sd15_factory.LDM_UNET_PREFIX + k: v for k, v in sd15_factory.unet_to_ldm(models["unet"]).items()}
    state.update({sd15_factory.LDM_VAE_PREFIX + k: v for k, v in sd15_factory.vae_to_ldm(models["vae"]).items()})
    clip_l = sd15_factory.text_encoder_state_dict(models["text_encoder"])
    state.update({CLIP_L_PREFIX + k: v for k, v in clip_l.items()})
    state.update({BIGG_PREFIX + k: v for k, v in open_clip_to_ldm(models["text_encoder_2"]).items()})
    return state


def save_single_file(models: dict[str, nn.Module], path: str | Path, extra: dict[str, torch.Tensor] | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the models as an SDXL single file (fp32), plus ``extra`` tensors (e.g. the ``v_pred`` marker)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in to_ldm_state_dict(models).items()}
    state.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def save_config_folder(configs: dict[str, dict], path: str | Path) -> Path:
    """A diffusers-layout config folder (no weights) for loading a tiny single file."""
    path = Path(path)
    for name, config in configs.items():
        (path / name).mkdir(parents=True, exist_ok=True)
        (path / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copytree(SDXL.config_dir / "scheduler", path / "scheduler", dirs_exist_ok=True)
    shutil.copy(SDXL.config_dir / "model_index.json", path / "model_index.json")
    return path


def save_diffusers_folder(models: dict[str, nn.Module], configs: dict[str, dict], path: str | Path) -> Path:
    """A ``StableDiffusionXLPipeline`` folder without tokenizers."""
    path = save_config_folder(configs, path)
    for name, model in models.items():
        model.save_pretrained(path / name, safe_serialization=True)
    return path


def inpainting_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The SDXL state dict with a 9-input-channel first convolution (as SDXL inpainting files have)."""
    state = dict(to_ldm_state_dict(models))
    key = sd15_factory.LDM_UNET_PREFIX + "input_blocks.0.0.weight"
    weight = state[key]
    state[key] = torch.zeros(weight.shape[0], 9, *weight.shape[2:])
    return state


def refiner_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A refiner-like layout: bigG alone as ``conditioner.embedders.0.model.*`` (no CLIP-L)."""
    state = {k: v for k, v in to_ldm_state_dict(models).items() if not k.startswith("conditioner.")}
    state.update({"conditioner.embedders.0.model." + k: v for k, v in open_clip_to_ldm(models["text_encoder_2"]).items()})
    return state


FAKE_KEYS = {
    "sd3": ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "first_stage_model.encoder.conv_in.weight"),
    "flux": ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "vae.encoder.conv_in.weight"),
}


def save_fake(kind: str, path: str | Path) -> Path:
    """A file holding only the identifying keys of ``kind`` (``sd3``, ``flux``)."""
    from safetensors.torch import save_file

    save_file({key: torch.zeros(2) for key in FAKE_KEYS[kind]}, str(path))
    return Path(path)
