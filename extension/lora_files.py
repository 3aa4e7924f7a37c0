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

from hgdpo.models.families import ModelFamily
from hgdpo.models.lora_runtime import LoRAArchitectureError, LoRAFile, read_lora

SUFFIX = ".safetensors"
HASH_LENGTH = 12

_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}
_loaded: dict[tuple, LoRAFile] = {}


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


def _is_path(text: str) -> bool:
    """Whether a LoRA name is written as a path (absolute, ``..``, a drive or backslashes): never accepted."""
    parts = text.replace("\\", "/").split("/")
    return text.startswith(("/", "~")) or "\\" in text or ":" in text or ".." in parts


def resolve(name: str, folder: str | Path, lora_hash: str | None = None) -> LoRAEntry:
    """The LoRA file of the Lora folder a name means, or FileNotFoundError listing what the folder holds.

    Only files :func:`list_loras` lists are ever returned: a name written as a path (absolute, with ``..``,
    ``~``, a drive letter) is refused before anything is read, so an API caller cannot make the WebUI open
    a file elsewhere. Tried in order: the exact name (``.safetensors`` optional); the same name without
    sub-folders; when ``lora_hash`` is given, a file with that hash.
    """
    folder = Path(folder)
    text = (name or "").strip()
    if _is_path(text):
        raise FileNotFoundError(
            f"HG-DPO LoRA {text!r} is a path; give the name of a file in {folder} (the WebUI's Lora folder), "
            "as the HG-DPO accordion lists it."
        )
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


def _read_checked(path: Path, family: ModelFamily | None) -> LoRAFile:
    """The file read by :func:`hgdpo.models.lora_runtime.read_lora` (a LoRA of another family than ``family``,
    when given, refused with one message), refused too when it holds no UNet weights."""
    lora = read_lora(path, family)
    if not lora.unet:
        raise LoRAArchitectureError(
            f"{path} holds no UNet weights (only {len(lora.text_encoder)} text-encoder modules); an HG-DPO LoRA "
            "adapts the UNet."
        )
    return lora


def load(path: str | Path, family: ModelFamily | None = None) -> LoRAFile:
    """The LoRA read by :func:`hgdpo.models.lora_runtime.read_lora`, cached while the file is unchanged.

    Raises ``LoRAArchitectureError`` (a LoRA of another family than ``family``, SD2, LyCORIS, ...) or
    ``ValueError`` with the file named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HG-DPO LoRA file {path} not found.")
    key = (*_key(path), getattr(family, "name", None))
    with _lock:
        if key in _loaded:
            return _loaded[key]
    lora = _read_checked(path, family)
    with _lock:
        _loaded.clear()  # keep one LoRA in memory
        _loaded[key] = lora
    return lora


@dataclass(frozen=True)
class LoRASummary:
    """What the status route reports of one file: its short hash, ``hgdpo.*`` metadata and model family
    (``SD1.5``/``SDXL``), or why it cannot be used."""

    hash: str | None
    hgdpo: dict[str, str]
    problem: str | None
    family: str | None


_summaries: dict[tuple, LoRASummary] = {}


def _summarize(path: Path, family: ModelFamily | None) -> LoRASummary:
    try:
        digest = short_hash(path)
    except OSError as error:
        return LoRASummary(None, {}, str(error), None)
    try:
        lora = _read_checked(path, family)  # not load(): keeps its cache
    except (LoRAArchitectureError, ValueError, OSError) as error:
        return LoRASummary(digest, {}, str(error), None)
    return LoRASummary(digest, hgdpo_metadata(lora), None, lora.family.label)


def summaries(entries: list[LoRAEntry], family: ModelFamily | None = None) -> list[LoRASummary]:
    """A summary of each entry for a model of ``family`` (a LoRA of the other family has a problem; None: any
    family), read once per file version (cached by path, size, mtime and family).

    The cache keeps only the files of the latest call, so it holds one entry per file of the Lora folder.
    """
    keyed = []
    for entry in entries:
        try:
            keyed.append(((*_key(entry.path), getattr(family, "name", None)), entry.path))
        except OSError:  # vanished since it was listed
            keyed.append((None, entry.path))
    with _lock:
        known = {key: _summaries[key] for key, _path in keyed if key in _summaries}
    result = []
    for key, path in keyed:
        if key is None:
            result.append(LoRASummary(None, {}, f"HG-DPO LoRA file {path} not found.", None))
            continue
        if key not in known:
            known[key] = _summarize(path, family)
        result.append(known[key])
    with _lock:
        _summaries.clear()
        _summaries.update(known)
    return result


def hgdpo_metadata(lora: LoRAFile) -> dict[str, str]:
    """The ``hgdpo.*`` metadata hgdpo's trainer writes (empty for LoRAs from elsewhere)."""
    return {key[len("hgdpo."):]: value for key, value in lora.metadata.items() if key.startswith("hgdpo.")}
