"""Win rates with ties counted as half, and their bootstrap 95% interval.

Used by the metric evaluation (paper Tables 1, 3, 5, 6: the share of prompts on which the candidate's
image scores higher than the baseline's) and by the user study (Figure 3: the share of votes for the
candidate). An outcome is 1 (candidate wins), 0 (baseline wins) or 0.5 (tie).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class WinRate:
    """The candidate's win rate over ``count`` comparisons with a percentile-bootstrap interval."""

    rate: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int

    @property
    def count(self) -> int:
        return self.wins + self.losses + self.ties

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "count": self.count}


#: The outcome of a tie: half a win.
TIE = 0.5


def half_tie_rate(wins: int | np.ndarray, ties: int | np.ndarray, total: int) -> float | np.ndarray:
    """The win rate with ties counting half: ``(wins + ties / 2) / total`` (also element-wise on count arrays)."""
    return (wins + TIE * ties) / total


def outcomes_from_scores(candidate: Sequence[float], baseline: Sequence[float],
                         tie_tolerance: float = 0.0) -> np.ndarray:
    """Per-pair outcomes 1 / 0.5 / 0 from two aligned score lists (ties within ``tie_tolerance``)."""
    candidate_scores = np.asarray(candidate, dtype=np.float64)
    baseline_scores = np.asarray(baseline, dtype=np.float64)
    if candidate_scores.shape != baseline_scores.shape:
        raise ValueError(f"Score lists differ in length: {candidate_scores.shape} vs {baseline_scores.shape}.")
    difference = candidate_scores - baseline_scores
    return np.where(np.abs(difference) <= tie_tolerance, TIE, (difference > 0).astype(np.float64))


def win_rate(outcomes: Sequence[float], resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Mean outcome (ties = 0.5) and its percentile-bootstrap ``confidence`` interval (:func:`win_rate_of_counts`)."""
    values = np.asarray(outcomes, dtype=np.float64)
    if not np.isin(values, (0.0, TIE, 1.0)).all():
        raise ValueError("Outcomes must be 1 (win), 0.5 (tie) or 0 (loss).")
    wins, ties, losses = (int((values == value).sum()) for value in (1.0, TIE, 0.0))
    return win_rate_of_counts(wins, losses, ties, resamples, confidence, seed)


def win_rate_of_counts(wins: int, losses: int, ties: int, resamples: int = 10_000, confidence: float = 0.95,
                       seed: int = 0) -> WinRate:
    """The win rate of ``wins``, ``losses`` and ``ties`` (:func:`half_tie_rate`) and its bootstrap interval.

    The bootstrap resamples the comparisons with replacement ``resamples`` times with a fixed
    ``seed``, so a report is reproducible. A resample of three-valued outcomes is a multinomial
    draw of (wins, ties, losses), so it is drawn as one, in O(resamples) memory.
    """
    total = wins + losses + ties
    if total == 0:
        raise ValueError("A win rate needs at least one comparison.")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(total, np.array([wins, ties, losses]) / total, size=resamples)
    means = half_tie_rate(counts[:, 0], counts[:, 1], total)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return WinRate(rate=float(half_tie_rate(wins, ties, total)), low=float(low), high=float(high), wins=wins,
                   losses=losses, ties=ties)
