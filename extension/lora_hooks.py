"""A functional LoRA that follows its model across devices and dtypes, on any frontend's layers.
Framework-free (torch only).

:class:`hgdpo.models.lora_runtime.FunctionalLoRA` puts the LoRA weights on the device and dtype of each layer
when it is attached, and knows ``nn.Linear``/``nn.Conv2d`` layers. The WebUIs differ on both counts:

* they move models at run time (A1111's ``--medvram``/``--lowvram`` move the UNet to the GPU in forward
  pre-hooks, Forge loads it in ``sampling_prepare``) and may compute in another dtype than they store
  (Forge's manual cast, A1111's fp8 storage), so :class:`FollowingLoRA` watches the inputs of the
  layers it adapts and re-attaches the FunctionalLoRA where they compute;
* Forge builds its models with its own layer classes (``ForgeOperations.Linear`` is a plain
  ``nn.Module``) and may store weights in another dtype than it computes in; for those layers, and
  whenever a compute dtype is given, FunctionalLoRA gets a *view* (:func:`layer_view`): an
  ``nn.Linear``/``nn.Conv2d``-shaped stand-in with the layer's geometry and the compute placement
  whose hooks go to the real layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hgdpo.models.ldm_names import layers
from hgdpo.models.lora_runtime import FunctionalLoRA, LoRAModule

_UNSUPPORTED_DTYPES = {
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
}


def clip_text_kohya_names(encoder: nn.Module) -> dict[str, nn.Module]:
    """A transformers ``CLIPTextModel``'s layers keyed as kohya names them (``text_model_encoder_layers_0_...``).

    transformers 5 dropped the ``text_model.`` level of the module paths; kohya's names keep it. Layers of
    frontend-specific classes (Forge's) are included.
    """
    names = {name.replace(".", "_"): module for name, module in layers(encoder).items()}
    if names and not any(name.startswith("text_model_") for name in names):
        names = {"text_model_" + name: module for name, module in names.items()}
    return names


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
    """``FunctionalLoRA`` on ``modules`` (kohya name -> layer), kept on the device and dtype the layers compute in.

    It is attached at once on the layers' weights' placement (``compute_dtype`` overrides the dtype), so a
    LoRA that does not fit fails early. A forward pre-hook on every target layer compares the layer's
    input with that placement and re-attaches everything on the input's device and dtype when they
    differ: a model moved to the GPU, cast, or computing in another dtype than it stores (Forge's manual
    cast, A1111's fp8 storage) gets its LoRA where it computes. ``scale`` may be changed between calls;
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
        if placement is not None and placement[1] in _UNSUPPORTED_DTYPES:
            raise TypeError(f"{self._label}: cannot compute a LoRA in {placement[1]}.")
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
