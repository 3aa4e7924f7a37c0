"""The HG-DPO LoRA files of the WebUI's Lora folder: listing, naming, hashing, reading. Framework-free.

A LoRA is named as the WebUI's Lora tab names it: its path relative to the Lora folder, without the
``.safetensors`` suffix (``hgdpo_v1``, ``people/hgdpo_v1``). Images record the name and a short hash
(the first 12 hex digits of the file's SHA-256, as the WebUI's own ``Lora hashes``), so a paste finds
the file again after a rename.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from hgdpo.lora_runtime import LoRAArchitectureError, LoRAFile, read_lora

SUFFIX = ".safetensors"
HASH_LENGTH = 12

_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}
_loaded: dict[tuple[str, int, int], LoRAFile] = {}


@dataclass(frozen=True)
class LoRAEntry:
    name: str
    path: Path


def list_loras(folder: str | Path) -> list[LoRAEntry]:
    """Every ``.safetensors`` file under ``folder`` (recursively), sorted by name; [] if no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for file in files:
            if file.endswith(SUFFIX) and not file.startswith("."):
                path = Path(root) / file
                entries.append(LoRAEntry(path.relative_to(folder).as_posix()[: -len(SUFFIX)], path))
    return sorted(entries, key=lambda entry: entry.name.lower())


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def short_hash(path: str | Path) -> str:
    """First 12 hex digits of the file's SHA-256 (cached while the file is unchanged)."""
    path = Path(path)
    key = _key(path)
    with _lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()[:HASH_LENGTH]
    with _lock:
        _hashes[key] = value
    return value


def resolve(name: str, folder: str | Path, lora_hash: str | None = None) -> LoRAEntry:
    """The LoRA file a name (or path) means, or FileNotFoundError listing what the folder holds.

    Tried in order: a path to an existing ``.safetensors`` file; the exact name; the same name without
    sub-folders; when ``lora_hash`` is given, a file with that hash.
    """
    folder = Path(folder)
    text = (name or "").strip()
    if text.endswith(SUFFIX) and Path(text).is_file():
        path = Path(text)
        return LoRAEntry(path.stem, path)
    text = text.removesuffix(SUFFIX)
    entries = list_loras(folder)
    for entry in entries:
        if entry.name == text:
            return entry
    stem = text.rsplit("/", 1)[-1]
    matches = [entry for entry in entries if entry.path.stem == stem]
    if len(matches) == 1:
        return matches[0]
    if lora_hash:
        for entry in entries:
            if short_hash(entry.path).startswith(lora_hash.lower()[:HASH_LENGTH]):
                return entry
    available = ", ".join(entry.name for entry in entries[:20]) or "none"
    if not text:
        raise FileNotFoundError(
            f"No HG-DPO LoRA chosen. Pick one in the HG-DPO accordion (LoRA files of {folder}: {available}), "
            f"or pass it as the first argument of the 'HG-DPO' script."
        )
    raise FileNotFoundError(
        f"HG-DPO LoRA {text!r} not found in {folder} (the WebUI's Lora folder). Available: {available}."
    )


def load(path: str | Path) -> LoRAFile:
    """The LoRA read by :func:`hgdpo.lora_runtime.read_lora`, cached while the file is unchanged.

    Raises ``LoRAArchitectureError`` (SDXL, SD2, LyCORIS, ...) or ``ValueError`` with the file named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HG-DPO LoRA file {path} not found.")
    key = _key(path)
    with _lock:
        if key in _loaded:
            return _loaded[key]
    lora = read_lora(path)
    if not lora.unet:
        raise LoRAArchitectureError(
            f"{path} holds no UNet weights (only {len(lora.text_encoder)} text-encoder modules); an HG-DPO LoRA "
            "adapts the UNet."
        )
    with _lock:
        _loaded.clear()  # keep one LoRA in memory
        _loaded[key] = lora
    return lora


def hgdpo_metadata(lora: LoRAFile) -> dict[str, str]:
    """The ``hgdpo.*`` metadata hgdpo's trainer writes (empty for LoRAs from elsewhere)."""
    return {key[len("hgdpo."):]: value for key, value in lora.metadata.items() if key.startswith("hgdpo.")}
