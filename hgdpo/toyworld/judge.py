"""The held-out judge: analytic checks of a figure against its prompt, computed on the pixels.

Never used for training or for building datasets: it measures what HG-DPO did not optimise. The
figure is separated from the (known) background; the prompt's pose is fitted at every position the
world allows, and six checks are made:

* ``pose``: the prompt's pose fits the figure better than any other pose;
* ``limbs``: each of the four limbs of the fitted pose is drawn (share of limbs found, 0-1);
* ``no_extra``: almost nothing is drawn outside the fitted figure (extra or detached parts);
* ``connected``: the figure is one piece;
* ``colour``: the shirt is the prompt's colour (nearest palette colour);
* ``shape``: the fitted figure overlaps what is drawn (IoU >= 0.6; melted figures fail).

The score is the mean of the checks (1 = a correct figure); ``correct`` means every check passed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL.Image import Image

from hgdpo.toyworld import world

CHECKS = ("pose", "limbs", "no_extra", "connected", "colour", "shape")
FIGURE_THRESHOLD = 40  # max channel difference from the background that counts as figure
SHIFTS = [(dx, dy) for dx in range(-4, 5) for dy in range(-2, 3)]
MIN_PART = 3  # smaller specks are ignored by the connectivity check
EXTRA_SHARE = 0.04  # figure pixels outside the fitted figure (grown by a pixel), as a share of its area


@dataclass(frozen=True)
class Template:
    """The masks of a correct figure of one pose at one position."""

    whole: np.ndarray
    limbs: tuple[np.ndarray, ...]
    torso: np.ndarray
    near: np.ndarray  # the whole figure grown by one pixel


def _mask(figure: world.Figure) -> np.ndarray:
    return np.asarray(world.figure_layer(figure)[1]) > 127


def _grow(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


@lru_cache(maxsize=None)
def template(pose: str, shift: tuple[int, int]) -> Template:
    """The masks of ``pose`` with its anchor moved by ``shift`` pixels."""
    figure = world.figure_for(world.Scene("person", "red", pose, "grass"), shift)
    whole = _mask(figure)
    bare = _mask(replace(figure, limbs=()))
    limbs = tuple(_mask(replace(figure, limbs=(limb,))) & ~bare for limb in figure.limbs)
    ax, ay = figure.anchor
    left, top, right, bottom = world.TORSO
    torso = np.zeros_like(whole)
    rows = slice(int(round(ay + top)) + 1, int(round(ay + bottom)) - 1)
    torso[rows, int(round(ax + left)) + 1 : int(round(ax + right)) - 1] = True
    return Template(whole, limbs, torso & bare, _grow(whole))


def figure_mask(pixels: np.ndarray, background: str) -> np.ndarray:
    """Pixels that differ from the prompt's background by more than :data:`FIGURE_THRESHOLD`."""
    base = np.asarray(world.background_image(background), np.int16)
    return np.abs(pixels.astype(np.int16) - base).max(-1) > FIGURE_THRESHOLD


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def best_fit(mask: np.ndarray, pose: str) -> tuple[float, Template]:
    """The highest IoU of ``pose``'s template with ``mask`` over the allowed positions, and that template."""
    fits = [(_iou(mask, template(pose, shift).whole), shift) for shift in SHIFTS]
    iou, shift = max(fits)
    return iou, template(pose, shift)


def count_parts(mask: np.ndarray, min_size: int = MIN_PART) -> int:
    """Connected pieces (4-neighbourhood) of at least ``min_size`` pixels."""
    seen = np.zeros_like(mask)
    parts = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        parts += size >= min_size
    return parts


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(world.COLOURS)
    distances = [np.abs(rgb - np.array(world.COLOURS[name])).sum() for name in names]
    return names[int(np.argmin(distances))]


def judge(prompt: str, image: Image) -> dict[str, float]:
    """Every check (1.0 passed, 0.0 failed; ``limbs`` is the share of limbs found), ``score`` and ``correct``."""
    scene = world.parse_prompt(prompt)
    pixels = np.asarray(image.convert("RGB").resize((world.SIZE, world.SIZE)), np.uint8)
    mask = figure_mask(pixels, scene.background)
    fits = {pose: best_fit(mask, pose) for pose in world.POSES}
    iou, fitted = fits[scene.pose]
    outside = (mask & ~fitted.near).sum() / max(1, fitted.whole.sum())
    torso = pixels[fitted.torso & mask]
    checks = {
        "pose": float(iou >= max(value[0] for value in fits.values())),
        "limbs": float(np.mean([(mask & limb).sum() >= 0.5 * limb.sum() for limb in fitted.limbs])),
        "no_extra": float(outside < EXTRA_SHARE),
        "connected": float(count_parts(mask) == 1),
        "colour": float(len(torso) > 0 and nearest_colour(torso.mean(0)) == scene.colour),
        "shape": float(iou >= 0.6),
    }
    return {**checks, "iou": iou, "score": float(np.mean(list(checks.values()))),
            "correct": float(all(value == 1.0 for value in checks.values()))}


class AnatomyJudge:
    """The judge as a scorer (``hgdpo.toyworld.judge:AnatomyJudge``), for evaluation only: its score is 0-1."""

    name = "toyworld-judge"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        del device  # pure numpy

    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image.")
        return torch.tensor([judge(prompt, image)["score"] for prompt, image in zip(prompts, images)])
