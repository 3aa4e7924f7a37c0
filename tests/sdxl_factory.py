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
* :func:`save_full_size_single_file` writes the real SDXL base architecture (2.6 B-parameter UNet, both text
  encoders, the VAE; from the bundled configs) with small random weights as one fp16 single file, the
  checkpoint hosts (ComfyUI, the WebUIs) need: they detect SDXL from the real shapes, so a tiny SDXL does
  not load there. It never holds an fp32 copy of a model (about 7 GB of RAM at fp16).
* :func:`save_random_lora` writes a random kohya SDXL LoRA with hgdpo's writer (``lora_unet_input_blocks_...``,
  optionally ``lora_te1_``/``lora_te2_``), for a UNet of any size (also one on the meta device).
* ``save_fake_*`` write the identifying keys of refused kinds (refiner, SD3, Flux).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hgdpo.models.families import SDXL, Prediction
from hgdpo.models.tiny import _init_kwargs, randomize_parameters
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


# --------------------------------------------------------------------------- the full-size architecture

FULL_SIZE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# the markers NoobAI-XL V-Pred (and kohya's sd-scripts) write into v-prediction checkpoints: empty tensors
V_PREDICTION_MARKERS = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def full_size_configs() -> dict[str, dict]:
    """The bundled SDXL base 1.0 configs of the UNet, the VAE and both text encoders (no change)."""
    return {name: json.loads((SDXL.config_dir / name / "config.json").read_text()) for name in FULL_SIZE_PARTS}


def _meta_model(name: str, config: dict) -> nn.Module:
    """One part of SDXL with its parameters on the meta device (no memory, no default init)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if name == "unet":
            return UNet2DConditionModel.from_config(_init_kwargs(config))
        if name == "vae":
            return AutoencoderKL.from_config(_init_kwargs(config))
        text_class = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return text_class(CLIPTextConfig(**_init_kwargs(config)))


def _randomize_as(model: nn.Module, generator: torch.Generator, dtype: torch.dtype, std: float) -> nn.Module:
    """:func:`hgdpo.models.tiny.randomize_parameters` (the same draws), each parameter cast to ``dtype``."""
    return randomize_parameters(model, generator, std, dtype).eval()


def build_full_size_models(dtype: torch.dtype = torch.float16, seed: int = 0, std: float = 0.02,
                           parts: tuple[str, ...] = FULL_SIZE_PARTS) -> dict[str, nn.Module]:
    """The SDXL base architecture at full size with deterministic N(0, std) weights in ``dtype``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    configs = full_size_configs()
    return {name: _randomize_as(_meta_model(name, configs[name]), generator, dtype, std) for name in parts}


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """A ``.safetensors`` file written tensor by tensor (``safetensors.torch.save_file`` first copies every
    tensor into memory, which doubles a full-size SDXL's footprint), atomically (temporary, then rename)."""
    from hgdpo.fileio import atomic_path

    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in state.values():
            handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return Path(path)


def save_full_size_single_file(path: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0,
                               prediction: Prediction | None = None) -> Path:
    """The full SDXL base architecture with random weights as a Civitai-style single file (SGM keys, ``dtype``).

    ``prediction`` v-prediction adds NoobAI's ``v_pred`` marker (and ``ztsnr`` with zero terminal SNR), by which
    ComfyUI and the WebUIs pick the v-prediction sampling. About 7 GB at fp16; run it under the full-size lock.
    """
    models = build_full_size_models(dtype, seed)
    state = {key: value.to(dtype) if value.is_floating_point() else value
             for key, value in to_ldm_state_dict(models).items()}
    if prediction is not None and prediction.type == "v_prediction":
        state["v_pred"] = V_PREDICTION_MARKERS["v_pred"]
        if prediction.zero_terminal_snr:
            state["ztsnr"] = V_PREDICTION_MARKERS["ztsnr"]
    return write_safetensors(state, path, {"format": "pt"})


def save_random_lora(unet: nn.Module, path: str | Path, *, text_encoders: tuple[nn.Module, ...] = (), rank: int = 4,
                     std: float = 0.02, seed: int = 0, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                     text_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")) -> Path:
    """A random SDXL LoRA as the trainer writes it: peft-named weights of the ``targets`` linears through
    :func:`hgdpo.models.lora.save_kohya_lora` with :meth:`SDXL.kohya_unet_names` and SDXL's metadata; with
    ``text_encoders`` (CLIP-L, bigG) also ``lora_te1_``/``lora_te2_`` modules of their ``text_targets``."""
    from safetensors.torch import load_file, save_file

    from hgdpo.fileio import atomic_path
    from hgdpo.models.lora import kohya_metadata, save_kohya_lora

    generator = torch.Generator().manual_seed(seed)

    def pair(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, module.in_features, generator=generator) * std
        return down, torch.randn(module.out_features, rank, generator=generator) * std

    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(targets):
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = pair(module)
    metadata = kohya_metadata(rank=rank, alpha=float(rank), title=Path(path).stem, resolution=(1024, 1024),
                              base_model="random", base_model_hash=None, training={}, hgdpo={"loss": "hgdpo"},
                              family=SDXL)
    path = save_kohya_lora(path, state, float(rank), metadata, dtype=torch.float16,
                           names=SDXL.kohya_unet_names(unet))
    if text_encoders:
        tensors = load_file(str(path))
        for name, module in SDXL.kohya_text_encoder_layers(text_encoders).items():
            if name.endswith(text_targets):
                down, up = pair(module)
                tensors.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                                f"{name}.alpha": torch.tensor(float(rank))})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    return path


def meta_models(parts: tuple[str, ...] = FULL_SIZE_PARTS) -> dict[str, nn.Module]:
    """The full-size SDXL parts on the meta device: their structure (layer names and shapes) without weights."""
    configs = full_size_configs()
    return {name: _meta_model(name, configs[name]) for name in parts}


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
