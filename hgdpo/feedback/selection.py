"""Best-of-N selection with a scorer (PickScore by default): the inference-time use of AI feedback.

Every frontend generates its N candidates its own way and calls :func:`rank_candidates`, so the
scoring and ordering rules live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.feedback.scorers import Scorer


@dataclass(frozen=True)
class ScoredImage:
    """A candidate with its raw scorer value and its position in the generated batch."""

    image: Image
    score: float
    index: int


def rank_candidates(scorer: Scorer, prompt: str | Sequence[str], images: Sequence[Image]) -> list[ScoredImage]:
    """Score every candidate against its prompt and return them best first.

    ``prompt`` is one prompt for all images or one per image. Scores are the scorer's raw values
    (for PickScore: ``logit_scale * cos``, never softmaxed across the batch), so they compare across
    runs. Equal scores keep generation order.
    """
    if not images:
        raise ValueError("Best-of-N needs at least one candidate image, got an empty batch.")
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images.")
    scores = scorer.score(prompts, list(images)).tolist()
    ranked = [ScoredImage(image, float(score), index) for index, (image, score) in enumerate(zip(images, scores))]
    return sorted(ranked, key=lambda candidate: (-candidate.score, candidate.index))
