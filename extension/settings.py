"""The HG-DPO accordion's values: parsing, checking, infotext, X/Y/Z overrides. Framework-free.

The script's arguments, in the order of its UI components (what the API's ``alwayson_scripts`` takes)::

    "alwayson_scripts": {"HG-DPO": {"args": [lora, weight, lan_strength, best_of, scorer_dir, show_candidates]}}

or, for API users, one dict in place of the list: ``{"args": [{"lora": "hgdpo_v1", "weight": 0.5}]}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from hgdpo.inference.infotext import BEST_OF_KEY, LAN_KEY, LORA_HASH_KEY, LORA_KEY, SCORE_KEY, WEIGHT_KEY
from hgdpo.inference.infotext import format_score  # noqa: F401 - the score text the extension writes, as the CLI
from hgdpo.models.families import SD15, SDXL, ModelFamily

SCRIPT_TITLE = "HG-DPO"
LAN_SUFFIX = " (HG-DPO LAN)"
LAN_BASE_SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE")
"""Samplers that get a LAN twin: k-diffusion samplers with exactly one model call per step, so each
call of the denoiser starts a step and LAN can renormalise the DPO latent there (second-order samplers
also call the model at intermediate points, which LAN must not touch)."""

DEFAULT_WEIGHT = 0.5
DEFAULT_LAN_STRENGTH = 1.0
WEIGHT_RANGE = (0.0, 2.0)
MAX_BEST_OF = 32
NO_LORA = "None"
XYZ_OVERRIDES = "hgdpo_overrides"
"""Attribute of the processing object where X/Y/Z axes put their values (they win over the accordion)."""

ARG_ORDER = ("lora", "weight", "lan_strength", "best_of", "scorer_dir", "show_candidates")


class SettingsError(ValueError):
    """A value of the HG-DPO accordion (or of its API arguments) is out of range or of the wrong type."""


def lan_sampler_name(base: str) -> str:
    return base + LAN_SUFFIX


def is_lan_sampler(name: str | None) -> bool:
    return bool(name) and name.endswith(LAN_SUFFIX)


def base_sampler_name(name: str) -> str:
    return name[: -len(LAN_SUFFIX)] if is_lan_sampler(name) else name


@dataclass(frozen=True)
class Settings:
    """What the accordion (or the API, or an X/Y/Z cell) asks for."""

    lora: str = ""
    weight: float = DEFAULT_WEIGHT
    lan_strength: float = DEFAULT_LAN_STRENGTH
    best_of: int = 1
    scorer_dir: str = ""
    show_candidates: bool = False

    @property
    def has_lora(self) -> bool:
        return bool(self.lora) and self.lora != NO_LORA


def _number(name: str, value: Any, kind: type) -> float | int:
    if isinstance(value, bool):
        raise SettingsError(f"HG-DPO {name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"HG-DPO {name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise SettingsError(f"HG-DPO {name} must be finite, got {value!r}.")
    if kind is int:
        if number != int(number):
            raise SettingsError(f"HG-DPO {name} must be a whole number, got {value!r}.")
        return int(number)
    return number


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def check(settings: Settings) -> Settings:
    """The settings with normalised types, or :class:`SettingsError` naming the bad value and the range."""
    weight = _number("LoRA weight", settings.weight, float)
    low, high = WEIGHT_RANGE
    if not low <= weight <= high:
        raise SettingsError(f"HG-DPO LoRA weight must lie in [{low}, {high}], got {weight}.")
    strength = _number("LAN strength", settings.lan_strength, float)
    if not 0.0 <= strength <= 1.0:
        raise SettingsError(f"HG-DPO LAN strength must lie in [0, 1] (1 = the paper's LAN, 0 = off), got {strength}.")
    best_of = _number("best-of N", settings.best_of, int)
    if not 1 <= best_of <= MAX_BEST_OF:
        raise SettingsError(f"HG-DPO best-of N must lie in [1, {MAX_BEST_OF}] (1 = off), got {best_of}.")
    lora = "" if settings.lora in (None, NO_LORA) else str(settings.lora).strip()
    scorer_dir = "" if settings.scorer_dir is None else str(settings.scorer_dir).strip()
    return Settings(lora, weight, strength, best_of, scorer_dir, _flag(settings.show_candidates))


def from_args(args: Sequence[Any], defaults: Settings | None = None) -> Settings:
    """Settings from the script's arguments (the UI's values, or an API ``args`` list or dict).

    Missing trailing arguments and ``None`` take the defaults; a dict as the first argument is read by
    field name. Unknown dict keys are an error, so a typo does not pass silently.
    """
    defaults = defaults or Settings()
    values = {field.name: getattr(defaults, field.name) for field in fields(Settings)}
    # gradio updates ({"__type__": "update", "value": ...}) stand for their value
    args = [arg.get("value") if isinstance(arg, Mapping) and "__type__" in arg else arg for arg in args]
    if args and isinstance(args[0], Mapping):
        unknown = sorted(set(args[0]) - set(values))
        if unknown:
            raise SettingsError(f"Unknown HG-DPO argument(s) {unknown}; known: {list(ARG_ORDER)}.")
        values.update({key: value for key, value in args[0].items() if value is not None})
    else:
        for name, value in zip(ARG_ORDER, args):
            if value is not None:
                values[name] = value
    return check(Settings(**values))


def with_overrides(settings: Settings, overrides: Mapping[str, Any] | None) -> Settings:
    """The settings with X/Y/Z axis values applied (they win over the accordion)."""
    if not overrides:
        return settings
    unknown = sorted(set(overrides) - {field.name for field in fields(Settings)})
    if unknown:
        raise SettingsError(f"Unknown HG-DPO override(s) {unknown}.")
    return check(replace(settings, **overrides))


def infotext_fields(settings: Settings, lora_name: str | None, lora_hash: str | None, lan: bool) -> dict[str, Any]:
    """The ``HG-DPO ...`` generation parameters of one job (the score is per image, added elsewhere)."""
    result: dict[str, Any] = {}
    if lan:
        result[LORA_KEY] = lora_name
        result[LORA_HASH_KEY] = lora_hash
        result[WEIGHT_KEY] = _short(settings.weight)
        result[LAN_KEY] = _short(settings.lan_strength)
    if settings.best_of > 1:
        result[BEST_OF_KEY] = settings.best_of
    return result


def _short(value: float) -> str:
    """0.5 -> '0.5', 1.0 -> '1', 0.30000000000000004 -> '0.3'."""
    return f"{value:.4g}"


def from_infotext(params: Mapping[str, str]) -> dict[str, Any]:
    """Accordion values read back from a parsed infotext (PNG Info, "send to txt2img", API ``infotext``).

    Only the keys present come back; values that do not parse are left out rather than failing a paste.
    ``lora_hash`` is returned too, so the caller can find the file under another name.
    """
    result: dict[str, Any] = {}
    if params.get(LORA_KEY):
        result["lora"] = str(params[LORA_KEY])
    if params.get(LORA_HASH_KEY):
        result["lora_hash"] = str(params[LORA_HASH_KEY])
    for key, name, kind in (
        (WEIGHT_KEY, "weight", float),
        (LAN_KEY, "lan_strength", float),
        (BEST_OF_KEY, "best_of", int),
    ):
        if key in params:
            try:
                result[name] = _number(name, params[key], kind)
            except SettingsError:
                continue
    return result


_REFUSED_FLAGS = (("is_sd3", "SD3"), ("is_ssd", "SSD-1B (an SDXL distillation without the middle block's attention)"),
                  ("is_sd2", "SD2.x"))
"""Flags the WebUIs set on a loaded model of a family the LAN samplers refuse (A1111 sets ``is_ssd`` next to
``is_sdxl``, so these are read first)."""
SDXL_CONTEXT_WIDTH = 2048
"""Cross-attention context width of the SDXL base family (CLIP-L 768 + OpenCLIP bigG 1280); the refiner has 1280."""
_FAMILY_FLAGS = (("is_sdxl", SDXL), ("is_sd1", SD15))


def model_family_problem(model: Any, title: str = "the loaded checkpoint", context_width: int | None = None) -> str | None:
    """Why the LAN samplers cannot run on the WebUI's ``sd_model`` (not SD1.x or SDXL base), or None.

    A1111 and Forge both flag the loaded model with ``is_sd1``/``is_sd2``/``is_sdxl``/``is_sd3`` (A1111 also
    ``is_ssd``); Forge's Flux and Chroma engines set none of them. The SDXL refiner is flagged ``is_sdxl``
    too: ``context_width`` (its UNet's cross-attention width, :data:`SDXL_CONTEXT_WIDTH` for SDXL base,
    Pony, Illustrious and NoobAI) tells it apart.
    """
    if model is None:
        return "No checkpoint is loaded; the HG-DPO LAN samplers need an SD1.5- or SDXL-family checkpoint."
    refused = next((name for attribute, name in _REFUSED_FLAGS if getattr(model, attribute, False) is True), None)
    family = model_family(model)
    if refused is None and family is SDXL and context_width not in (None, SDXL_CONTEXT_WIDTH):
        refused = f"an SDXL refiner (cross-attention width {context_width}, not {SDXL_CONTEXT_WIDTH})"
    if refused is None and family is not None:
        return None
    refused = refused or f"not an SD1.x or SDXL model ({type(model).__name__})"
    return (f"The HG-DPO LAN samplers need an SD1.5- or SDXL-family checkpoint (SDXL base, Pony, Illustrious, "
            f"NoobAI ...), but {title} is {refused}. Load such a checkpoint, or choose a sampler without "
            "'(HG-DPO LAN)'.")


def model_family(model: Any) -> ModelFamily | None:
    """The family (:data:`hgdpo.models.families.SD15` or ``SDXL``) the WebUI's flags give ``model``, or None."""
    return next((family for attribute, family in _FAMILY_FLAGS if getattr(model, attribute, False) is True), None)


def raw_best_of(args: Sequence[Any]) -> int:
    """The best-of-N the arguments ask for, however malformed the rest is (1 when unreadable)."""
    value = args[0].get("best_of") if args and isinstance(args[0], Mapping) else (args[3] if len(args) > 3 else 1)
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 1


PASTE_KEYS = (LORA_KEY, LORA_HASH_KEY, WEIGHT_KEY, LAN_KEY, BEST_OF_KEY)
"""Infotext keys the accordion reads back (the score describes one image and is not pasted)."""
ALL_KEYS = (*PASTE_KEYS, SCORE_KEY)
