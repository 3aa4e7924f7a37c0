"""HG-DPO LoRA: the LoRA from ``models/loras`` at a weight (0.5 by default, the paper's setting).

It is ComfyUI's own LoRA loading (``comfy.sd.load_lora_for_models``: weight patches on a clone of the
ModelPatcher), so it composes with other LoRA nodes, hooks and samplers. It takes SD1.5- and SDXL-family
models (SDXL: Pony, Illustrious, NoobAI ... too). Before patching it checks the file with
:func:`hgdpo.models.lora_runtime.lora_from_state_dict` against the model's family (an SD1.5 LoRA on an SDXL
model, an SDXL LoRA on an SD1.5 model, a LoRA for SD2, a DiT... is refused with one message naming both)
and against the model itself (every UNet module must map onto it), so a wrong file gives a clear error
instead of ComfyUI's "lora key not loaded" lines.
"""

from __future__ import annotations

import folder_paths

from hgdpo.models.families import FAMILIES, ModelFamily

from .comfy_internals import (
    apply_lora,
    core_family,
    io,
    load_safetensors,
    model_family,
    model_weights,
    require,
    unet_lora_keys,
)

CATEGORY = "HG-DPO"
DEFAULT_STRENGTH = 0.5


def _unet_fit(model, lora_name: str, unet_modules: dict) -> None:
    """Refuse a LoRA whose UNet modules do not all map onto ``model`` (ComfyUI's own key map) with fitting shapes."""
    family = model_family(model)[0]
    advice = "Load the checkpoint the LoRA was trained on."
    key_map = unet_lora_keys(model)
    unknown = [name for name in unet_modules if name not in key_map]
    if unknown:
        raise ValueError(
            f"{lora_name} does not fit this {family} model: {len(unknown)} of {len(unet_modules)} UNet modules are "
            f"unknown to it (e.g. {unknown[0]}). {advice}"
        )
    weights = model_weights(model)
    for name, module in unet_modules.items():
        weight = weights[key_map[name]]
        if module.up.shape[0] != weight.shape[0] or module.down.shape[1] != weight.shape[1]:
            raise ValueError(
                f"{lora_name} does not fit this {family} model: module {name} maps {module.down.shape[1]} to "
                f"{module.up.shape[0]} features, the model's layer {weight.shape[1]} to {weight.shape[0]}. {advice}"
            )


def family_of(model) -> ModelFamily:
    """The model's hgdpo family; other architectures (SD2, SD3, Flux ...) are refused."""
    family = core_family(model)
    if family is None:
        supported = " and ".join(f.label for f in FAMILIES.values())
        raise ValueError(f"HG-DPO LoRAs are for {supported}-family models; this model is {model_family(model)[0]}.")
    return family


def text_encoder_prefixes(family: ModelFamily) -> tuple[str, ...]:
    """Key prefixes of a LoRA's text-encoder part: kohya's (``lora_te_``; ``lora_te1_``, ``lora_te2_``) and
    diffusers' (``text_encoder.``, ``text_encoder_2.``)."""
    return tuple(prefix for slot in family.text_encoders for prefix in (slot.lora_prefix, slot.subfolder + "."))


class HGDPOLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGDPOLoraLoader",
            display_name="HG-DPO LoRA",
            category=CATEGORY,
            description="Applies an HG-DPO LoRA (from models/loras) at the given weight; 0.5 is the paper's "
                        "setting (higher: more natural, less diverse). Uses ComfyUI's LoRA loading, so it "
                        "composes with other LoRA nodes.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="An HG-DPO LoRA .safetensors file in models/loras."),
                io.Float.Input("strength", default=DEFAULT_STRENGTH, min=0.0, max=2.0, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="LoRA weight on the UNet (and on CLIP when connected); the paper uses 0.5."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect to apply the LoRA's text-encoder part too (HG-DPO LoRAs have none; "
                                      "SDXL ones may have lora_te1_/lora_te2_ parts)."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, clip=None) -> io.NodeOutput:
        from hgdpo.models.lora_runtime import UNET_PREFIX, lora_from_state_dict

        require("LoRA")
        family = family_of(model)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{lora_name}: HG-DPO LoRAs are .safetensors files (pickled files can carry code).")
        state_dict, metadata = load_safetensors(path)
        lora = lora_from_state_dict(state_dict, metadata, lora_name, family=family)  # refuses other families
        _unet_fit(model, lora_name, {UNET_PREFIX + name: module for name, module in lora.unet.items()})
        if strength == 0.0:
            return io.NodeOutput(model, clip)
        if clip is None:  # the text-encoder part needs CLIP: leave it out rather than log it as "not loaded"
            prefixes = text_encoder_prefixes(family)
            state_dict = {key: value for key, value in state_dict.items() if not key.startswith(prefixes)}
        new_model, new_clip = apply_lora(model, clip, state_dict, strength)
        return io.NodeOutput(new_model, new_clip)
