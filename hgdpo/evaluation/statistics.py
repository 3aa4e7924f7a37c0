"""The statistics of the HG-DPO reports: sample summaries and the latent channel statistics (paper Fig. 5b).

Pure numpy: used by the dataset report (:mod:`hgdpo.evaluation.dataset_report`) and the model evaluation
(:mod:`hgdpo.evaluation.evaluate`), and on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["QUANTILES", "channel_stats", "rank_distance_curve", "score_gap_stats", "stat_distance"]

QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def score_gap_stats(values: Sequence[float] | np.ndarray, quantiles: Sequence[float] = QUANTILES) -> dict[str, Any]:
    """Summary of a 1-D sample (e.g. winner-minus-loser score gaps): count, mean, std, min, median, max, quantiles.

    ``std`` is the population standard deviation (``ddof=0``). Non-finite values are dropped (and counted
    in ``num_non_finite``); an empty sample gives ``None`` for every statistic. ``num_non_positive`` counts
    values <= 0 (for gaps: pairs whose "winner" does not score higher).
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = array[np.isfinite(array)]
    result: dict[str, Any] = {"count": int(finite.size), "num_non_finite": int(array.size - finite.size)}
    if finite.size == 0:
        result.update(mean=None, std=None, min=None, median=None, max=None, num_non_positive=0,
                      quantiles={_q_key(q): None for q in quantiles})
        return result
    result.update(
        mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()),
        median=float(np.median(finite)), max=float(finite.max()), num_non_positive=int((finite <= 0).sum()),
        quantiles={_q_key(q): float(np.quantile(finite, q)) for q in quantiles},
    )
    return result


def _q_key(q: float) -> str:
    return f"q{round(q * 100):02d}"


def channel_stats(latents: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-image channel-wise mean and std of latents ``[N, C, H, W]`` over (H, W): two ``[N, C]`` arrays.

    These are the latent statistics the HG-DPO paper compares across score ranks (Fig. 5b). ``std`` is the
    population standard deviation. Accepts numpy arrays or torch tensors (computed in float64).
    """
    if hasattr(latents, "detach"):  # a torch tensor
        latents = latents.detach().to("cpu").double().numpy()
    array = np.asarray(latents, dtype=np.float64)
    if array.ndim != 4:
        raise ValueError(f"expected latents of shape [N, C, H, W], got {array.shape}")
    flat = array.reshape(array.shape[0], array.shape[1], -1)
    return flat.mean(axis=2), flat.std(axis=2)


def stat_distance(mean_a: np.ndarray, std_a: np.ndarray, mean_b: np.ndarray,
                  std_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance over channels (last axis) between two images' channel means and between their stds.

    Inputs broadcast (e.g. ``[C]`` against ``[N, C]``); returns ``(mean_distance, std_distance)`` with the
    channel axis reduced.
    """
    mean_distance = np.linalg.norm(np.asarray(mean_a, np.float64) - np.asarray(mean_b, np.float64), axis=-1)
    std_distance = np.linalg.norm(np.asarray(std_a, np.float64) - np.asarray(std_b, np.float64), axis=-1)
    return mean_distance, std_distance


def rank_distance_curve(pools: Sequence[tuple[Sequence[float], np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The paper's Fig. 5b curve: distance of the best image's latent statistics to the n-th ranked image's.

    Args:
        pools: per prompt ``(scores[N], mean[N, C], std[N, C])`` for its whole pool, in any order.

    Returns ``{"ranks": [2..N_max], "mean_distance": [...], "std_distance": [...], "num_prompts": [...],
    "mean_score": [1..N_max scores averaged over prompts]}``: pools are ranked by descending score (ties
    keep pool order) and the distances of rank n are averaged over the prompts whose pool has rank n.
    """
    longest = max((len(scores) for scores, _, _ in pools), default=0)
    sums_mean = np.zeros(longest)
    sums_std = np.zeros(longest)
    counts = np.zeros(longest, dtype=np.int64)
    score_sums = np.zeros(longest)
    for scores, means, stds in pools:
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        means, stds = np.asarray(means)[order], np.asarray(stds)[order]
        d_mean, d_std = stat_distance(means[0], stds[0], means, stds)
        n = len(scores)
        sums_mean[:n] += d_mean
        sums_std[:n] += d_std
        counts[:n] += 1
        score_sums[:n] += scores[order]
    with np.errstate(invalid="ignore", divide="ignore"):
        avg_mean, avg_std, avg_score = sums_mean / counts, sums_std / counts, score_sums / counts
    return {
        "ranks": list(range(2, longest + 1)),
        "mean_distance": [float(v) for v in avg_mean[1:]],
        "std_distance": [float(v) for v in avg_std[1:]],
        "num_prompts": [int(v) for v in counts[1:]],
        "mean_score": [float(v) for v in avg_score],
    }
