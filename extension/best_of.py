"""Best-of-N in the WebUI: where the PickScore weights are, and which candidates to keep. Framework-free.

The WebUI generates each output image's N candidates in one batch (the batch size is multiplied by N,
so candidate k of image j is row ``j * N + k`` and has seed ``seed + j * N + k``); every group of N rows
is ranked by :func:`hgdpo.feedback.selection.rank_candidates` with the scorer, and the best row is kept (or all
rows, best first, when the user asks to see the candidates).

PickScore's files live in one folder (default ``models/pickscore`` of the WebUI)::

    models/pickscore/PickScore_v1/                          config.json + model.safetensors (or pytorch_model.bin)
    models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K/       preprocessor_config.json + tokenizer files
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hgdpo.feedback.selection import rank_candidates
from hgdpo.feedback import scorers
from hgdpo.feedback.scorers import ScorerWeightsError

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.feedback.scorers import Scorer


def pickscore_folders(root: str | Path) -> tuple[Path, Path]:
    """(model folder, processor folder) of PickScore under ``root`` (:func:`hgdpo.feedback.scorers.pickscore_folders`),
    or ScorerWeightsError saying what to fetch and where to set another folder."""
    try:
        return scorers.pickscore_folders(root)
    except ScorerWeightsError as error:
        raise ScorerWeightsError(
            f"Best-of-N scores the candidates with PickScore. {error}\nOr set another folder in the HG-DPO accordion "
            "(scorer weights) or in Settings > HG-DPO."
        ) from error


class ScorerFolderError(ValueError):
    """A PickScore folder asked for outside the folders the WebUI allows."""


def check_scorer_folder(folder: str | Path, allowed: Sequence[str | Path]) -> Path:
    """``folder`` made absolute, or ScorerFolderError when it lies in none of the ``allowed`` folders.

    Compared after normalising ``..`` away (``models/../../etc`` is outside), before anything in it is
    looked at, so the error says nothing about what the folder holds. Links inside an allowed folder are
    followed like the WebUI follows them in its models folder: only the admin can create those.
    """
    path = Path(os.path.abspath(Path(folder).expanduser()))
    roots = [Path(os.path.abspath(Path(root).expanduser())) for root in allowed]
    if any(path == root or root in path.parents for root in roots):
        return path
    raise ScorerFolderError(
        f"HG-DPO PickScore folder {str(folder)!r} is outside the folders the WebUI allows for it "
        f"({', '.join(str(root) for root in roots)}). Put PickScore under one of them, or set its folder in "
        "Settings > HG-DPO."
    )


_scorers: dict[tuple, Scorer] = {}
_scorer_lock = threading.Lock()


def cached_scorer(root: str | Path, device: str, dtype, loader: Callable[..., Scorer] | None = None) -> Scorer:
    """The PickScore scorer of ``root`` on ``device``, loaded once (one scorer kept in memory)."""
    model, processor = pickscore_folders(root)
    key = (str(model.resolve()), str(processor.resolve()), str(device), str(dtype))
    with _scorer_lock:
        if key not in _scorers:
            if loader is None:
                loader = scorers.load_scorer
            _scorers.clear()
            _scorers[key] = loader("pickscore", model=str(model), processor=str(processor), device=device, dtype=dtype)
        return _scorers[key]


def unload_scorers() -> None:
    with _scorer_lock:
        _scorers.clear()


@dataclass(frozen=True)
class Pick:
    """One kept image: its row in the generated batch, its score, its rank in its group (0 = best)."""

    row: int
    score: float
    rank: int


def select(scorer: Scorer, prompts: Sequence[str], images: Sequence[Image], best_of: int, keep_all: bool) -> list[Pick]:
    """Rank every group of ``best_of`` consecutive candidates; keep each group's best (or all, best first).

    ``prompts[i]`` is the prompt of ``images[i]``. The result is in output order: group by group.
    """
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}.")
    if len(images) % best_of:
        raise ValueError(f"{len(images)} candidates do not split into groups of {best_of}.")
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts for {len(images)} candidates.")
    picks = []
    for start in range(0, len(images), best_of):
        group = slice(start, start + best_of)
        ranked = rank_candidates(scorer, list(prompts[group]), list(images[group]))
        kept = ranked if keep_all else ranked[:1]
        picks.extend(Pick(start + candidate.index, candidate.score, rank) for rank, candidate in enumerate(kept))
    return picks
