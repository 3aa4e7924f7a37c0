"""Model families: everything that differs between SD1.5 and SDXL, in one object per family.

A :class:`ModelFamily` holds a family's bundled diffusers configs, its text encoders (where their weights
sit in a single-file checkpoint, how prompts become the UNet's conditioning), the latent scale, the
default resolution and aspect buckets, the kohya LoRA key names and the ``modelspec`` metadata.
:data:`SD15` and :data:`SDXL` are the two implementations; :func:`detect_checkpoint_family` and
:func:`detect_prediction` read a single-file checkpoint's family and prediction type from its keys.

SDXL conditioning (Podell et al. 2023, "SDXL", Sec. 2.1-2.2): the penultimate hidden states of CLIP ViT-L
and OpenCLIP ViT-bigG are concatenated (768 + 1280 = 2048 channels), the pooled, projected bigG
embedding and the size/crop micro-conditioning ``(h_orig, w_orig, c_top, c_left, h_target, w_target)``
enter through the UNet's additional embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hgdpo.models.ldm_names import (
    clip_text_kohya_names,
    diffusers_to_ldm_name,
    diffusers_to_ldm_prefixes,
    ldm_unet_kohya_names,
    layers,
)

CONFIG_ROOT = Path(__file__).parent / "configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
KOHYA_UNET_PREFIX = "lora_unet_"
CLIP_PAD = "<|endoftext|>"


class ModelFamilyError(ValueError):
    """The given model is not of a supported family (or not of the family asked for)."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its diffusers subfolder, single-file prefix and kohya LoRA prefix.

    ``layout`` is ``"transformers"`` (keys as in ``CLIPTextModel``, e.g. ``text_model.encoder...``) or
    ``"open_clip"`` (``transformer.resblocks.N.attn.in_proj_weight`` ..., OpenCLIP's own names).
    """

    subfolder: str
    tokenizer_subfolder: str
    ldm_prefix: str
    layout: str
    model_class: str
    pad_token: str
    lora_prefix: str


@dataclass(frozen=True)
class Prediction:
    """What the UNet predicts: ``epsilon`` or ``v_prediction``, optionally with zero terminal SNR.

    Zero terminal SNR rescales the betas so that the last timestep is pure noise (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1), as NoobAI-XL V-Pred uses.
    """

    type: str = "epsilon"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.type!r}: expected 'epsilon' or 'v_prediction'.")

    def scheduler_overrides(self) -> dict[str, object]:
        """Keyword overrides for a diffusers scheduler config."""
        return {"prediction_type": self.type, "rescale_betas_zero_snr": self.zero_terminal_snr}

    @property
    def modelspec(self) -> str:
        """The ``modelspec.prediction_type`` value (``epsilon`` or ``v``)."""
        return "v" if self.type == "v_prediction" else "epsilon"


@dataclass
class Conditioning:
    """A batch of prompts encoded for the UNet: the cross-attention context, plus SDXL's added inputs.

    Row operations (:meth:`rows`, :meth:`repeat`, :func:`cat_conditioning`) act on every tensor alike, so
    a frontend handles SD1.5's and SDXL's conditioning the same way.
    """

    context: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` after ``(sample, timestep)``."""
        kwargs: dict[str, object] = {"encoder_hidden_states": self.context}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs

    def _map(self, function) -> Conditioning:
        added = None if self.added is None else {name: function(value) for name, value in self.added.items()}
        return Conditioning(function(self.context), added)

    def __len__(self) -> int:
        return self.context.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    def to(self, *args, **kwargs) -> Conditioning:
        """Every tensor moved/cast as ``Tensor.to`` does."""
        return self._map(lambda tensor: tensor.to(*args, **kwargs))

    def rows(self, index: torch.Tensor | slice) -> Conditioning:
        """The given rows (an index tensor or a slice)."""
        return self._map(lambda tensor: tensor[index])

    def repeat(self, times: int) -> Conditioning:
        """The whole batch ``times`` over, ``[c; c; ...]``."""
        return self._map(lambda tensor: tensor.repeat(times, *([1] * (tensor.dim() - 1))))


def cat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    """The rows of several conditionings of one family, in order."""
    added = None if parts[0].added is None else {
        name: torch.cat([part.added[name] for part in parts]) for name in parts[0].added
    }
    return Conditioning(torch.cat([part.context for part in parts]), added)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for CLIP)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """What one model family fixes. Subclasses implement prompt encoding and the kohya UNet names."""

    name: str
    label: str
    config_dir: Path
    latent_scale: float
    default_resolution: int
    buckets: tuple[tuple[int, int], ...]  # (width, height)
    text_encoders: tuple[TextEncoderSlot, ...]
    modelspec_architecture: str
    kohya_base_model_version: str
    extra_unet_config: Mapping[str, object] = field(default_factory=dict)
    vae_fp16_safe: bool = True
    """False: the VAE overflows in fp16 (SDXL's original VAE) and runs in float32 instead."""
    pixel_range: tuple[int, int] | None = None
    """(fewest, most) pixels of an image the family's models are trained for; None: no limit."""

    def encode_text(self, prompts: Sequence[str], tokenizers: Sequence,
                    text_encoders: Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(context, pooled)``: the cross-attention context and the pooled text embedding (None for SD1.x)."""
        raise NotImplementedError

    def conditioning(self, context: torch.Tensor, pooled: torch.Tensor | None,
                     size: tuple[int, int] | None = None) -> Conditioning:
        """The UNet conditioning of encoded text for images of ``size`` = (height, width)."""
        return Conditioning(context)

    def encode_prompts(self, prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence,
                       size: tuple[int, int] | None = None) -> Conditioning:
        """The prompts as UNet conditioning, one text encoder per :attr:`text_encoders` slot; ``size`` is
        the image's (height, width) for SDXL's micro-conditioning (default: the family's resolution)."""
        return self.conditioning(*self.encode_text(prompts, tokenizers, text_encoders), size)

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in when the model runs in ``dtype``."""
        return torch.float32 if dtype == torch.float16 and not self.vae_fp16_safe else dtype

    def resolution_problem(self, width: int, height: int) -> str | None:
        """Why ``width`` x ``height`` does not suit this family's models, or None when it does."""
        if width % 8 or height % 8:
            return f"{width}x{height}: width and height must be multiples of 8."
        if self.pixel_range is None or self.pixel_range[0] <= width * height <= self.pixel_range[1]:
            return None
        nearest = min(self.buckets, key=lambda bucket: abs(bucket[0] / bucket[1] - width / height))
        return (f"{width}x{height} is far from the {self.label} buckets, which hold about "
                f"{self.default_resolution}x{self.default_resolution} pixels (for this aspect ratio: "
                f"{nearest[0]}x{nearest[1]}; all: {', '.join(f'{w}x{h}' for w, h in self.buckets)}). "
                f"{self.label} models draw badly far from them.")

    def kohya_unet_names(self, unet) -> dict[str, str]:
        """``{diffusers module path: kohya LoRA module name}`` for the Linear/Conv2d layers of ``unet``."""
        raise NotImplementedError

    def ldm_unet_kohya_modules(self, unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """An LDM/SGM-layout UNet's layers (the WebUIs' and ComfyUI's ``diffusion_model``) keyed by this
        family's kohya names without ``lora_unet_``."""
        raise NotImplementedError

    def kohya_text_encoder_layers(self, text_encoders: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Module]:
        """The text encoders' Linear layers keyed by kohya LoRA name (``lora_te_`` for SD1.x; ``lora_te1_``,
        ``lora_te2_`` for SDXL's CLIP-L and bigG), e.g. ``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``."""
        return {
            slot.lora_prefix + name: module
            for slot, encoder in zip(self.text_encoders, text_encoders)
            for name, module in clip_text_kohya_names(encoder).items()
        }

    def matches_unet_config(self, config: Mapping[str, object]) -> bool:
        """Whether a diffusers UNet config is of this family's structure (any width)."""
        return all(config.get(key) == value for key, value in self.extra_unet_config.items()) and (
            config.get("in_channels") == 4
        )


class SD15Family(ModelFamily):
    """Stable Diffusion 1.x: one CLIP ViT-L text encoder, last hidden states as the context."""

    def encode_text(self, prompts, tokenizers, text_encoders):
        """The last hidden states of CLIP ViT-L; no pooled embedding."""
        (tokenizer,), (text_encoder,) = tokenizers, text_encoders
        return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0], None

    def kohya_unet_names(self, unet) -> dict[str, str]:
        """kohya's SD1.x names are diffusers' module paths: ``lora_unet_down_blocks_0_attentions_0_...``."""
        return {name: KOHYA_UNET_PREFIX + name.replace(".", "_") for name in _layer_names(unet)}

    def ldm_unet_kohya_modules(self, unet):
        """kohya's SD1.x names are diffusers paths: mapped from the LDM ones (:func:`ldm_unet_kohya_names`)."""
        return ldm_unet_kohya_names(unet)

    def matches_unet_config(self, config) -> bool:
        return config.get("addition_embed_type") is None and super().matches_unet_config(config)


class SDXLFamily(ModelFamily):
    """SDXL base: CLIP ViT-L + OpenCLIP ViT-bigG (penultimate layers concatenated), pooled bigG, time ids."""

    def encode_text(self, prompts, tokenizers, text_encoders):
        """SDXL Sec. 2.1: ``context = [h_L^{-2}; h_G^{-2}]``, ``pooled`` = the projected pooled bigG embedding."""
        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            output = text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output.text_embeds if hasattr(output, "text_embeds") else pooled
        return torch.cat(hidden, dim=-1), pooled

    def conditioning(self, context, pooled, size=None) -> Conditioning:
        """SDXL Sec. 2.2: ``text_embeds`` = pooled, ``time_ids = (h, w, 0, 0, h, w)`` (no crop, original size =
        target size, as for images generated at that size)."""
        height, width = size if size is not None else (self.default_resolution, self.default_resolution)
        time_ids = micro_conditioning((height, width), (0, 0), (height, width), len(context)).to(context)
        return Conditioning(context, {"text_embeds": pooled, "time_ids": time_ids})

    def kohya_unet_names(self, unet) -> dict[str, str]:
        """kohya's SDXL names are the original (SGM/LDM) module paths: ``lora_unet_input_blocks_4_1_...``."""
        prefixes = diffusers_to_ldm_prefixes(unet)
        names = {}
        for name in _layer_names(unet):
            ldm = diffusers_to_ldm_name(name, prefixes)
            if ldm is not None:
                names[name] = KOHYA_UNET_PREFIX + ldm.replace(".", "_")
        return names

    def ldm_unet_kohya_modules(self, unet):
        """kohya's SDXL names are the SGM module paths themselves, dots as underscores."""
        return {name.replace(".", "_"): module for name, module in layers(unet).items()}


def micro_conditioning(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                       target_size: tuple[int, int], batch_size: int) -> torch.Tensor:
    """SDXL's ``add_time_ids`` ``[batch, 6]``: original (h, w), crop (top, left), target (h, w) (SDXL Sec. 2.2)."""
    row = torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)
    return row.repeat(batch_size, 1)


def _layer_names(unet) -> list[str]:
    """Module paths of the UNet's Linear/Conv2d layers (also when peft has wrapped them)."""
    return list(layers(unet))


_CLIP_L = dict(subfolder="text_encoder", tokenizer_subfolder="tokenizer", layout="transformers",
               model_class="CLIPTextModel", pad_token=CLIP_PAD)

SD15 = SD15Family(
    name="sd15",
    label="SD1.5",
    config_dir=CONFIG_ROOT / "sd15",
    latent_scale=0.18215,
    default_resolution=512,
    buckets=((512, 512),),
    text_encoders=(TextEncoderSlot(ldm_prefix="cond_stage_model.transformer.", lora_prefix="lora_te_", **_CLIP_L),),
    modelspec_architecture="stable-diffusion-v1/lora",
    kohya_base_model_version="sd_v1",
)

SDXL = SDXLFamily(
    name="sdxl",
    label="SDXL",
    config_dir=CONFIG_ROOT / "sdxl",
    latent_scale=0.13025,
    default_resolution=1024,
    # the standard SDXL buckets (about 1024^2 pixels each, sides multiples of 64), as (width, height)
    buckets=((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
             (1536, 640), (640, 1536)),
    text_encoders=(
        TextEncoderSlot(ldm_prefix="conditioner.embedders.0.transformer.", lora_prefix="lora_te1_", **_CLIP_L),
        TextEncoderSlot(subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2",
                        ldm_prefix="conditioner.embedders.1.model.", layout="open_clip",
                        model_class="CLIPTextModelWithProjection", pad_token="!", lora_prefix="lora_te2_"),
    ),
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    kohya_base_model_version="sdxl_base_v1-0",
    extra_unet_config={"addition_embed_type": "text_time"},
    vae_fp16_safe=False,
    pixel_range=(1024 * 1024 // 2, 1024 * 1024 * 2),
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD15, SDXL)}


def get_family(name: str | ModelFamily) -> ModelFamily:
    """A family by name (``sd15``, ``sdxl``) or the family itself."""
    if isinstance(name, ModelFamily):
        return name
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}: expected one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


# --------------------------------------------------------------------------- detection from a file

# what a checkpoint is, by detect_checkpoint_family's name; None: a supported family
CHECKPOINT_KINDS: dict[str, str] = {
    "sdxl-refiner": "an SDXL refiner checkpoint (OpenCLIP-bigG only, for img2img; use an SDXL base model)",
    "sdxl-inpainting": "an SDXL inpainting checkpoint (9 UNet input channels)",
    "sd2": "a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder, 1024-dim context)",
    "sd3": "a Stable Diffusion 3 checkpoint (MMDiT transformer, not a UNet)",
    "flux": "a Flux checkpoint (transformer, not a UNet)",
    "sd1-inpainting": "an SD1.x inpainting checkpoint (9 UNet input channels)",
    "sd1-instruct-pix2pix": "an InstructPix2Pix checkpoint (8 UNet input channels)",
    "lora": "a LoRA file, not a base model (pass the base checkpoint as the model, the LoRA elsewhere)",
    "unet-only": "a UNet-only file without text encoder and VAE",
    "unknown": "a file whose keys match no Stable Diffusion checkpoint layout",
}
_DETECTED_FAMILY = {"sd1": SD15, "sdxl": SDXL}


def _has_prefix(keys, *prefixes: str) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def detect_checkpoint_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the model family of a single-file checkpoint from its keys and shapes.

    Returns one of ``sd1``, ``sdxl`` (base, Pony, Illustrious, NoobAI ...: same keys), and the refused
    kinds of :data:`CHECKPOINT_KINDS`.
    """
    keys = state_dict.keys()
    if _has_prefix(keys, "lora_unet_", "lora_te", "lora_unet.") or any(
        ".lora_down." in key or ".lora_A." in key for key in keys
    ):
        return "lora"
    if _has_prefix(keys, "double_blocks.", UNET_PREFIX + "double_blocks."):
        return "flux"
    if _has_prefix(keys, "joint_blocks.", UNET_PREFIX + "joint_blocks.", "text_encoders."):
        return "sd3"
    first_conv = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = first_conv.shape[1] if first_conv is not None else None
    if _has_prefix(keys, "conditioner.embedders.1."):
        return "sdxl" if in_channels in (4, None) else "sdxl-inpainting"
    if _has_prefix(keys, "conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if _has_prefix(keys, "cond_stage_model.model."):
        return "sd2"
    if first_conv is None:
        return "unknown"
    if not _has_prefix(keys, SD15.text_encoders[0].ldm_prefix):
        return "unet-only"
    return {4: "sd1", 9: "sd1-inpainting", 8: "sd1-instruct-pix2pix"}.get(in_channels, "unknown")


def family_of_checkpoint(kind: str, source: object, wanted: ModelFamily | None = None) -> ModelFamily:
    """The supported family for a :func:`detect_checkpoint_family` result, or a :class:`ModelFamilyError`."""
    family = _DETECTED_FAMILY.get(kind)
    if family is None:
        supported = " or ".join(f.label for f in FAMILIES.values()) if wanted is None else wanted.label
        raise ModelFamilyError(
            f"{source} is {CHECKPOINT_KINDS[kind]}. HG-DPO trains {supported}-family text-to-image models: pass "
            f"such a checkpoint (or a fine-tune of one), diffusers folder or hub id."
        )
    refuse_other_family(family, wanted, source)
    return family


def refuse_other_family(family: ModelFamily, wanted: ModelFamily | None, source: object) -> None:
    """Raise when a caller asked for one family and the model is of another."""
    if wanted is not None and family is not wanted:
        raise ModelFamilyError(
            f"{source} is an {family.label} model, but an {wanted.label} model was asked for here. HG-DPO "
            f"trains {wanted.label}-family models in this place: pass an {wanted.label} checkpoint, folder "
            "or hub id."
        )


def family_of_unet_config(config: Mapping[str, object], source: object,
                          wanted: ModelFamily | None = None) -> ModelFamily:
    """The family of a diffusers UNet config; SD2.x, inpainting and unknown structures are refused."""
    in_channels, context_dim = config.get("in_channels"), config.get("cross_attention_dim")
    is_xl = config.get("addition_embed_type") == "text_time"
    if in_channels in (8, 9):
        kind = "sdxl-inpainting" if is_xl else {9: "sd1-inpainting", 8: "sd1-instruct-pix2pix"}[in_channels]
        family_of_checkpoint(kind, source, wanted)
    if not is_xl and context_dim == 1024:
        family_of_checkpoint("sd2", source, wanted)
    for family in FAMILIES.values():
        if family.matches_unet_config(config):
            refuse_other_family(family, wanted, source)
            return family
    raise ModelFamilyError(
        f"{source}: a UNet with cross_attention_dim={context_dim}, in_channels={in_channels} and "
        f"addition_embed_type={config.get('addition_embed_type')} is of no supported family "
        f"({', '.join(f.label for f in FAMILIES.values())})."
    )


PREDICTION_HINT = (
    "If this is a v-prediction model whose file lacks the marker (e.g. some NoobAI-XL V-Pred merges), "
    "force it with --prediction-type v_prediction (and --zero-terminal-snr on for ZTSNR models); in Python, "
    "load_model(..., prediction_type='v_prediction', zero_terminal_snr=True)."
)


def detect_prediction(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> Prediction | None:
    """The prediction type a checkpoint declares, or None when it declares none.

    Markers: the (empty) ``v_pred`` and ``ztsnr`` tensors NoobAI and kohya's sd-scripts write into
    v-prediction checkpoints, and the ``modelspec.prediction_type`` metadata (``v`` / ``epsilon``).
    """
    declared = (metadata or {}).get("modelspec.prediction_type")
    zero_snr = "ztsnr" in state_dict
    if "v_pred" in state_dict or declared in ("v", "v_prediction"):
        return Prediction("v_prediction", zero_snr)
    if declared == "epsilon":
        return Prediction("epsilon", zero_snr)
    return Prediction("epsilon", True) if zero_snr else None
