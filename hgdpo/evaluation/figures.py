"""The pictures both reports draw: contact sheets of image pairs, thumbnails, matplotlib figures, links.

Used by the dataset report (:mod:`hgdpo.evaluation.dataset_report`) and the evaluation report
(:mod:`hgdpo.evaluation.report`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["THUMB_SIZE", "ContactRow", "fit_thumbnail", "format_value", "new_figure", "relative_link",
           "render_contact_sheet"]

THUMB_SIZE = 192


@dataclass
class ContactRow:
    """One row of the contact sheet: a pair's prompt, (thumbnail) images and scores."""

    prompt: str
    win: Image.Image
    lose: Image.Image
    win_score: float | None = None
    lose_score: float | None = None


def fit_thumbnail(image: Image.Image, size: int) -> Image.Image:
    """An RGB copy of ``image`` shrunk to fit a ``size`` x ``size`` square (aspect ratio kept)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    return thumb


def format_value(value: float | None) -> str:
    """A score or statistic in a table or caption: 4 significant digits, ``n/a`` when missing or not finite."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def render_contact_sheet(rows: Sequence[ContactRow], cell: int = THUMB_SIZE,
                         labels: tuple[str, str] = ("win", "lose")) -> Image.Image:
    """A grid image, one pair per row: winner | loser, each labelled with its score, and the prompt above.

    ``labels`` name the two columns (e.g. ``("baseline", "candidate")`` for a model comparison).
    """
    font = ImageFont.load_default()
    text_h, pad = 14, 4
    row_h = text_h + cell + text_h + 2 * pad
    width = 2 * cell + 3 * pad
    sheet = Image.new("RGB", (width, max(1, len(rows)) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    max_chars = max(8, width // 6)
    if not rows:
        draw.text((pad, pad), "no pairs", fill="black", font=font)
    for r, row in enumerate(rows):
        top = r * row_h
        prompt = row.prompt if len(row.prompt) <= max_chars else row.prompt[: max_chars - 3] + "..."
        draw.text((pad, top + pad), f"{r}: {prompt}", fill="black", font=font)
        for c, (label, image, score) in enumerate(((labels[0], row.win, row.win_score),
                                                   (labels[1], row.lose, row.lose_score))):
            left = pad + c * (cell + pad)
            thumb = fit_thumbnail(image, cell)
            sheet.paste(thumb, (left + (cell - thumb.width) // 2, top + pad + text_h + (cell - thumb.height) // 2))
            draw.text((left, top + pad + text_h + cell + 1), f"{label} {format_value(score)}",
                      fill=(0, 110, 0) if c == 0 else (170, 0, 0), font=font)
        draw.line([(0, top + row_h - 1), (width, top + row_h - 1)], fill=(200, 200, 200))
    return sheet

def new_figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib figure on the Agg canvas (``width`` x ``height`` inches at 100 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # Agg: no display needed; pyplot's global state is never touched
    return figure

def relative_link(target: Path, base: Path) -> str | None:
    """``target`` as a ``/``-separated link relative to the folder ``base``, or None (another drive on Windows)."""
    try:
        return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return None
