"""The HG-DPO LoRA: attaching it to a UNet for training, and its kohya ``.safetensors`` format.

The file format is the one of kohya's sd-scripts, which ComfyUI's ``LoraLoader``, the WebUI's built-in
Lora extension and diffusers' ``load_lora_weights`` all read::

    lora_unet_<module name, dots as underscores>.lora_down.weight   [rank, in]
    lora_unet_<...>.lora_up.weight                                    [out, rank]
    lora_unet_<...>.alpha                                             scalar

The module name is the family's (:meth:`hgdpo.models.families.ModelFamily.kohya_unet_names`): diffusers'
module path for SD1.x, the original SGM/LDM path (``input_blocks_4_1_...``) for SDXL.

The applied update is ``weight * (alpha / rank) * up @ down``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from hgdpo.models.families import KOHYA_UNET_PREFIX, SD15, ModelFamily

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_PEFT_DOWN, _PEFT_UP = ".lora_A.weight", ".lora_B.weight"
_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def add_lora(unet, rank: int = 8, alpha: float = 8.0, targets: Sequence[str] = DEFAULT_TARGETS) -> None:
    """Attach a trainable LoRA (peft, Gaussian init of down, zero up) to the UNet's attention linears.

    The base weights stay frozen; the frozen reference of DPO is the same UNet with the adapter
    disabled (:func:`adapter_disabled`), so no second copy of the weights is kept.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    unet.add_adapter(config)
    if not lora_parameters(unet):
        raise ValueError(f"No UNet module matches the LoRA targets {list(targets)}.")


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of a UNet."""
    return [parameter for name, parameter in unet.named_parameters() if "lora_" in name]


@contextmanager
def adapter_disabled(unet) -> Iterator[None]:
    """Run the UNet as the frozen reference model (LoRA off), then switch the LoRA back on."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft naming (``<module>.lora_A.weight`` ...), detached copies."""
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`lora_state_dict` into the UNet's adapter, all keys required."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state_dict)
    missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
    if getattr(result, "unexpected_keys", None) or missing:
        raise ValueError(
            f"LoRA weights do not fit this UNet: unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}."
        )


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Rename peft LoRA weights to kohya UNet keys and add the per-module alpha.

    ``names`` maps module paths to kohya names (:meth:`ModelFamily.kohya_unet_names`; default: SD1.x's
    ``lora_unet_`` + diffusers path).
    """
    kohya: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for peft_suffix, kohya_suffix in ((_PEFT_DOWN, _KOHYA_DOWN), (_PEFT_UP, _KOHYA_UP)):
            if key.endswith(peft_suffix):
                path = key[: -len(peft_suffix)]
                module = names[path] if names is not None else KOHYA_UNET_PREFIX + path.replace(".", "_")
                kohya[module + kohya_suffix] = value
                kohya[module + _KOHYA_ALPHA] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"Unexpected LoRA weight {key!r}: only lora_A/lora_B linears are exported.")
    return kohya


def kohya_metadata(
    *,
    rank: int,
    alpha: float,
    title: str,
    resolution: tuple[int, int],
    base_model: str,
    base_model_hash: str | None,
    training: dict[str, object],
    hgdpo: dict[str, object],
    family: ModelFamily = SD15,
    prediction_type: str = "epsilon",
) -> dict[str, str]:
    """Metadata for the LoRA file: kohya ``ss_*`` keys, ``modelspec.*`` and ``hgdpo.*``.

    ``resolution`` is (width, height); ``prediction_type`` is ``modelspec``'s (``epsilon`` or ``v``).
    All values are strings, as safetensors requires.
    """
    width, height = resolution
    now = datetime.now(timezone.utc).replace(microsecond=0)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"target_modules": "attention to_q/to_k/to_v/to_out.0"}),
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": Path(base_model).name,
        "ss_resolution": f"({width}, {height})",
        "ss_output_name": title,
        "ss_training_finished_at": str(int(now.timestamp())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": now.isoformat(),
        "modelspec.prediction_type": prediction_type,
        "modelspec.description": "HG-DPO LoRA (Diffusion-DPO with AI feedback and statistic matching).",
    }
    if base_model_hash:
        metadata["ss_new_sd_model_hash"] = base_model_hash
        metadata["hgdpo.base_model_hash"] = base_model_hash
    metadata.update({f"ss_{key}": str(value) for key, value in training.items()})
    metadata.update({f"hgdpo.{key}": str(value) for key, value in hgdpo.items() if value is not None})
    return metadata


def save_kohya_lora(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    alpha: float,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
    names: dict[str, str] | None = None,
) -> Path:
    """Write the LoRA in kohya format, atomically (temp file, then rename); ``names`` as in :func:`peft_to_kohya`."""
    from safetensors.torch import save_file

    from hgdpo.fileio import atomic_path

    kohya = {key: value.to(dtype).contiguous() for key, value in peft_to_kohya(state_dict, alpha, names).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(kohya, str(tmp), metadata=metadata)
    return path

