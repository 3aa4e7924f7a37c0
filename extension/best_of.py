"""Best-of-N in the WebUI: where the PickScore weights are, and which candidates to keep. Framework-free.

The WebUI generates each output image's N candidates in one batch (the batch size is multiplied by N,
so candidate k of image j is row ``j * N + k`` and has seed ``seed + j * N + k``); every group of N rows
is ranked by :func:`hgdpo.data.selection.rank_candidates` with the scorer, and the best row is kept (or all
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

from hgdpo.feedback.scorers import DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR, ScorerWeightsError
from hgdpo.data.selection import rank_candidates

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.feedback.scorers import Scorer

MODEL_FOLDER = DEFAULT_PICKSCORE_MODEL.split("/")[-1]  # PickScore_v1
PROCESSOR_FOLDER = DEFAULT_PICKSCORE_PROCESSOR.split("/")[-1]  # CLIP-ViT-H-14-laion2B-s32B-b79K
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in _WEIGHTS)


def _has_processor(folder: Path) -> bool:
    tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    return tokenizer and any((folder / name).is_file() for name in _PROCESSOR)


def pickscore_folders(root: str | Path) -> tuple[Path, Path]:
    """(model folder, processor folder) of PickScore under ``root``, or ScorerWeightsError saying what to fetch.

    ``root`` may also be the PickScore_v1 folder itself when it holds the processor files too.
    """
    root = Path(root).expanduser()
    if _has_model(root) and _has_processor(root):
        return root, root
    model = root / MODEL_FOLDER
    processor = root / PROCESSOR_FOLDER
    if _has_model(model) and (_has_processor(processor) or _has_processor(model)):
        return model, processor if _has_processor(processor) else model
    missing = []
    if not _has_model(model):
        missing.append(f"{model} (config.json and model.safetensors or pytorch_model.bin)")
    if not _has_processor(processor) and not _has_processor(model):
        missing.append(f"{processor} (preprocessor_config.json and the tokenizer files)")
    raise ScorerWeightsError(
        "Best-of-N scores the candidates with PickScore, whose files are missing: "
        + "; ".join(missing)
        + ". Fetch them once on a machine with internet access:\n"
        + f"    huggingface-cli download {DEFAULT_PICKSCORE_MODEL} --local-dir {model}\n"
        + f'    huggingface-cli download {DEFAULT_PICKSCORE_PROCESSOR} --include "*.json" "*.txt"'
        + f" --local-dir {processor}\n"
        + "(with huggingface_hub >= 1.0 the command is `hf download`, and --include takes one pattern each). "
        + "Or set another folder in the HG-DPO accordion (scorer weights) or in Settings > HG-DPO."
    )


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
                from hgdpo.feedback.scorers import load_scorer as loader
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
