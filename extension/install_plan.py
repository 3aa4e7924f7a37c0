"""What ``install.py`` installs into the WebUI's environment: only what is missing. Framework-free.

The WebUI pins torch, gradio and transformers itself; installing or upgrading any of them from an
extension breaks WebUIs, so they are never on the plan. Everything HG-DPO needs at run time in the WebUI
(torch, safetensors, Pillow, numpy, and transformers for PickScore) ships with AUTOMATIC1111 and Forge;
``hgdpo`` itself is not installed (its ``pyproject.toml`` asks for newer transformers/diffusers for the
trainer): the extension imports the ``hgdpo`` folder of this repository directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PROTECTED = frozenset({"torch", "torchvision", "torchaudio", "gradio", "transformers", "xformers", "numpy", "pillow",
                       "diffusers", "accelerate", "safetensors-nightly"})


@dataclass(frozen=True)
class Requirement:
    distribution: str
    spec: str
    why: str


REQUIREMENTS = (
    Requirement("safetensors", "safetensors>=0.3.1", "reading LoRA files"),
)
MIN_TRANSFORMERS_FOR_PICKSCORE = (4, 26)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(char for char in piece if char.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def plan(is_installed: Callable[[str], bool]) -> list[Requirement]:
    """The requirements to install: the missing ones, never a protected package."""
    return [
        req for req in REQUIREMENTS if req.distribution.lower() not in PROTECTED and not is_installed(req.distribution)
    ]


def advisories(version_of: Callable[[str], str | None]) -> list[str]:
    """Messages about what the extension will not install and what that disables."""
    messages = []
    transformers = version_of("transformers")
    if transformers is None:
        messages.append("HG-DPO: transformers is not installed in this WebUI, so best-of-N (PickScore) is unavailable; "
                        "the extension does not install it (the WebUI pins its own version).")
    elif _version_tuple(transformers) < MIN_TRANSFORMERS_FOR_PICKSCORE:
        need = ".".join(map(str, MIN_TRANSFORMERS_FOR_PICKSCORE))
        messages.append(f"HG-DPO: this WebUI has transformers {transformers}; best-of-N (PickScore) needs >= {need}. "
                        "The extension does not upgrade it (the WebUI pins its own version); LAN sampling works.")
    return messages
