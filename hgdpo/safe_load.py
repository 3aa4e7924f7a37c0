"""Reading pickled ``.pt``/``.ckpt``/``.pth`` files only where ``torch.load(weights_only=True)`` is safe.

``weights_only=True`` is what makes a pickle safe to open, but before torch 2.6 a crafted file could still run
code through it (CVE-2025-32434). ``pyproject.toml`` asks for torch>=2.6; the hosts (AUTOMATIC1111 1.10.1 ships
torch 2.1.2) bring their own, so every pickle this project reads goes through :func:`load_pickle`, which refuses
on an older torch and names the safetensors way instead. Safetensors files need none of this.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

SAFE_TORCH = (2, 6)


def torch_version() -> tuple[int, int]:
    """The running torch's (major, minor), e.g. ``(2, 14)`` for ``2.14.1+cpu``."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def load_pickle(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True, **kwargs)``, refused on a torch older than 2.6."""
    if torch_version() < SAFE_TORCH:
        raise ValueError(
            f"{path}: pickled files are read only with torch>=2.6, where weights_only=True is safe (this is torch "
            f"{torch.__version__}). Upgrade torch, or convert the file to .safetensors."
        )
    return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
