"""kohya (diffusers-style) LoRA module names on an LDM-layout SD1.x UNet.

kohya LoRAs name UNet layers after diffusers' module paths (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``), while the AUTOMATIC1111 WebUI, Forge and ComfyUI run the original
CompVis/LDM UNet (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``). :func:`ldm_unet_kohya_names`
gives an LDM UNet's Linear and Conv2d layers keyed by kohya name, ready for
:class:`hgdpo.models.lora_runtime.FunctionalLoRA`.

The mapping is the classic one of diffusers' ``convert_ldm_unet_checkpoint``, derived here from the
module names themselves (which input block is a downsampler, where the upsamplers sit), so it works for
any number of blocks and layers per block. Framework-free: it imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

_RESNET_RENAMES = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
}
DIFFUSERS_TO_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_PARTS = ("in_layers", "emb_layers", "out_layers", "skip_connection")
_ATTENTION_PARTS = ("norm", "proj_in", "proj_out", "transformer_blocks")


def _kind(sub: str) -> str | None:
    """What an LDM block child is, from one of its sub-module paths (``op``, ``in_layers.2``, ...)."""
    head = sub.split(".", 1)[0]
    if head == "op":
        return "downsample"
    if head == "conv":
        return "upsample"
    if head in _RESNET_PARTS:
        return "resnet"
    if head in _ATTENTION_PARTS:
        return "attention"
    return None


def _blocks(names: Iterable[str], prefix: str) -> dict[int, dict[int, str]]:
    """``{block index: {child index: kind}}`` of ``input_blocks`` / ``output_blocks`` / ``middle_block``."""
    blocks: dict[int, dict[int, str]] = {}
    for name in names:
        if not name.startswith(prefix + "."):
            continue
        rest = name[len(prefix) + 1:]
        parts = (("0." + rest) if prefix == "middle_block" else rest).split(".", 2)
        if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        kind = _kind(parts[2])
        if kind is not None:
            blocks.setdefault(int(parts[0]), {})[int(parts[1])] = kind
    return blocks


def _child_name(diffusers_prefix: str, kind: str, sub: str) -> str | None:
    if kind == "resnet":
        for old, new in _RESNET_RENAMES.items():
            if sub == old or sub.startswith(old + "."):
                return f"{diffusers_prefix}.{new}{sub[len(old):]}"
        return None  # norms and activations have no LoRA-relevant diffusers twin
    if kind == "downsample":
        return f"{diffusers_prefix}.conv" if sub == "op" else None
    if kind == "upsample":
        return f"{diffusers_prefix}.conv" if sub == "conv" else None
    return f"{diffusers_prefix}.{sub}"


def ldm_to_diffusers_names(names: Iterable[str]) -> dict[str, str]:
    """``{LDM module path: diffusers module path}`` for the UNet module paths in ``names``.

    ``names`` are module paths relative to the UNet (``input_blocks.1.1.proj_in``), e.g. from
    ``unet.named_modules()``. Paths without a diffusers twin (norms, activations, ``Sequential``
    containers) are left out.
    """
    names = list(names)
    prefixes: dict[tuple[str, int, int], str] = {}  # (LDM part, block, child) -> diffusers prefix

    down, level, layer = _blocks(names, "input_blocks"), 0, 0
    for index in sorted(i for i in down if i > 0):
        children = down[index]
        if children.get(0) == "downsample":
            prefixes["input_blocks", index, 0] = f"down_blocks.{level}.downsamplers.0"
            level, layer = level + 1, 0
            continue
        for child, kind in children.items():
            part = "resnets" if kind == "resnet" else "attentions"
            prefixes["input_blocks", index, child] = f"down_blocks.{level}.{part}.{layer}"
        layer += 1

    middle = _blocks(names, "middle_block").get(0, {})
    resnets = attentions = 0
    for child in sorted(middle):
        if middle[child] == "resnet":
            prefixes["middle_block", 0, child] = f"mid_block.resnets.{resnets}"
            resnets += 1
        elif middle[child] == "attention":
            prefixes["middle_block", 0, child] = f"mid_block.attentions.{attentions}"
            attentions += 1

    up, level, layer = _blocks(names, "output_blocks"), 0, 0
    for index in sorted(up):
        children = up[index]
        for child, kind in children.items():
            if kind == "upsample":
                prefixes["output_blocks", index, child] = f"up_blocks.{level}.upsamplers.0"
            else:
                part = "resnets" if kind == "resnet" else "attentions"
                prefixes["output_blocks", index, child] = f"up_blocks.{level}.{part}.{layer}"
        if "upsample" in children.values():
            level, layer = level + 1, 0
        else:
            layer += 1

    kinds = {("input_blocks", b, c): k for b, cs in down.items() for c, k in cs.items()}
    kinds.update({("output_blocks", b, c): k for b, cs in up.items() for c, k in cs.items()})
    kinds.update({("middle_block", 0, c): k for c, k in middle.items()})

    result = {}
    for name in names:
        if name in _FIXED:
            result[name] = _FIXED[name]
            continue
        part, _, rest = name.partition(".")
        if part == "middle_block":
            rest = "0." + rest
        pieces = rest.split(".", 2)
        if len(pieces) < 3 or not pieces[0].isdigit() or not pieces[1].isdigit():
            continue
        key = (part, int(pieces[0]), int(pieces[1]))
        if key not in prefixes:
            continue
        mapped = _child_name(prefixes[key], kinds[key], pieces[2])
        if mapped is not None:
            result[name] = mapped
    return result


def diffusers_to_ldm_prefixes(unet: nn.Module) -> dict[str, tuple[str, dict[str, str]]]:
    """``{diffusers prefix: (LDM prefix, renames of the sub-keys)}`` of a diffusers ``UNet2DConditionModel``.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint``, derived from the blocks of ``unet`` (any
    number of levels and layers per block; SDXL's ``add_embedding`` is LDM's ``label_emb``). Prefixes
    end with a dot and apply to parameter keys and module paths alike (append a dot to a path).
    """
    mapping: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "class_embedding.linear_1.": ("label_emb.0.0.", {}),
        "class_embedding.linear_2.": ("label_emb.0.2.", {}),
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
    }
    index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            mapping[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{index}.0.", DIFFUSERS_TO_LDM_RESNET)
            if attentions is not None:
                mapping[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if getattr(block, "downsamplers", None) is not None:
            mapping[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1

    mid = unet.mid_block
    for j in range(len(mid.resnets)):
        mapping[f"mid_block.resnets.{j}."] = (f"middle_block.{2 * j}.", DIFFUSERS_TO_LDM_RESNET)
    for j in range(len(getattr(mid, "attentions", []))):
        mapping[f"mid_block.attentions.{j}."] = (f"middle_block.{2 * j + 1}.", {})

    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            mapping[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{index}.0.", DIFFUSERS_TO_LDM_RESNET)
            if attentions is not None:
                mapping[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{index}.1.", {})
            index += 1
        if getattr(block, "upsamplers", None) is not None:
            slot = 2 if attentions is not None else 1  # after the last layer's resnet (+ attention)
            mapping[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{index - 1}.{slot}.conv.", {})
    return mapping


def diffusers_to_ldm_name(name: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """The LDM path of a diffusers key or module path under a prefix map such as :func:`diffusers_to_ldm_prefixes`
    (longest matching prefix wins); None when no prefix matches."""
    dotted = name + "."
    prefix = max((p for p in prefixes if dotted.startswith(p)), key=len, default=None)
    if prefix is None:
        return None
    ldm_prefix, renames = prefixes[prefix]
    rest = dotted[len(prefix):]
    for old, new in renames.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return (ldm_prefix + rest)[:-1]


def is_layer(module: nn.Module) -> bool:
    """A Linear or Conv2d layer, or a frontend's own linear layer that is not an ``nn.Linear`` subclass
    (Forge's ``ForgeOperations.Linear`` is a plain ``nn.Module`` with ``in_features``/``out_features``)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: layer}`` of every :func:`is_layer` module of ``model``."""
    return {name: module for name, module in model.named_modules() if name and is_layer(module)}


def ldm_unet_kohya_names(unet: nn.Module) -> dict[str, nn.Module]:
    """An LDM-layout UNet's Linear and Conv2d layers keyed by kohya name (no ``lora_unet_`` prefix).

    ``unet`` is the ``diffusion_model`` (A1111: ``sd_model.model.diffusion_model``, Forge:
    ``sd_model.forge_objects.unet.model.diffusion_model``, whose linear layers are Forge's own class).
    """
    modules = layers(unet)
    return {diffusers.replace(".", "_"): modules[ldm] for ldm, diffusers in ldm_to_diffusers_names(modules).items()}


def clip_text_kohya_names(encoder: nn.Module) -> dict[str, nn.Module]:
    """A transformers ``CLIPTextModel``'s layers keyed as kohya names them (``text_model_encoder_layers_0_...``).

    transformers 5 dropped the ``text_model.`` level of the module paths; kohya's names keep it. Layers of
    frontend-specific classes (Forge's) are included.
    """
    names = {name.replace(".", "_"): module for name, module in layers(encoder).items()}
    if names and not any(name.startswith("text_model_") for name in names):
        names = {"text_model_" + name: module for name, module in names.items()}
    return names
