"""The text-encoder part of an HG-DPO LoRA while the WebUI encodes the DPO prompts. Framework-free (torch only).

A LoRA's text-encoder modules (kohya names without their ``lora_te_``/``lora_te1_``/``lora_te2_`` prefix, e.g.
``text_model_encoder_layers_0_self_attn_q_proj``) go onto each text encoder of the loaded model in the
layout it has there:

* ``"transformers"`` (a ``CLIPTextModel``: SD1.x, SDXL's CLIP-L, Forge's CLIP-G): forward hooks
  (:class:`hgdpo.models.lora_runtime.FollowingLoRA`), as on the UNet.
* ``"open_clip"`` (AUTOMATIC1111's SDXL OpenCLIP bigG, ``transformer.resblocks.N``): its attention is a
  ``torch.nn.MultiheadAttention``, which reads its fused ``in_proj_weight`` and ``out_proj.weight`` directly
  (no layer call a hook could see), so the LoRA's ``W += weight * (alpha / rank) * up @ down`` is put into
  those tensors for the time of the encoding, q/k/v into their thirds of ``in_proj_weight``, and the
  original tensors are put back afterwards (bit for bit: the parameters get their old tensors back, nothing
  is subtracted). The text encoders run once per generation, not per step, so this costs one copy of the
  adapted weights for that while.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from hgdpo.models.ldm_names import clip_text_kohya_names
from hgdpo.models.lora_runtime import FollowingLoRA, LoRAArchitectureError, LoRAModule

TRANSFORMERS, OPEN_CLIP = "transformers", "open_clip"
_OPEN_CLIP_NAME = re.compile(r"(?:text_model_)?encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc1|mlp_fc2)")
_QKV = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2}
_OPEN_CLIP_TARGETS = {"self_attn_out_proj": ("attn", "out_proj", "weight"), "mlp_fc1": ("mlp", "c_fc", "weight"),
                      "mlp_fc2": ("mlp", "c_proj", "weight")}


@contextmanager
def applied(encoders: Sequence[tuple[nn.Module, str]], parts: Sequence[Mapping[str, LoRAModule]], weight: float,
            label: str) -> Iterator[None]:
    """Each ``parts[i]`` active at ``weight`` on ``encoders[i]`` (a ``(module, layout)`` pair) while inside."""
    with ExitStack() as stack:
        for (encoder, layout), part in zip(encoders, parts):
            if not part:
                continue
            if layout == OPEN_CLIP:
                stack.enter_context(open_clip_delta(encoder, part, weight, label))
            else:
                hooks = FollowingLoRA(clip_text_kohya_names(encoder), part, weight, label)
                stack.callback(hooks.remove)
        yield


def _open_clip_target(model: nn.Module, name: str, label: str) -> tuple[nn.Parameter, slice]:
    """The parameter (and its row range) of an OpenCLIP text model that kohya's module ``name`` adapts."""
    match = _OPEN_CLIP_NAME.fullmatch(name)
    blocks = model.transformer.resblocks
    if match is None or int(match.group(1)) >= len(blocks):
        raise LoRAArchitectureError(f"{label}: text-encoder module {name} does not exist in this OpenCLIP text model "
                                    f"({len(blocks)} layers).")
    block, kind = blocks[int(match.group(1))], match.group(2)
    if kind in _QKV:
        parameter = block.attn.in_proj_weight
        width = parameter.shape[0] // 3
        return parameter, slice(_QKV[kind] * width, (_QKV[kind] + 1) * width)
    first, second, attribute = _OPEN_CLIP_TARGETS[kind]
    parameter = getattr(getattr(getattr(block, first), second), attribute)
    return parameter, slice(0, parameter.shape[0])


@contextmanager
def open_clip_delta(model: nn.Module, part: Mapping[str, LoRAModule], weight: float, label: str) -> Iterator[None]:
    """The LoRA ``part`` added into an OpenCLIP text model's weights while inside (see the module docstring)."""
    originals: dict[nn.Parameter, torch.Tensor] = {}
    patched: dict[nn.Parameter, torch.Tensor] = {}
    for name, module in part.items():
        parameter, rows = _open_clip_target(model, name, label)
        target = patched.setdefault(parameter, parameter.data.clone())
        originals.setdefault(parameter, parameter.data)
        delta = (module.up.flatten(1).float() @ module.down.flatten(1).float()) * (module.multiplier * weight)
        if tuple(delta.shape) != tuple(target[rows].shape):
            raise LoRAArchitectureError(f"{label}: text-encoder module {name} has shape {tuple(delta.shape)}, the "
                                        f"model's weights {tuple(target[rows].shape)}.")
        target[rows] += delta.to(target.device, target.dtype)
    try:
        for parameter, tensor in patched.items():
            parameter.data = tensor
        yield
    finally:
        for parameter, tensor in originals.items():
            parameter.data = tensor
