"""A report on a preference dataset: score gaps, latent statistics (HG-DPO paper Fig. 5b), a contact sheet.

:func:`write_report` writes into an output folder:

* ``score_gap_hist.png``: histogram of the per-pair winner-minus-loser score gap, and of winner / loser scores;
* ``latent_stat_distance.png`` (only with a model): for pools kept by the builder (``--keep-pool``), the
  distance between the channel-wise mean / std of the VAE latent of the best image and of the n-th ranked
  image, averaged over prompts, against the rank n (the paper's Fig. 5b: the further apart in rank, the
  further apart the latent statistics); winner-vs-loser distances in any case;
* ``contact_sheet.html`` (thumbnails under ``thumbs/``) and ``contact_sheet.png`` (winner | loser rows);
* ``report.json`` (every figure, machine-readable) and ``report.md`` (a human summary).

The statistics are :mod:`hgdpo.evaluation.statistics`'s, the pictures :mod:`hgdpo.evaluation.figures`'s.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hgdpo.data.format import resolve_dataset_path
from hgdpo.evaluation.figures import (
    THUMB_SIZE,
    ContactRow,
    fit_thumbnail,
    format_value,
    new_figure,
    relative_link,
    render_contact_sheet,
)
from hgdpo.evaluation.statistics import channel_stats, rank_distance_curve, score_gap_stats, stat_distance

__all__ = ["KeptPool", "encode_channel_stats", "read_kept_pools", "write_report"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- latents


def encode_channel_stats(images: Iterable[Image.Image], vae, size: tuple[int, int],
                         batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE-encode a stream of images in batches and return their channel statistics (``[N, C]`` each).

    Images are consumed lazily: at most ``batch_size`` preprocessed images are held at a time, and only
    the ``[C]`` statistics of each latent are kept. Latents are :func:`hgdpo.training.latent_cache.encode_images`'s
    (posterior mean times the VAE scaling factor) at ``size`` (width, height).
    """
    import torch

    from hgdpo.training.latent_cache import encode_images, preprocess_image

    means: list[np.ndarray] = []
    stds: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        latents = encode_images(torch.stack(batch), vae).float()
        mean, std = channel_stats(latents)
        means.append(mean)
        stds.append(std)
        batch.clear()

    for image in images:
        batch.append(preprocess_image(image, size))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    if not means:
        channels = int(getattr(getattr(vae, "config", None), "latent_channels", 4))
        return np.zeros((0, channels)), np.zeros((0, channels))
    return np.concatenate(means), np.concatenate(stds)


@dataclass(frozen=True)
class KeptPool:
    """One prompt's pool kept by the builder (``--keep-pool``): image paths and their scores."""

    prompt_index: int
    prompt: str
    scores: list[float]
    paths: list[Path]


def read_kept_pools(dataset_dir: str | Path) -> list[KeptPool]:
    """The kept pools of a builder dataset: ``records/*.json`` of finished (``status: ok``) prompts.

    Records without ``pool_images`` (built without ``--keep-pool``), skipped prompts and pools with a
    missing image file are left out; an unreadable record is logged and left out.
    """
    root = Path(dataset_dir)
    pools: list[KeptPool] = []
    for path in sorted((root / "records").glob("[0-9]*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("%s: unreadable build record (%s); left out of the pool analysis", path, error)
            continue
        files, scores = record.get("pool_images"), record.get("scores")
        if record.get("status") != "ok" or not files or not scores or len(files) != len(scores) or len(files) < 2:
            continue
        try:
            paths = [resolve_dataset_path(root, rel) for rel in files]
        except ValueError as error:
            logger.warning("%s: %s; left out of the pool analysis", path, error)
            continue
        if not all(p.is_file() for p in paths):
            logger.warning("%s: a pool image is missing; left out of the pool analysis", path)
            continue
        pools.append(KeptPool(int(record.get("prompt_index", -1)), str(record.get("prompt", "")),
                              [float(s) for s in scores], paths))
    return pools


# --------------------------------------------------------------------------- pictures


def _contact_html(entries: Sequence[dict[str, Any]], dataset_path: str) -> str:
    esc = html.escape
    lines = [
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>HG-DPO dataset contact sheet</title>',
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;vertical-align:top}.win{color:#070}.lose{color:#a00}</style></head><body>",
        f"<h1>Contact sheet</h1><p>Dataset: <code>{esc(dataset_path)}</code> (first {len(entries)} pairs)</p>",
        "<table><tr><th>#</th><th>prompt</th><th>winner</th><th>loser</th></tr>",
    ]
    for e in entries:
        cells = []
        for key in ("win", "lose"):
            img = f'<img src="{esc(e[key + "_thumb"], quote=True)}" alt="{key}">'
            if e.get(key + "_link"):
                img = f'<a href="{esc(e[key + "_link"], quote=True)}">{img}</a>'
            cells.append(f'<td class="{key}">{img}<br>{key} score {esc(format_value(e[key + "_score"]))}</td>')
        lines.append(f"<tr><td>{e['index']}</td><td>{esc(e['prompt'])}</td>{''.join(cells)}</tr>")
    lines += ["</table></body></html>", ""]
    return "\n".join(lines)


def _plot_scores(path: Path, gaps: np.ndarray, wins: np.ndarray, loses: np.ndarray) -> None:
    figure = new_figure(10, 4)
    left, right = figure.subplots(1, 2)
    bins = max(5, min(50, int(np.sqrt(max(1, gaps.size))) * 2))
    left.hist(gaps, bins=bins, color="#4477aa")
    left.set(title="winner - loser score gap", xlabel="score gap", ylabel="pairs")
    right.hist([wins, loses], bins=bins, label=["winner", "loser"], color=["#228833", "#cc3311"], alpha=0.8)
    right.set(title="winner and loser scores", xlabel="score", ylabel="pairs")
    right.legend()
    figure.tight_layout()
    figure.savefig(path)


def _plot_rank_curve(path: Path, curve: dict[str, Any] | None, pair_distance: dict[str, Any]) -> None:
    figure = new_figure(7, 4)
    axis = figure.subplots()
    if curve and curve["ranks"]:
        axis.plot(curve["ranks"], curve["mean_distance"], "o-", label="channel mean")
        axis.plot(curve["ranks"], curve["std_distance"], "s-", label="channel std")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set(xlabel="rank n of the pool image (by score; 1 = best)",
                 title="latent statistics: distance from the best image (HG-DPO Fig. 5b)")
    else:
        labels = ["channel mean", "channel std"]
        values = [pair_distance["mean_distance"]["mean"] or 0.0, pair_distance["std_distance"]["mean"] or 0.0]
        axis.bar(labels, values, color=["#4477aa", "#ee6677"])
        axis.set(title="latent statistics: winner vs loser distance (no kept pools)")
    axis.set_ylabel("L2 distance over channels")
    if curve and curve["ranks"]:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)


# --------------------------------------------------------------------------- the report


def _image_size(image: Image.Image, resolution: int | None) -> tuple[int, int]:
    if resolution:
        return resolution, resolution
    return max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)


def _pair_images(dataset, indices: Iterable[int]) -> Iterator[Image.Image]:
    for i in indices:
        win, lose = dataset.load_pair(i)
        yield win
        yield lose


def _pool_images(pools: Sequence[KeptPool]) -> Iterator[Image.Image]:
    for pool in pools:
        for path in pool.paths:
            with Image.open(path) as image:
                yield image.convert("RGB")


def _latent_section(dataset, components, *, batch_size: int, resolution: int | None, max_latent_items: int | None,
                    device: str | None) -> dict[str, Any]:
    """Winner-vs-loser latent statistic distances and, for kept pools, the Fig. 5b rank curve."""
    import torch

    vae = components.vae
    if device is not None:
        vae = vae.to(device)
    pairs = list(range(len(dataset) if max_latent_items is None else min(len(dataset), max_latent_items)))
    pools = read_kept_pools(dataset.root) if getattr(dataset, "kind", None) == "triplets" else []
    if max_latent_items is not None:
        pools = pools[:max_latent_items]
    first = dataset.load_pair(0)[0] if pairs else None
    size = _image_size(first, resolution) if first is not None else (resolution or 512,) * 2
    with torch.no_grad():
        mean, std = encode_channel_stats(_pair_images(dataset, pairs), vae, size, batch_size)
    d_mean, d_std = stat_distance(mean[0::2], std[0::2], mean[1::2], std[1::2])
    section: dict[str, Any] = {
        "image_size": list(size),
        "num_pairs": len(pairs),
        "latent_channels": int(mean.shape[1]),
        "winner_vs_loser": {"mean_distance": score_gap_stats(d_mean), "std_distance": score_gap_stats(d_std)},
        "num_pools": len(pools),
        "rank_curve": None,
    }
    if pools:
        with torch.no_grad():
            pool_mean, pool_std = encode_channel_stats(_pool_images(pools), vae, size, batch_size)
        per_pool, start = [], 0
        for pool in pools:
            n = len(pool.paths)
            per_pool.append((pool.scores, pool_mean[start:start + n], pool_std[start:start + n]))
            start += n
        section["rank_curve"] = rank_distance_curve(per_pool)
    return section


def write_report(dataset_path: str | Path, output_dir: str | Path, components=None, max_pairs: int = 16, *,
                 batch_size: int = 8, resolution: int | None = None, max_latent_items: int | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Write the dataset report into ``output_dir`` and return what ``report.json`` holds.

    Args:
        dataset_path: anything :func:`hgdpo.data.readers.open_preference_dataset` opens.
        output_dir: the report folder (created).
        components: a loaded model (:func:`hgdpo.models.loading.load_model`); without it the latent statistics
            (paper Fig. 5b) are skipped with a note.
        max_pairs: pairs shown on the contact sheets.
        batch_size: images per VAE batch.
        resolution: encode at NxN (default: the first image's size, rounded down to a multiple of 8).
        max_latent_items: encode at most this many pairs and this many kept pools (default: all).
        device: move the VAE to this device first (default: where it is).

    Raises:
        FileNotFoundError: no dataset at ``dataset_path``.
        ValueError: an unreadable dataset, or ``max_pairs`` / ``batch_size`` below their minimum.
    """
    from hgdpo.data.readers import open_preference_dataset

    if max_pairs < 0 or batch_size < 1:
        raise ValueError(f"max_pairs must be >= 0 and batch_size >= 1 (got {max_pairs}, {batch_size})")
    dataset = open_preference_dataset(dataset_path)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    info = dataset.info
    notes: list[str] = []

    # 1. scores
    wins, loses = [], []
    for i in range(len(dataset)):
        meta = dataset.item_metadata(i)
        w, lo = meta.get("win_score"), meta.get("lose_score")
        if w is not None and lo is not None:
            wins.append(float(w))
            loses.append(float(lo))
    wins_a, loses_a = np.asarray(wins), np.asarray(loses)
    gaps = wins_a - loses_a
    scores = {
        "num_pairs_with_scores": len(wins),
        "gap": score_gap_stats(gaps),
        "winner": score_gap_stats(wins_a),
        "loser": score_gap_stats(loses_a),
        "histogram": None,
    }
    if len(wins):
        _plot_scores(out / "score_gap_hist.png", gaps, wins_a, loses_a)
        scores["histogram"] = "score_gap_hist.png"
    else:
        notes.append("No pair has win/lose scores (e.g. Pick-a-Pic data): score statistics skipped.")

    # 2. latents (paper Fig. 5b)
    latent: dict[str, Any] | None = None
    if components is None:
        notes.append("No model given (--model): latent statistics (paper Fig. 5b) skipped.")
    elif len(dataset) == 0:
        notes.append("The dataset is empty: latent statistics skipped.")
    else:
        latent = _latent_section(dataset, components, batch_size=batch_size, resolution=resolution,
                                 max_latent_items=max_latent_items, device=device)
        _plot_rank_curve(out / "latent_stat_distance.png", latent["rank_curve"], latent["winner_vs_loser"])
        latent["plot"] = "latent_stat_distance.png"
        if not latent["num_pools"]:
            notes.append("No kept pools (build with --keep-pool for the rank curve of Fig. 5b): only winner vs "
                         "loser latent distances are reported.")

    # 3. contact sheets
    shown = min(max_pairs, len(dataset))
    (out / "thumbs").mkdir(exist_ok=True)
    entries, rows = [], []
    for i in range(shown):
        meta = dataset.item_metadata(i)
        win, lose = dataset.load_pair(i)
        entry: dict[str, Any] = {"index": i, "prompt": dataset.prompt(i), "win_score": meta.get("win_score"),
                                 "lose_score": meta.get("lose_score")}
        thumbs = []
        for key, image in (("win", win), ("lose", lose)):
            thumb = fit_thumbnail(image, THUMB_SIZE)
            name = f"thumbs/{i:05d}_{key}.png"
            thumb.save(out / name)
            thumbs.append(thumb)
            entry[f"{key}_thumb"] = name
            rel = meta.get(f"{key}_image")
            entry[f"{key}_link"] = relative_link(dataset.root / rel, out) if rel and hasattr(dataset, "root") else None
        del win, lose
        entries.append(entry)
        rows.append(ContactRow(entry["prompt"], thumbs[0], thumbs[1], entry["win_score"], entry["lose_score"]))
    (out / "contact_sheet.html").write_text(_contact_html(entries, str(dataset_path)), encoding="utf-8")
    render_contact_sheet(rows).save(out / "contact_sheet.png")

    report: dict[str, Any] = {
        "dataset": {"path": str(dataset_path), "kind": info.kind, "num_pairs": len(dataset),
                    "pool_size": info.pool_size, "scorer": info.scorer, "model": info.model},
        "scores": scores,
        "latent": latent,
        "contact_sheet": {"num_pairs": shown, "html": "contact_sheet.html", "png": "contact_sheet.png"},
        "notes": notes,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _stats_row(name: str, stats: dict[str, Any]) -> str:
    q = stats["quantiles"]
    cells = [stats["count"], stats["mean"], stats["std"], stats["min"], q.get("q05"), q.get("q25"), stats["median"],
             q.get("q75"), q.get("q95"), stats["max"]]
    return f"| {name} | " + " | ".join(str(c) if isinstance(c, int) else format_value(c) for c in cells) + " |"


_STATS_HEADER = ("| | count | mean | std | min | q05 | q25 | median | q75 | q95 | max |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|")


def _markdown(report: dict[str, Any]) -> str:
    d, s, latent = report["dataset"], report["scores"], report["latent"]
    lines = [
        "# HG-DPO dataset report", "",
        f"Dataset `{d['path']}` ({d['kind']}): **{d['num_pairs']} pairs**, pool size {d['pool_size']}, "
        f"scorer {d['scorer']}, model `{d['model']}`.", "",
        "## Scores", "",
    ]
    if s["num_pairs_with_scores"]:
        lines += [_STATS_HEADER, _stats_row("winner - loser gap", s["gap"]), _stats_row("winner score", s["winner"]),
                  _stats_row("loser score", s["loser"]), "",
                  f"Pairs whose gap is <= 0: {s['gap']['num_non_positive']}.", "",
                  "![score gap histogram](score_gap_hist.png)", ""]
    else:
        lines += ["No scores in this dataset.", ""]
    lines += ["## Latent statistics (HG-DPO paper, Fig. 5b)", ""]
    if latent is None:
        lines += ["Skipped (no model given).", ""]
    else:
        wl = latent["winner_vs_loser"]
        lines += [f"Channel-wise mean / std of the VAE latent over (H, W), {latent['num_pairs']} pairs at "
                  f"{latent['image_size'][0]}x{latent['image_size'][1]} px; L2 distance over the "
                  f"{latent['latent_channels']} channels.", "", _STATS_HEADER,
                  _stats_row("winner vs loser, mean", wl["mean_distance"]),
                  _stats_row("winner vs loser, std", wl["std_distance"]), ""]
        curve = latent["rank_curve"]
        if curve:
            lines += [f"Kept pools: {latent['num_pools']} prompts. Distance between the best image and the n-th "
                      "ranked image, averaged over prompts:", "",
                      "| rank n | mean score | mean distance | std distance | prompts |", "|---|---|---|---|---|"]
            for k, rank in enumerate(curve["ranks"]):
                lines.append(f"| {rank} | {format_value(curve['mean_score'][k + 1])} | {format_value(curve['mean_distance'][k])} | "
                             f"{format_value(curve['std_distance'][k])} | {curve['num_prompts'][k]} |")
            lines.append("")
        lines += ["![latent statistic distance](latent_stat_distance.png)", ""]
    c = report["contact_sheet"]
    lines += ["## Contact sheet", "",
              f"First {c['num_pairs']} pairs: [contact_sheet.html](contact_sheet.html), "
              "[contact_sheet.png](contact_sheet.png).", ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)
