"""Test fixtures: Stable Diffusion 1.5 models with random weights, saved the way users have them.

* :func:`tiny_sd15_configs` / :func:`sd15_configs` give diffusers configs (tiny or full-size SD1.5).
* :func:`build_models` instantiates UNet, VAE and CLIP text encoder with deterministic random weights
  (every parameter is re-randomised, so no layer stays zero-initialised and a wrong key mapping in a
  roundtrip cannot go unnoticed).
* :func:`save_diffusers_folder` writes a diffusers model folder (no tokenizer).
* :func:`to_ldm_state_dict` / :func:`save_single_file` write the original CompVis/LDM single-file layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``)
  as found in Civitai ``.safetensors`` downloads. This is the inverse of diffusers'
  ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` (the classic mapping of
  ``convert_diffusers_to_original_stable_diffusion.py``), derived from the models' structure so it works
  for any block count / ``layers_per_block``.
* ``save_fake_*`` write small checkpoints of *other* families (SDXL, SD2, LoRA) holding just the keys
  that identify them, and :func:`save_inpainting_checkpoint` a real tiny SD1.5 inpainting file.

The text-encoder part of a single file includes ``...text_model.embeddings.position_ids`` (int64,
``arange(77)[None]``) like the released SD1.5 checkpoints (197 ``cond_stage_model.`` keys); pass
``include_position_ids=False`` for the 196-key variant some re-saved checkpoints have. It is a
non-persistent buffer in transformers, so loaders must drop it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from hgdpo.models.ldm_names import diffusers_to_ldm_name, diffusers_to_ldm_prefixes
from hgdpo.models.tiny import (  # noqa: F401  (re-exported for the tests)
    build_models,
    randomize_parameters,
    save_diffusers_folder,
    sd15_configs,
    text_encoder_state_dict,
    tiny_sd15_configs,
)

# --------------------------------------------------------------------------- LDM single file

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."

_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_prefix_map(vae: nn.Module) -> dict[str, tuple[str, dict[str, str]]]:
    mapping: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        coder = getattr(vae, part)
        mapping[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        mapping[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        mapping[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        for j in range(len(coder.mid_block.resnets)):
            mapping[f"{part}.mid_block.resnets.{j}."] = (f"{part}.mid.block_{j + 1}.", _VAE_RESNET_RENAMES)
        for j in range(len(coder.mid_block.attentions)):
            mapping[f"{part}.mid_block.attentions.{j}."] = (f"{part}.mid.attn_{j + 1}.", _VAE_ATTENTION_RENAMES)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            mapping[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET_RENAMES)
        if getattr(block, "downsamplers", None) is not None:
            mapping[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
    num_up = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = num_up - 1 - i  # LDM indexes decoder.up by resolution level (0 = full size), diffusers by run order
        for j in range(len(block.resnets)):
            mapping[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{level}.block.{j}.", _VAE_RESNET_RENAMES)
        if getattr(block, "upsamplers", None) is not None:
            mapping[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", {})
    return mapping


def _convert(
    state: dict[str, torch.Tensor], mapping: dict[str, tuple[str, dict[str, str]]], what: str
) -> dict[str, tuple[str, torch.Tensor]]:
    """Map every key of ``state`` through ``mapping``; an unmapped key is an error, never dropped."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state.items():
        ldm_key = diffusers_to_ldm_name(key, mapping)
        if ldm_key is None:
            raise KeyError(f"{what}: no LDM mapping for diffusers key {key!r}")
        if ldm_key in out:
            raise KeyError(f"{what}: two diffusers keys map to {ldm_key!r}")
        out[ldm_key] = (key, value)
    return out


def unet_to_ldm(unet: nn.Module) -> dict[str, torch.Tensor]:
    """UNet weights in the LDM layout, without the ``model.diffusion_model.`` prefix."""
    converted = _convert(unet.state_dict(), diffusers_to_ldm_prefixes(unet), "unet")
    return {key: value for key, (_, value) in converted.items()}


def vae_to_ldm(vae: nn.Module) -> dict[str, torch.Tensor]:
    """VAE weights in the LDM layout (no prefix); mid-block attention projections as 1x1 convs."""
    converted = _convert(vae.state_dict(), _vae_prefix_map(vae), "vae")
    out = {}
    for ldm_key, (key, value) in converted.items():
        is_projection = ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
        if ".mid.attn_" in ldm_key and is_projection and value.ndim == 2:
            value = value[:, :, None, None]  # diffusers Linear [out, in] -> original Conv2d [out, in, 1, 1]
        out[ldm_key] = value
    return out


def text_encoder_to_ldm(text_encoder: nn.Module, include_position_ids: bool = True) -> dict[str, torch.Tensor]:
    """CLIP text weights keyed ``transformer.text_model.*`` minus ``cond_stage_model.`` (i.e. HF names)."""
    out = {f"transformer.{key}": value for key, value in text_encoder_state_dict(text_encoder).items()}
    if include_position_ids:
        positions = text_encoder.config.max_position_embeddings
        out["transformer.text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def to_ldm_state_dict(
    unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, include_position_ids: bool = True
) -> dict[str, torch.Tensor]:
    """Convert diffusers/transformers modules to one original-layout (CompVis/LDM) state dict.

    Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
    ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder, with ``embeddings.position_ids``
    unless ``include_position_ids=False``). Tensors share storage with the modules (no copies).
    """
    state = {LDM_UNET_PREFIX + key: value for key, value in unet_to_ldm(unet).items()}
    state.update({LDM_VAE_PREFIX + key: value for key, value in vae_to_ldm(vae).items()})
    text_state = text_encoder_to_ldm(text_encoder, include_position_ids)
    state.update({"cond_stage_model." + key: value for key, value in text_state.items()})
    return state


def _save_state_dict(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def save_single_file(
    models: dict[str, nn.Module],
    path: str | Path,
    dtype: torch.dtype | None = torch.float16,
    include_position_ids: bool = True,
) -> Path:
    """Write the models as one LDM-layout ``.safetensors`` checkpoint (floats cast to ``dtype``; None keeps fp32).

    ``position_ids`` stays int64 whatever ``dtype`` is (as in the released SD1.5 files).
    """
    state = to_ldm_state_dict(models["unet"], models["vae"], models["text_encoder"], include_position_ids)
    return _save_state_dict(state, path, dtype)


# --------------------------------------------------------------------------- other families (bad inputs)


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float16)


def save_fake_sdxl_checkpoint(path: str | Path) -> Path:
    """A fake SDXL base single file: only identifying keys (CLIP-L + OpenCLIP-bigG embedders, ``label_emb``).

    Trailing (width) dimensions are SDXL's; vocabulary axes are truncated to keep the file small.
    Diffusers' ``infer_diffusers_model_type`` classifies it as ``xl_base``.
    """
    te0 = "conditioner.embedders.0.transformer.text_model."
    te1 = "conditioner.embedders.1.model."
    state = {
        te0 + "embeddings.token_embedding.weight": _zeros(8, 768),
        te0 + "embeddings.position_embedding.weight": _zeros(77, 768),
        te0 + "encoder.layers.0.self_attn.q_proj.weight": _zeros(768, 768),
        te0 + "final_layer_norm.weight": _zeros(768),
        te1 + "token_embedding.weight": _zeros(8, 1280),
        te1 + "positional_embedding": _zeros(77, 1280),
        te1 + "text_projection": _zeros(1280, 1280),
        te1 + "transformer.resblocks.0.attn.in_proj_weight": _zeros(3 * 1280, 1280),
        te1 + "transformer.resblocks.9.mlp.c_proj.bias": _zeros(1280),
        te1 + "ln_final.weight": _zeros(1280),
        LDM_UNET_PREFIX + "input_blocks.0.0.weight": _zeros(320, 4, 3, 3),
        LDM_UNET_PREFIX + "label_emb.0.0.weight": _zeros(1280, 2816),
        LDM_UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": _zeros(640, 2048),
        LDM_VAE_PREFIX + "encoder.conv_in.weight": _zeros(128, 3, 3, 3),
    }
    return _save_state_dict(state, path, None)


def save_fake_sd2_checkpoint(path: str | Path) -> Path:
    """A fake SD2.x single file: OpenCLIP-H text encoder keys (width 1024) and a UNet with context dim 1024.

    Diffusers' ``infer_diffusers_model_type`` classifies it as ``v2``.
    """
    te = "cond_stage_model.model."
    state = {
        te + "token_embedding.weight": _zeros(8, 1024),
        te + "positional_embedding": _zeros(77, 1024),
        te + "transformer.resblocks.0.attn.in_proj_weight": _zeros(3 * 1024, 1024),
        te + "transformer.resblocks.0.attn.in_proj_bias": _zeros(3 * 1024),
        te + "transformer.resblocks.0.mlp.c_fc.weight": _zeros(4096, 1024),
        te + "ln_final.weight": _zeros(1024),
        LDM_UNET_PREFIX + "input_blocks.0.0.weight": _zeros(320, 4, 3, 3),
        LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _zeros(320, 1024),
        LDM_UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": _zeros(320, 1024),
        LDM_UNET_PREFIX + "input_blocks.1.1.proj_in.weight": _zeros(320, 320),  # SD2 uses linear proj_in
        LDM_VAE_PREFIX + "encoder.conv_in.weight": _zeros(128, 3, 3, 3),
    }
    return _save_state_dict(state, path, None)


def inpainting_configs(configs: dict[str, dict] | None = None) -> dict[str, dict]:
    """``configs`` (default: tiny) with a 9-input-channel UNet, as in SD1.5 inpainting models."""
    configs = copy.deepcopy(configs if configs is not None else tiny_sd15_configs())
    configs["unet"]["in_channels"] = 9
    return configs


def save_inpainting_checkpoint(
    path: str | Path,
    configs: dict[str, dict] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """A real (tiny by default) SD1.5 *inpainting* single file: ``input_blocks.0.0.weight`` is ``[C, 9, 3, 3]``."""
    models = build_models(inpainting_configs(configs), seed=seed)
    return save_single_file(models, path, dtype=dtype)


def save_fake_lora(path: str | Path, rank: int = 4) -> Path:
    """A fake kohya-style SD1.5 LoRA (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``/``lora_up``/``alpha``)."""
    state: dict[str, torch.Tensor] = {}
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }
    for name, (out_features, in_features) in modules.items():
        state[f"{name}.lora_down.weight"] = _zeros(rank, in_features)
        state[f"{name}.lora_up.weight"] = _zeros(out_features, rank)
        state[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return _save_state_dict(state, path, None)


def save_random_lora(unet: nn.Module, path: str | Path, *, rank: int = 8, std: float = 0.05, seed: int = 0,
                     targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                     text_encoder: nn.Module | None = None, family=None) -> Path:
    """A random kohya LoRA shaped for ``unet`` (and optionally the text encoder's q/k/v/out projections),
    written by hgdpo's own writer, so it has an effect (the trainer's initial up weights are zero).
    ``family`` (default SD1.5) names the UNet modules and the metadata (SDXL: SGM names)."""
    from hgdpo.models.families import SD15
    from hgdpo.models.lora import kohya_metadata, save_kohya_lora
    from hgdpo.models.lora_runtime import TEXT_ENCODER_PREFIX

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(targets):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * std
    metadata = kohya_metadata(rank=rank, alpha=float(rank), title=Path(path).stem, resolution=(64, 64),
                              base_model="random", base_model_hash=None, training={}, hgdpo={"loss": "hgdpo"},
                              family=family or SD15)
    path = save_kohya_lora(path, state, float(rank), metadata, dtype=torch.float32,
                           names=(family or SD15).kohya_unet_names(unet))
    if text_encoder is not None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        for name, module in text_encoder.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                key = TEXT_ENCODER_PREFIX + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * std
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        save_file(tensors, str(path), metadata=metadata)
    return path
