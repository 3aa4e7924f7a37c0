"""Applying a LoRA file at inference: read, check the architecture, add it functionally.

:func:`read_lora` reads kohya SD1.x and SDXL LoRAs (what ``trainer/train.py`` writes, what Civitai shares)
and the peft/diffusers layouts into one form keyed by kohya module names, and names the family it was made
for (:func:`detect_lora_family`; a LoRA of the other family is refused by :func:`refuse_family_mismatch`). :class:`FunctionalLoRA`
adds ``scale * (alpha / rank) * up(down(x))`` to a module's output through a forward hook instead of
merging it into the weights, so

* the base weights are never modified (no re-patching, no second copy of the UNet), and
* the scale can be a per-sample vector: one batched forward evaluates the SFT model (scale 0) and the
  DPO model (scale w) together, which is the shared-weights fast path of LAN sampling.

The one run-time attachment policy, for every frontend (the WebUIs' samplers, ComfyUI's LAN guider): a LoRA
term is computed on the device and in the dtype the layer *computes* in, never in a storage-only dtype
(:data:`FP8_DTYPES`, refused by :func:`check_compute_dtype`). Hosts move models at run time (A1111's
``--medvram``/``--lowvram``, Forge's ``sampling_prepare``, ComfyUI's lowvram and dynamic VRAM) and may compute in
another dtype than they store (manual cast, fp8 storage), so :class:`FollowingLoRA` watches the inputs of the
layers it adapts and re-attaches the :class:`FunctionalLoRA` where they compute. Layers of a host's own
classes (Forge's ``ForgeOperations.Linear`` is a plain ``nn.Module``) and layers stored elsewhere than they
compute get a *view* (:func:`layer_view`): an ``nn.Linear``/``nn.Conv2d``-shaped stand-in with the layer's
geometry and the compute placement, whose hooks go to the real layer. :func:`attach_lora` (diffusers models,
which compute where they are stored) attaches a plain :class:`FunctionalLoRA`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hgdpo.models.families import FAMILIES, SD15, SDXL, ModelFamily
from hgdpo.models.ldm_names import layers

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
_KOHYA_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX, "lora_te1_", "lora_te2_")
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                  ".lora.up.weight": "up", ".alpha": "alpha"}
_UNSUPPORTED_MARKERS = {
    "hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "dora_scale": "DoRA",
    "lora_mid": "LoCon with CP decomposition",
    "oft_blocks": "OFT", "diff_b": "full weight difference",
}
_FOREIGN_PREFIXES = {"lora_te3_": "SD3", "lora_transformer_": "a DiT model (SD3/Flux)",
                     "transformer.": "a DiT model (SD3/Flux)", "diffusion_model.double_blocks": "Flux"}
_CROSS_ATTENTION_WIDTHS = {768: SD15, 2048: SDXL, 1024: "SD2.x", 1280: "the SDXL refiner"}
"""The families (or refused architectures) a LoRA's cross-attention key/value input width reveals."""
_SGM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
"""Storage-only dtypes: a LoRA is never computed in them (its term is computed in the layer input's dtype)."""


class LoRAArchitectureError(ValueError):
    """The LoRA file was made for another model architecture, or its layout is not supported."""


@dataclass
class LoRAModule:
    """One adapted layer: ``delta W = (alpha / rank) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def multiplier(self) -> float:
        """``alpha / rank`` (kohya: a file without alpha means alpha = rank)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoRAFile:
    """A LoRA keyed by kohya module name (``lora_unet_down_blocks_0_..._to_q``, ``lora_te_...``)."""

    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    family: ModelFamily = SD15

    def part(self, prefix: str) -> dict[str, LoRAModule]:
        """The modules of one model part, keyed without the prefix."""
        return {name[len(prefix):]: module for name, module in self.modules.items() if name.startswith(prefix)}

    @property
    def unet(self) -> dict[str, LoRAModule]:
        return self.part(UNET_PREFIX)

    @property
    def text_encoders(self) -> list[dict[str, LoRAModule]]:
        """The modules of each of the family's text encoders (SD1.x: ``lora_te_``; SDXL: ``lora_te1_``, ``lora_te2_``)."""
        return [self.part(slot.lora_prefix) for slot in self.family.text_encoders]

    @property
    def text_encoder(self) -> dict[str, LoRAModule]:
        """Every text-encoder module, keyed with its kohya prefix (``lora_te_...``, ``lora_te2_...``)."""
        return {name: module for name, module in self.modules.items() if not name.startswith(UNET_PREFIX)}


def _metadata_family(metadata: Mapping[str, str]) -> ModelFamily | str | None:
    """The family a LoRA's metadata names (``modelspec.architecture``, kohya's ``ss_base_model_version``),
    the name of an unsupported architecture, or None when the metadata names none."""
    architecture = metadata.get("modelspec.architecture", "")
    version = metadata.get("ss_base_model_version", "")
    for family in FAMILIES.values():
        if architecture.startswith(family.modelspec_architecture.split("/")[0] + "/") or (
            not architecture and version.startswith(family.kohya_base_model_version)
        ):
            return family
    if metadata.get("ss_v2") == "True" and not architecture:
        return "SD2.x (ss_v2)"
    return architecture or version or None


def _width_family(state_dict: Mapping[str, torch.Tensor]) -> ModelFamily | str | None:
    """The family the cross-attention key projection's input width names (768: SD1.x, 2048: SDXL ...)."""
    downs = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
    for key, tensor in state_dict.items():
        if "attn2" in key and "to_k" in key and key.endswith(downs) and tensor.dim() >= 2:
            return _CROSS_ATTENTION_WIDTHS.get(tensor.shape[1])
    return None


def _names_family(state_dict: Mapping[str, torch.Tensor]) -> ModelFamily:
    """SDXL when the keys use its names (``lora_te1_``/``lora_te2_``, SGM UNet blocks, ``text_encoder_2.``)."""
    sdxl = ("lora_te1_", "lora_te2_", "text_encoder_2.", *_SGM_BLOCKS)
    return SDXL if any(key.startswith(sdxl) for key in state_dict) else SD15


def detect_lora_family(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                       label: str = "The LoRA") -> ModelFamily:
    """The model family a LoRA was made for: from its metadata, else the cross-attention width, else its names.

    Other architectures (SD2.x, the SDXL refiner, SD3, Flux ...) raise :class:`LoRAArchitectureError`.
    """
    found = _metadata_family(metadata or {}) or _width_family(state_dict) or _names_family(state_dict)
    if isinstance(found, str):
        supported = " or ".join(family.label for family in FAMILIES.values())
        raise LoRAArchitectureError(f"{label} was made for {found}, not for an {supported}-family model.")
    return found


def _peft_prefixes(family: ModelFamily) -> dict[str, str]:
    """diffusers/peft key prefixes and the kohya prefix of the same part (``text_encoder_2.`` -> ``lora_te2_``)."""
    prefixes = {"unet.": UNET_PREFIX, **{slot.subfolder + ".": slot.lora_prefix for slot in family.text_encoders}}
    return dict(sorted(prefixes.items(), key=lambda item: -len(item[0])))  # text_encoder_2. before text_encoder.


def _module_key(key: str, peft_prefixes: Mapping[str, str]) -> tuple[str, str] | None:
    """(kohya module name, part) of a tensor key, or None for a key that is not a LoRA weight."""
    if key.startswith(_KOHYA_PREFIXES):
        for suffix, part in _KOHYA_SUFFIXES.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], part
        return None
    for suffix, part in _PEFT_SUFFIXES.items():
        if key.endswith(suffix):
            name = _peft_to_kohya_name(key[: -len(suffix)], peft_prefixes)
            return None if name is None else (name, part)
    return None


def _peft_to_kohya_name(name: str, peft_prefixes: Mapping[str, str]) -> str | None:
    for prefix, kohya_prefix in peft_prefixes.items():
        if name.startswith(prefix):
            return kohya_prefix + name[len(prefix):].replace(".", "_")
    if "." in name:  # an unprefixed peft state dict of a UNet (hgdpo's training checkpoints)
        return UNET_PREFIX + name.replace(".", "_")
    return None


def _refuse_unsupported(state_dict: Mapping[str, torch.Tensor], label: str) -> None:
    for key in state_dict:
        for marker, kind in _UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise LoRAArchitectureError(
                    f"{label} is a {kind} network ({key!r}); only plain LoRA (down/up) is supported here. "
                    "Load it with your frontend's own LoRA loader instead."
                )
        for prefix, architecture in _FOREIGN_PREFIXES.items():
            if key.startswith(prefix):
                raise LoRAArchitectureError(f"{label} was made for {architecture} ({key!r}), not for an SD1.5 "
                                            "or SDXL model.")


def refuse_family_mismatch(lora_family: ModelFamily, model_family: ModelFamily, label: str = "The LoRA") -> None:
    """One message for a LoRA of one family on a model of the other (every frontend checks this first)."""
    if lora_family is not model_family:
        raise LoRAArchitectureError(
            f"{label} is an {lora_family.label} LoRA, but the model is an {model_family.label} model. Use the "
            f"{lora_family.label} checkpoint it was trained on, or a LoRA trained for this {model_family.label} model."
        )


def lora_from_state_dict(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                         path: str = "", family: ModelFamily | None = None) -> LoRAFile:
    """Group a LoRA state dict (kohya or peft/diffusers names) into :class:`LoRAModule` s.

    The LoRA's family is detected (:func:`detect_lora_family`); with ``family`` given, a LoRA of another
    family is refused (:func:`refuse_family_mismatch`).
    """
    metadata = dict(metadata or {})
    label = path or "The LoRA"
    _refuse_unsupported(state_dict, label)
    found = detect_lora_family(state_dict, metadata, label)
    if family is not None:
        refuse_family_mismatch(found, family, label)
    peft_prefixes = _peft_prefixes(found)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module_key = _module_key(key, peft_prefixes)
        if module_key is not None:
            name, part = module_key
            parts.setdefault(name, {})[part] = tensor
    if not parts:
        raise LoRAArchitectureError(
            f"{label} holds no LoRA weights (keys such as {list(state_dict)[:3]}); is it a LoRA file?"
        )
    modules = {}
    for name, tensors in parts.items():
        if "down" not in tensors or "up" not in tensors:
            missing = "up" if "down" in tensors else "down"
            raise LoRAArchitectureError(f"{label}: module {name} lacks its {missing} weight.")
        alpha = tensors.get("alpha")
        modules[name] = LoRAModule(tensors["down"], tensors["up"], None if alpha is None else float(alpha))
    return LoRAFile(modules=modules, metadata=metadata, path=path, family=found)


def read_lora(path: str | Path, family: ModelFamily | None = None) -> LoRAFile:
    """Read a LoRA ``.safetensors`` file (kohya or peft/diffusers layout) and refuse other architectures
    (and, with ``family`` given, a LoRA of the other family)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found.")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRAs are read from .safetensors files only (pickled files can carry code).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable .safetensors file: {error}") from error
    return lora_from_state_dict(state_dict, metadata, str(path), family)


def unet_kohya_modules(unet: nn.Module, family: ModelFamily) -> dict[str, nn.Module]:
    """A diffusers UNet's Linear and Conv2d layers keyed by kohya name without ``lora_unet_``.

    Both namings a LoRA file may use resolve: the family's kohya names (SDXL: SGM paths such as
    ``input_blocks_4_1_...``) and diffusers' module paths with dots as underscores (SD1.x kohya, peft files).
    """
    modules = layers(unet)
    names = {path.replace(".", "_"): module for path, module in modules.items()}
    names.update({kohya[len(UNET_PREFIX):]: modules[path] for path, kohya in family.kohya_unet_names(unet).items()})
    return names


def _width_hint(width: int) -> str:
    found = _CROSS_ATTENTION_WIDTHS.get(width)
    return f" It looks like a LoRA for {getattr(found, 'label', found)}." if found else ""


def _describe_mismatch(lora: dict[str, LoRAModule], modules: Mapping[str, nn.Module], label: str) -> str:
    cross = [module for name, module in lora.items() if name.endswith(("attn2_to_k", "attn2_to_v"))]
    missing = sorted(set(lora) - set(modules))
    hint = _width_hint(cross[0].down.shape[1]) if cross else ""
    return (f"{label} does not fit this model ({len(missing)} of {len(lora)} modules unknown, "
            f"e.g. {missing[:3]}).{hint}")


def _check_shape(name: str, weights: LoRAModule, module: nn.Module, label: str) -> None:
    if isinstance(module, nn.Linear):
        expected_down, expected_up = (weights.rank, module.in_features), (module.out_features, weights.rank)
    else:
        expected_down = (weights.rank, module.in_channels, *weights.down.shape[2:])
        expected_up = (module.out_channels, weights.rank, 1, 1)
    if tuple(weights.down.shape[:2]) != expected_down[:2] or tuple(weights.up.shape[:2]) != expected_up[:2]:
        hint = _width_hint(weights.down.shape[1]) if name.endswith(("attn2_to_k", "attn2_to_v")) else ""
        raise LoRAArchitectureError(
            f"{label}: module {name} has shapes down {tuple(weights.down.shape)} / up {tuple(weights.up.shape)}, "
            f"but the model's layer needs down {expected_down} / up {expected_up}.{hint}"
        )


def check_compute_dtype(dtype: torch.dtype, label: str = "The LoRA") -> None:
    """Refuse to compute a LoRA term in a storage-only dtype (fp8): see :class:`FollowingLoRA`."""
    if dtype in FP8_DTYPES:
        raise TypeError(f"{label}: cannot compute a LoRA in {dtype}; it is added in the dtype the layer computes "
                        "in (give FollowingLoRA a compute_dtype for layers stored in fp8).")


class FunctionalLoRA:
    """A LoRA added to layer outputs by forward hooks, with a scalar or per-sample scale.

    ``scale`` may be a float, or a 1-D tensor with one entry per sample of the batch (the first
    dimension of every hooked layer's input): ``[0, 0, w, w]`` evaluates the base model on the first
    half of a batch and the LoRA model on the second half in one forward.
    """

    def __init__(self, modules: Mapping[str, nn.Module], lora: Mapping[str, LoRAModule],
                 scale: float | torch.Tensor = 1.0, label: str = "The LoRA") -> None:
        unknown = set(lora) - set(modules)
        if unknown:
            raise LoRAArchitectureError(_describe_mismatch(dict(lora), modules, label))
        for name, weights in lora.items():
            _check_shape(name, weights, modules[name], label)
        self.scale: float | torch.Tensor = scale
        self._handles = []
        for name, weights in lora.items():
            module = modules[name]
            parameter = next(module.parameters())
            check_compute_dtype(parameter.dtype, label)
            down = weights.down.to(parameter.device, parameter.dtype)
            up = (weights.up * weights.multiplier).to(parameter.device, parameter.dtype)
            self._handles.append(module.register_forward_hook(self._hook(module, down, up)))

    def _hook(self, module: nn.Module, down: torch.Tensor, up: torch.Tensor):
        if isinstance(module, nn.Conv2d):
            def delta(x: torch.Tensor) -> torch.Tensor:
                hidden = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                return F.conv2d(hidden, up.reshape(*up.shape[:2], 1, 1))
        else:
            def delta(x: torch.Tensor) -> torch.Tensor:
                return F.linear(F.linear(x, down), up)

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            nonlocal down, up
            if down.device != inputs[0].device or down.dtype != inputs[0].dtype:  # a layer moved or cast since
                down, up = (weight.to(inputs[0].device, inputs[0].dtype) for weight in (down, up))
            scale = self.scale
            if isinstance(scale, torch.Tensor):
                scale = scale.to(output.device, output.dtype).reshape(-1, *([1] * (output.dim() - 1)))
            elif scale == 0.0:
                return output
            return output + scale * delta(inputs[0])

        return hook

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)


class _View:
    """Hooks registered on a view go to the real layer; its one parameter carries the compute placement."""

    def _bind(self, layer: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.__dict__["_layer"] = layer  # not a submodule
        self.placement = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)

    def register_forward_hook(self, hook, *args, **kwargs):
        return self.__dict__["_layer"].register_forward_hook(hook, *args, **kwargs)


class _LinearView(_View, nn.Linear):
    def __init__(self, layer: nn.Module, device: torch.device, dtype: torch.dtype):
        self._bind(layer, device, dtype)
        self.in_features, self.out_features = layer.in_features, layer.out_features


class _ConvView(_View, nn.Conv2d):
    def __init__(self, layer: nn.Module, device: torch.device, dtype: torch.dtype):
        self._bind(layer, device, dtype)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(layer, name))


def layer_view(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An ``nn.Linear``/``nn.Conv2d`` stand-in for ``layer`` placed on ``device``/``dtype`` (see module doc)."""
    if isinstance(layer, nn.Conv2d) or hasattr(layer, "in_channels"):
        return _ConvView(layer, device, dtype)
    return _LinearView(layer, device, dtype)


def _weight(layer: nn.Module) -> torch.Tensor | None:
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(layer.parameters(), None)


class FollowingLoRA:
    """``FunctionalLoRA`` on ``modules`` (name -> layer, named as in ``lora``), kept where the layers compute.

    It is attached at once on the layers' weights' placement (``compute_dtype`` overrides the dtype), so a
    LoRA that does not fit fails early. A forward pre-hook on every target layer compares the layer's
    input with that placement and re-attaches everything on the input's device and dtype when they
    differ: a model moved to the GPU, cast, or computing in another dtype than it stores (Forge's and
    ComfyUI's manual cast, fp8 storage) gets its LoRA where it computes. ``scale`` may be changed between calls;
    ``remove()`` detaches everything.
    """

    def __init__(self, modules: Mapping[str, nn.Module], lora: Mapping[str, LoRAModule],
                 scale: float | torch.Tensor = 0.0, label: str = "The LoRA", compute_dtype: torch.dtype | None = None):
        self._modules = dict(modules)
        self._lora = dict(lora)
        self._label = label
        self._scale = scale
        self._placement = None
        self._inner: FunctionalLoRA | None = None
        probe = next((self._modules[name] for name in self._lora if name in self._modules), None)
        weight = None if probe is None else _weight(probe)
        self._attach(None if weight is None else (weight.device, compute_dtype or weight.dtype))
        self._guards = [self._modules[name].register_forward_pre_hook(self._follow)
                        for name in self._lora if name in self._modules]

    def _targets(self, placement) -> dict[str, nn.Module]:
        if placement is None:
            return self._modules
        device, dtype = placement
        targets = {}
        for name, module in self._modules.items():
            weight = _weight(module) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
            if weight is not None and weight.device == device and weight.dtype == dtype:
                targets[name] = module
            else:
                targets[name] = layer_view(module, device, dtype)
        return targets

    def _attach(self, placement) -> None:
        if self._inner is not None:
            self._inner.remove()
        self._inner = FunctionalLoRA(self._targets(placement), self._lora, self._scale, self._label)
        self._placement = placement

    def _follow(self, _module, inputs) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and (x.device, x.dtype) != self._placement:
            self._attach((x.device, x.dtype))

    @property
    def placement(self):
        return self._placement

    @property
    def scale(self) -> float | torch.Tensor:
        return self._scale

    @scale.setter
    def scale(self, value: float | torch.Tensor) -> None:
        self._scale = value
        if self._inner is not None:
            self._inner.scale = value

    def remove(self) -> None:
        for guard in self._guards:
            guard.remove()
        self._guards = []
        if self._inner is not None:
            self._inner.remove()
            self._inner = None

    def __len__(self) -> int:
        return 0 if self._inner is None else len(self._inner)


def attach_lora(unet: nn.Module, text_encoders: Sequence[nn.Module], lora: LoRAFile,
                scale: float = 1.0) -> tuple[FunctionalLoRA, FunctionalLoRA | None]:
    """Hook a LoRA file onto a diffusers UNet and, when it has text-encoder weights, onto the family's
    transformers CLIP text encoders (``text_encoders`` in the order of ``lora.family.text_encoders``)."""
    label = lora.path or "The LoRA"
    unet_lora = FunctionalLoRA(unet_kohya_modules(unet, lora.family), lora.unet, scale, label)
    text_lora = None
    if lora.text_encoder:
        if len(text_encoders) != len(lora.family.text_encoders):
            raise ValueError(f"{label} adapts the text encoders, but {len(text_encoders)} of the "
                             f"{lora.family.label} model's {len(lora.family.text_encoders)} were given.")
        modules = lora.family.kohya_text_encoder_layers(text_encoders)
        # files written from transformers 5 models may lack kohya's text_model_ level
        modules.update({name.replace("_text_model_", "_", 1): module for name, module in list(modules.items())})
        text_lora = FunctionalLoRA(modules, lora.text_encoder, scale, label)
    return unet_lora, text_lora


def describe(lora: LoRAFile) -> str:
    """One line for logs: module counts, rank, and hgdpo's training metadata when present."""
    ranks = sorted({module.rank for module in lora.modules.values()})
    hgdpo = {key[len("hgdpo."):]: value for key, value in lora.metadata.items() if key.startswith("hgdpo.")}
    return (f"{Path(lora.path).name or 'LoRA'}: {len(lora.unet)} UNet + {len(lora.text_encoder)} text-encoder "
            f"modules, {lora.family.label}, rank {ranks}" + (f", {json.dumps(hgdpo)}" if hgdpo else ""))
