"""Win rates with ties counted as half, and their 95% intervals.

Used by the metric evaluation (paper Tables 1, 3, 5, 6: the share of prompts on which the candidate's
image scores higher than the baseline's) and by the user study (Figure 3: the share of votes for the
candidate). An outcome is 1 (candidate wins), 0 (baseline wins) or 0.5 (tie).

With several seeds per prompt the comparisons are not independent: one seed's noise shapes the images of
every prompt, and one prompt's difficulty every seed. :func:`crossed_win_rate` then treats prompts and
seeds as crossed random factors rather than the comparisons as independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

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
    wins, losses, ties = tally(outcomes)
    return win_rate_of_counts(wins, losses, ties, resamples, confidence, seed)


def tally(outcomes: Sequence[float] | np.ndarray) -> tuple[int, int, int]:
    """(wins, losses, ties) of outcomes 1 / 0 / 0.5; anything else is refused."""
    values = np.asarray(outcomes, dtype=np.float64)
    if not np.isin(values, (0.0, TIE, 1.0)).all():
        raise ValueError("Outcomes must be 1 (win), 0.5 (tie) or 0 (loss).")
    wins, losses, ties = (int((values == value).sum()) for value in (1.0, 0.0, TIE))
    return wins, losses, ties


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


def crossed_win_rate(outcomes: np.ndarray, resamples: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> WinRate:
    """The win rate of a prompts x seeds table of outcomes, with an interval for crossed prompts and seeds.

    Prompts and seeds are treated as crossed random factors (two-way random-effects ANOVA, one outcome per
    cell): the variance of the mean is ``(MS_prompts + MS_seeds - MS_residual) / (prompts * seeds)``, with
    each factor's variance component floored at 0, and the interval is the normal one around the mean,
    clipped to [0, 1]. For independent outcomes that is about the ordinary interval; when one seed's noise
    decides many prompts it widens to what the number of seeds supports. A table with one seed or one
    prompt has no crossed structure: it gets :func:`win_rate`'s bootstrap (``resamples``, ``seed``).
    """
    table = np.asarray(outcomes, dtype=np.float64)
    if table.ndim != 2 or table.size == 0:
        raise ValueError(f"Outcomes must be a non-empty prompts x seeds table, got shape {table.shape}.")
    wins, losses, ties = tally(table)
    prompts, seeds = table.shape
    if prompts == 1 or seeds == 1:
        return win_rate(table.ravel(), resamples, confidence, seed)
    mean = table.mean()
    prompt_effects, seed_effects = table.mean(axis=1) - mean, table.mean(axis=0) - mean
    residuals = table - mean - prompt_effects[:, None] - seed_effects[None, :]
    square_prompts = seeds * (prompt_effects**2).sum() / (prompts - 1)
    square_seeds = prompts * (seed_effects**2).sum() / (seeds - 1)
    square_residual = (residuals**2).sum() / ((prompts - 1) * (seeds - 1))
    variance = (max(square_prompts, square_residual) + max(square_seeds, square_residual) - square_residual) / table.size
    half_width = NormalDist().inv_cdf(0.5 + confidence / 2.0) * variance**0.5
    return WinRate(rate=float(half_tie_rate(wins, ties, table.size)), low=float(max(0.0, mean - half_width)),
                   high=float(min(1.0, mean + half_width)), wins=wins, losses=losses, ties=ties)
