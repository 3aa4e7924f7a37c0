"""Encode a preference dataset once: VAE latents of both images and the prompt's text embedding (SDXL: and its
pooled embedding, ``pooled``; the size conditioning is rebuilt from the training size).

The dataset's images and prompts never change during training, so encoding them through the VAE
and the text encoder at every step (as diffusers' ``train_diffusion_dpo.py`` does) is wasted work.
They are encoded once into chunk files under a folder keyed by the model, the dataset and the
resolution; an interrupted build keeps its finished chunks, and with several processes each rank
encodes its own share of the chunks.

Each chunk records a sha256 of its tensors in its own metadata. A rank checks its existing chunks before
it trusts them: a corrupt or truncated one (a bad disk, a killed copy) is logged and encoded again.
:func:`cache_report` and :func:`prune_cache` (``python trainer/cache.py``) list and delete old caches;
they touch only cache folders of this format under ``<cache root>/encoded``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from hgdpo.errors import TrainingError
from hgdpo.fileio import atomic_path, remove_stale_temporaries

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # 3: chunks carry a sha256 of their tensors
CHUNK_SIZE = 64
ENCODED_DIRNAME = "encoded"
_KEY_PATTERN = re.compile(r"^[0-9a-f]{20}$")
_CACHE_FILE_PATTERN = re.compile(r"^(chunk-\d{6}\.safetensors|manifest\.json)$")


def preprocess_image(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (width, height) keeping the aspect ratio, centre-crop, scale to [-1, 1]."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def cache_key(model_fingerprint: str, dataset_fingerprint: str, size: tuple[int, int]) -> str:
    """Folder name of a cache: changes whenever the model, the data or the resolution changes."""
    text = json.dumps([CACHE_FORMAT_VERSION, model_fingerprint, dataset_fingerprint, list(size)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.no_grad()
def encode_text(prompts: list[str], components) -> dict[str, torch.Tensor]:
    """The cached text tensors of ``prompts``: ``text`` (the context) and, for SDXL, ``pooled`` (float16, CPU)."""
    context, pooled = components.family.encode_text(prompts, components.tokenizers, components.text_encoder_modules)
    tensors = {"text": context} if pooled is None else {"text": context, "pooled": pooled}
    return {name: tensor.to(torch.float16).cpu() for name, tensor in tensors.items()}


@torch.no_grad()
def encode_images(images: torch.Tensor, vae) -> torch.Tensor:
    """Scaled VAE latents (the posterior mean times the scaling factor)."""
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


class EncodedPairs(torch.utils.data.Dataset):
    """The encoded dataset: item ``i`` is ``{"win", "lose", "text"}`` tensors of the i-th kept pair."""

    def __init__(self, directory: str | Path):

        self.directory = Path(directory)
        manifest = json.loads((self.directory / "manifest.json").read_text())
        self.skipped: dict[int, str] = {int(index): reason for index, reason in manifest["skipped"].items()}
        self._files = [_open_chunk(self.directory / name) for name in manifest["chunks"]]
        self._names = [set(handle.keys()) for handle in self._files]  # noqa: SIM118 (safe_open is not iterable)
        self._rows = [
            (c, row) for c, handle in enumerate(self._files) for row in range(handle.get_slice("win").get_shape()[0])
        ]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        chunk, row = self._rows[position]
        handle = self._files[chunk]
        return {name: handle.get_slice(name)[row : row + 1][0] for name in ("win", "lose", "text", "pooled")
                if name in self._names[chunk]}


def build_cache(
    dataset,
    components,
    size: tuple[int, int],
    directory: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    bad_images: str = "skip",
    encode_batch_size: int = 8,
    progress: Callable | None = None,
) -> None:
    """Encode this rank's chunks of ``dataset`` into ``directory``; finished chunks are kept.

    Corrupt or missing images skip their pair (recorded with the reason in the chunk, so a later run
    with ``bad_images="stop"`` still sees it) or, with ``bad_images="stop"``, raise the dataset's error
    naming the file.
    """

    from hgdpo.data.format import CorruptImageError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    num_chunks = math.ceil(len(dataset) / CHUNK_SIZE)
    mine = [c for c in range(num_chunks) if c % world_size == rank and not _chunk_is_sound(_chunk_path(directory, c))]
    bar = progress(total=len(mine) * CHUNK_SIZE, desc="encoding dataset", unit="pair") if progress and mine else None
    for chunk in mine:
        indices, wins, loses, prompts, skipped = [], [], [], [], {}
        for index in range(chunk * CHUNK_SIZE, min(len(dataset), (chunk + 1) * CHUNK_SIZE)):
            try:
                win, lose = dataset.load_pair(index)
            except CorruptImageError as error:
                if bad_images == "stop":
                    raise
                logger.warning("Skipping pair %d: %s", index, error)
                skipped[index] = str(error)
                continue
            indices.append(index)
            wins.append(preprocess_image(win, size))
            loses.append(preprocess_image(lose, size))
            prompts.append(dataset.prompt(index))
        tensors = {"index": torch.tensor(indices, dtype=torch.int64)}
        if indices:
            for name, images in (("win", wins), ("lose", loses)):
                tensors[name] = torch.cat(
                    [encode_images(torch.stack(images[i : i + encode_batch_size]), components.vae)
                     for i in range(0, len(images), encode_batch_size)]
                ).to(torch.float16).cpu()
            batches = [encode_text(prompts[i : i + encode_batch_size], components)
                        for i in range(0, len(prompts), encode_batch_size)]
            tensors.update({name: torch.cat([batch[name] for batch in batches]) for name in batches[0]})
        _write_chunk(_chunk_path(directory, chunk), tensors, skipped)
        if bar:
            bar.update(CHUNK_SIZE)
    if bar:
        bar.close()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _write_chunk(path: Path, tensors: dict[str, torch.Tensor], skipped: dict[int, str]) -> None:
    """Write one chunk atomically with its checksum; a full disk becomes one clear error, nothing half-written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"skipped": json.dumps(skipped), "sha256": tensors_sha256(tensors)}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as error:
        raise TrainingError(f"Could not write latent cache chunk {path} ({error}). Free disk space or give "
                            "--cache-dir on a larger disk; the finished chunks are kept and the same command "
                            "continues.") from None


def _chunk_is_sound(path: Path) -> bool:
    """Whether a chunk exists and its tensors match its checksum; a bad one is logged (and re-encoded)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("sha256")
        if expected == tensors_sha256(load_file(str(path))):
            return True
        reason = "checksum mismatch"
    except (OSError, SafetensorError, ValueError) as error:
        reason = f"unreadable: {error}"
    logger.warning("Latent cache chunk %s is corrupt (%s); encoding it again.", path, reason)
    return False


def _open_chunk(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as error:
        raise TrainingError(f"Latent cache chunk {path} is unreadable ({error}); delete that file and run the "
                            "same command again to encode it anew.") from None


def finalize_cache(directory: str | Path, num_items: int) -> EncodedPairs:
    """Check that every chunk exists, write the manifest, and open the encoded dataset."""
    directory = Path(directory)
    names = [_chunk_path(directory, c).name for c in range(math.ceil(num_items / CHUNK_SIZE))]
    missing = [name for name in names if not (directory / name).exists()]
    if missing:
        raise TrainingError(f"Latent cache {directory} is incomplete: {missing[:3]} missing.")
    non_empty, skipped = [], {}
    for name in names:
        with _open_chunk(directory / name) as handle:
            skipped.update(json.loads(handle.metadata()["skipped"]))
            if "win" in handle.keys():
                non_empty.append(name)
    manifest = directory / "manifest.json"
    if not manifest.exists():
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps({"chunks": non_empty, "skipped": skipped}))
    os.utime(manifest)  # "last used", for cache_report and prune_cache
    encoded = EncodedPairs(directory)
    if not len(encoded):
        raise ValueError("No usable pair in the dataset: every pair had a missing or corrupt image.")
    return encoded


def _chunk_path(directory: Path, chunk: int) -> Path:
    return directory / f"chunk-{chunk:06d}.safetensors"


@dataclass(frozen=True)
class CacheEntry:
    """One encoded dataset under ``<cache root>/encoded``."""

    path: Path
    size_bytes: int
    last_used: float  # POSIX time of the newest file in it


def cache_entries(root: str | Path) -> list[CacheEntry]:
    """The encoded-dataset caches under ``root/encoded``, least recently used first.

    Only folders this module writes count: a 20-hex-digit name holding nothing but chunks, a manifest
    and our temporaries; anything else (a link, a foreign folder or file) is left out and never pruned.
    """
    base = Path(root) / ENCODED_DIRNAME
    if not base.is_dir() or base.is_symlink():
        return []
    entries = []
    for folder in base.iterdir():
        if folder.is_symlink() or not folder.is_dir() or not _KEY_PATTERN.match(folder.name):
            continue
        files = list(folder.iterdir())
        if any(f.is_symlink() or not f.is_file() or not _CACHE_FILE_PATTERN.match(f.name)
               and not f.name.startswith(".") for f in files):
            continue
        stats = [f.stat() for f in files]
        entries.append(CacheEntry(folder, sum(st.st_size for st in stats),
                                  max([st.st_mtime for st in stats] + [folder.stat().st_mtime])))
    return sorted(entries, key=lambda entry: entry.last_used)


def prune_cache(root: str | Path, older_than_days: float, *, dry_run: bool = False) -> list[CacheEntry]:
    """Delete the caches under ``root/encoded`` not used for ``older_than_days`` days; return them."""
    if not math.isfinite(older_than_days) or older_than_days < 0:
        raise ValueError(f"--older-than {older_than_days}: give a number of days >= 0.")
    cutoff = time.time() - older_than_days * 86400
    old = [entry for entry in cache_entries(root) if entry.last_used < cutoff]
    if not dry_run:
        for entry in old:
            shutil.rmtree(entry.path)
    return old
