"""Colour shift of a model's images: mean hue, saturation and value (HG-DPO paper, Table 2).

HSV is defined as Python's :mod:`colorsys` defines it (and PIL's ``"HSV"`` mode, up to PIL's 8-bit
rounding): for RGB in [0, 1], ``V = max``, ``S = (max - min) / max`` (0 for black), and the hue is the
angle on the colour hexagon, red = 0, yellow = 60, green = 120, cyan = 180, blue = 240, magenta = 300
degrees. Greys (``max == min``) get hue 0, as in :mod:`colorsys` and PIL. Hue is reported in **degrees**
[0, 360) and averaged arithmetically (not as an angle), like the other channels, so the mean hue is the
mean of the hue channel of an HSV image. Saturation and value are in [0, 1].

The percentage change of a mean against the baseline's, ``100 * (candidate - baseline) / baseline``, is
the same whatever linear scale the channel uses (degrees, colorsys' [0, 1), PIL's 0-255), so Table 2's
figures do not depend on that choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

CHANNELS = ("hue", "saturation", "value")


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """:func:`colorsys.rgb_to_hsv` on an array ``[..., 3]`` of RGB in [0, 1]: ``[..., 3]`` of (h, s, v), h in [0, 1)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    spread = high - low
    grey = spread == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(grey, 1.0, spread)  # black is grey: max == 0 only when max == min
        saturation = np.where(grey, 0.0, spread / np.where(grey, 1.0, high))
        rc, gc, bc = (high - red) / safe, (high - green) / safe, (high - blue) / safe
    hue = np.select([red == high, green == high], [bc - gc, 2.0 + rc - bc], default=4.0 + gc - rc)
    hue = np.where(grey, 0.0, (hue / 6.0) % 1.0)
    return np.stack([hue, saturation, high], axis=-1)


def mean_hsv(image: Image) -> np.ndarray:
    """Mean (hue in degrees, saturation, value) over the pixels of one image (converted to RGB)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    hsv = rgb_to_hsv(pixels).reshape(-1, 3).mean(axis=0)
    return hsv * np.array([360.0, 1.0, 1.0])


def images_mean_hsv(images: Iterable[Image]) -> np.ndarray:
    """Per-image mean (hue degrees, saturation, value): an array ``[N, 3]``."""
    rows = [mean_hsv(image) for image in images]
    return np.array(rows) if rows else np.zeros((0, 3))


def percent_change(candidate: float, baseline: float) -> float | None:
    """Table 2's change of a mean against the baseline's, in percent (None when the baseline is 0)."""
    return None if baseline == 0 else float(100.0 * (candidate - baseline) / baseline)


def colour_shift(per_image: dict[str, np.ndarray], baseline: str) -> dict[str, dict[str, float | None]]:
    """Each model's mean hue / saturation / value over its images and their change against ``baseline`` in %.

    Args:
        per_image: model label -> ``[N, 3]`` per-image means from :func:`images_mean_hsv`.
        baseline: the label of the SFT / baseline model.
    """
    means = {label: values.mean(axis=0) for label, values in per_image.items()}
    table = {}
    for label, mean in means.items():
        row: dict[str, float | None] = {name: float(mean[k]) for k, name in enumerate(CHANNELS)}
        for k, name in enumerate(CHANNELS):
            row[f"{name}_change_percent"] = percent_change(float(mean[k]), float(means[baseline][k]))
        table[label] = row
    return table
