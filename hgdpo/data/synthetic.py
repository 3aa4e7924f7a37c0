"""Synthetic preference data for plumbing tests: warm, smooth winners and cold-noise losers.

The README's demo is the toy world's (:mod:`hgdpo.toyworld.demo`); these triplets only exercise the data
format and the trainer's mechanics with the random-weight model of :mod:`hgdpo.models.tiny`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hgdpo.data.writers import TripletWriter

DEMO_PROMPTS = (
    "a portrait photo of a smiling woman",
    "a man in a suit standing in a park",
    "two children playing on the beach",
    "an old man reading a newspaper",
    "a girl with a red umbrella in the rain",
    "a chef cooking in a restaurant kitchen",
    "a group of friends laughing at a table",
    "a full body shot of a dancer on stage",
)


def smooth_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A warm, smooth gradient: the synthetic winner."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.5, 1.0, size=3)
    pixels = np.stack([base[0] * (0.6 + 0.4 * x), base[1] * (0.4 + 0.3 * y), 0.2 * base[2] * np.ones_like(x)], -1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def noisy_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Cold high-frequency noise: the synthetic loser."""
    pixels = rng.uniform(0, 1, size=(size, size, 3)) * np.array([0.3, 0.5, 1.0])
    return Image.fromarray((pixels * 255).astype(np.uint8))


def write_synthetic_triplets(directory: str | Path, num_pairs: int = 32, size: int = 64, seed: int = 0) -> Path:
    """A triplet dataset in the project's format with synthetic winners and losers."""
    rng = np.random.default_rng(seed)
    with TripletWriter(directory, pool_size=4, scorer="synthetic warm-vs-cold", model="tiny", overwrite=True) as writer:
        for i in range(num_pairs):
            win_score = float(rng.uniform(0.8, 1.0))
            scores = [win_score, 0.6, 0.4, 0.2]
            writer.add(DEMO_PROMPTS[i % len(DEMO_PROMPTS)], smooth_image(rng, size), noisy_image(rng, size),
                       win_score, 0.2, scores=scores, win_seed=2 * i, lose_seed=2 * i + 1)
    return Path(directory)
