"""Encode a preference dataset once: VAE latents of both images and the prompt's text embedding.

The dataset's images and prompts never change during training, so encoding them through the VAE
and the text encoder at every step (as diffusers' ``train_diffusion_dpo.py`` does) is wasted work.
They are encoded once into chunk files under a folder keyed by the model, the dataset and the
resolution; an interrupted build keeps its finished chunks, and with several processes each rank
encodes its own share of the chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from hgdpo.fileio import atomic_path
from hgdpo.errors import TrainingError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
CHUNK_SIZE = 64


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
def encode_prompts(prompts: list[str], tokenizer, text_encoder) -> torch.Tensor:
    """CLIP last hidden states ``[N, 77, 768]``, as SD1.5's UNet consumes them."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_images(images: torch.Tensor, vae) -> torch.Tensor:
    """Scaled VAE latents (the posterior mean times the scaling factor)."""
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


class EncodedPairs(torch.utils.data.Dataset):
    """The encoded dataset: item ``i`` is ``{"win", "lose", "text"}`` tensors of the i-th kept pair."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        manifest = json.loads((self.directory / "manifest.json").read_text())
        self.skipped: dict[int, str] = {int(index): reason for index, reason in manifest["skipped"].items()}
        self._files = [safe_open(str(self.directory / name), framework="pt") for name in manifest["chunks"]]
        self._rows = [
            (c, row) for c, handle in enumerate(self._files) for row in range(handle.get_slice("win").get_shape()[0])
        ]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        chunk, row = self._rows[position]
        handle = self._files[chunk]
        return {name: handle.get_slice(name)[row : row + 1][0] for name in ("win", "lose", "text")}


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
    from safetensors.torch import save_file

    from hgdpo.dataset import CorruptImageError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_chunks = math.ceil(len(dataset) / CHUNK_SIZE)
    mine = [c for c in range(num_chunks) if c % world_size == rank and not _chunk_path(directory, c).exists()]
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
            batches = [prompts[i : i + encode_batch_size] for i in range(0, len(prompts), encode_batch_size)]
            embeddings = [encode_prompts(batch, components.tokenizer, components.text_encoder) for batch in batches]
            tensors["text"] = torch.cat(embeddings).to(torch.float16).cpu()
        with atomic_path(_chunk_path(directory, chunk)) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"skipped": json.dumps(skipped)}
            )
        if bar:
            bar.update(CHUNK_SIZE)
    if bar:
        bar.close()


def finalize_cache(directory: str | Path, num_items: int) -> EncodedPairs:
    """Check that every chunk exists, write the manifest, and open the encoded dataset."""
    from safetensors import safe_open

    directory = Path(directory)
    names = [_chunk_path(directory, c).name for c in range(math.ceil(num_items / CHUNK_SIZE))]
    missing = [name for name in names if not (directory / name).exists()]
    if missing:
        raise TrainingError(f"Latent cache {directory} is incomplete: {missing[:3]} missing.")
    non_empty, skipped = [], {}
    for name in names:
        with safe_open(str(directory / name), framework="pt") as handle:
            skipped.update(json.loads(handle.metadata()["skipped"]))
            if "win" in handle.keys():
                non_empty.append(name)
    if not (directory / "manifest.json").exists():
        with atomic_path(directory / "manifest.json") as tmp:
            tmp.write_text(json.dumps({"chunks": non_empty, "skipped": skipped}))
    encoded = EncodedPairs(directory)
    if not len(encoded):
        raise ValueError("No usable pair in the dataset: every pair had a missing or corrupt image.")
    return encoded


def _chunk_path(directory: Path, chunk: int) -> Path:
    return directory / f"chunk-{chunk:06d}.safetensors"
