"""The evaluation report: Markdown + HTML tables in the paper's layout, plots, an image grid, JSON.

:func:`write_evaluation_report` writes into the output folder (the conventions of :mod:`hgdpo.evaluation.dataset_report`):

* ``report.json`` -- every figure and every pair's scores, machine-readable;
* ``report.md`` and ``report.html`` -- the candidate's win rate per metric (paper Table 1's layout: one
  row per comparison, one column per metric, with the 95% interval), mean scores, the colour
  shift (Table 2: mean hue / saturation / value and the change against the baseline in percent) and the
  latent statistics (Fig. 5b's channel-wise statistic);
* ``win_rates.png``, ``score_differences.png``, ``colour_shift.png`` -- matplotlib plots;
* ``image_grid.png`` and ``thumbs/`` -- the first pairs side by side (baseline | candidate), also in the
  HTML page with links to the full-size cached images.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hgdpo.evaluation.colorshift import CHANNELS
from hgdpo.evaluation.figures import (
    THUMB_SIZE,
    ContactRow,
    fit_thumbnail,
    format_value,
    new_figure,
    relative_link,
    render_contact_sheet,
)
from hgdpo.fileio import atomic_write_text

Table = tuple[list[str], list[list[str]]]


class ImageSource(Protocol):
    """Where the report finds a model's image of a (prompt, seed): :class:`hgdpo.evaluation.evaluate.ImageCache`."""

    def load(self, prompt: str, seed: int) -> Any:
        """The cached image of ``(prompt, seed)``; its ``image`` attribute is the PIL image."""
        ...


# --------------------------------------------------------------------------- tables (shared by Markdown and HTML)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}%"


def win_rate_table(report: Mapping[str, Any]) -> Table:
    """Table 1's layout: one row (candidate vs baseline), one column per metric: win rate [95% interval]."""
    metrics = report["metrics"]
    header = ["", *(metric["label"] for metric in metrics.values())]
    cells = [f"{_percent(m['win_rate']['rate'])} [{_percent(m['win_rate']['low'])}, {_percent(m['win_rate']['high'])}]"
             for m in metrics.values()]
    return header, [[f"{report['candidate']} vs {report['baseline']}", *cells]]


def mean_score_table(report: Mapping[str, Any]) -> Table:
    """Per metric: both models' mean score, the mean difference, and the win / tie / loss counts."""
    header = ["metric", f"{report['baseline']} mean", f"{report['candidate']} mean", "mean difference",
              "wins", "ties", "losses", "pairs"]
    rows = []
    for metric in report["metrics"].values():
        rate = metric["win_rate"]
        rows.append([metric["label"], format_value(metric["baseline_mean"]), format_value(metric["candidate_mean"]),
                     format_value(metric["difference"]["mean"]), str(rate["wins"]), str(rate["ties"]), str(rate["losses"]),
                     str(rate["count"])])
    return header, rows


def colour_table(report: Mapping[str, Any]) -> Table:
    """Table 2's layout: mean hue (degrees), saturation, value per model and their change against the baseline."""
    header = ["model", "hue (deg)", "saturation", "value", "hue change", "saturation change", "value change"]
    rows = []
    for label, row in report["colour_shift"].items():
        changes = (["(reference)"] * 3 if label == report["baseline"]
                   else [_signed(row[f"{name}_change_percent"]) for name in CHANNELS])
        rows.append([label, f"{row['hue']:.2f}", f"{row['saturation']:.4f}", f"{row['value']:.4f}", *changes])
    return header, rows


def latent_table(report: Mapping[str, Any]) -> Table:
    """Per model: the channel-wise mean and std of the final latents, averaged over images."""
    section = report["latent_statistics"]
    channels = section["latent_channels"]
    header = ["model", *(f"mean c{c}" for c in range(channels)), *(f"std c{c}" for c in range(channels))]
    rows = [[label, *(format_value(v) for v in stats["channel_mean"]), *(format_value(v) for v in stats["channel_std"])]
            for label, stats in section["models"].items()]
    return header, rows


def distance_table(report: Mapping[str, Any]) -> Table:
    """The L2 distance over channels between the latent statistics of the two images of each pair."""
    header = ["pair distance of the", "count", "mean", "std", "min", "median", "max"]
    keys = ("mean", "std", "min", "median", "max")
    rows = [[f"channel {name}", str(stats["count"]), *(format_value(stats[key]) for key in keys)]
            for name, stats in (("mean", report["latent_statistics"]["pair_distance"]["mean_distance"]),
                                ("std", report["latent_statistics"]["pair_distance"]["std_distance"]))]
    return header, rows


def _markdown_table(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# --------------------------------------------------------------------------- plots


def _plot_win_rates(path: Path, report: Mapping[str, Any]) -> None:
    metrics = list(report["metrics"].values())
    figure = new_figure(max(4.0, 1.3 * len(metrics) + 2), 4)
    axis = figure.subplots()
    rates = np.array([m["win_rate"]["rate"] for m in metrics]) * 100
    errors = np.array([[m["win_rate"]["rate"] - m["win_rate"]["low"], m["win_rate"]["high"] - m["win_rate"]["rate"]]
                       for m in metrics]).T * 100
    axis.bar([m["label"] for m in metrics], rates, yerr=errors, capsize=6, color="#4477aa")
    axis.axhline(50, color="grey", linestyle="--", linewidth=1)
    axis.set(ylim=(0, 100), ylabel="win rate (%), 95% interval",
             title=f"{report['candidate']} vs {report['baseline']} (ties count half)")
    figure.tight_layout()
    figure.savefig(path)


def _plot_differences(path: Path, report: Mapping[str, Any]) -> None:
    names = list(report["metrics"])
    figure = new_figure(3.2 * len(names) + 0.5, 3.4)
    axes = np.atleast_1d(figure.subplots(1, len(names)))
    baseline, candidate = report["baseline"], report["candidate"]
    for axis, name in zip(axes, names):
        differences = [pair["scores"][name][candidate] - pair["scores"][name][baseline] for pair in report["pairs"]]
        axis.hist(differences, bins=max(5, min(40, len(differences) // 4)), color="#4477aa")
        axis.axvline(0, color="grey", linestyle="--", linewidth=1)
        axis.set(title=report["metrics"][name]["label"], xlabel=f"{candidate} - {baseline}", ylabel="pairs")
    figure.tight_layout()
    figure.savefig(path)


def _plot_colour(path: Path, report: Mapping[str, Any]) -> None:
    figure = new_figure(6, 3.6)
    axis = figure.subplots()
    candidate = report["colour_shift"][report["candidate"]]
    values = [candidate[f"{name}_change_percent"] or 0.0 for name in CHANNELS]
    axis.bar(CHANNELS, values, color=["#cc6677", "#ddcc77", "#117733"])
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set(ylabel=f"change vs {report['baseline']} (%)", title=f"colour shift of {report['candidate']} (Table 2)")
    figure.tight_layout()
    figure.savefig(path)


# --------------------------------------------------------------------------- image grid


def _write_grid(report: dict[str, Any], out: Path, caches: Mapping[str, ImageSource],
                count: int) -> list[dict[str, Any]]:
    """Thumbnails of the first ``count`` pairs, ``image_grid.png``, and the HTML grid's entries."""
    baseline, candidate = report["baseline"], report["candidate"]
    first = next(iter(report["metrics"]))
    entries, rows = [], []
    (out / "thumbs").mkdir(exist_ok=True)
    for index, pair in enumerate(report["pairs"][:count]):
        thumbs, entry = {}, {"index": index, "prompt": pair["prompt"], "seed": pair["seed"], "scores": pair["scores"]}
        for label in (baseline, candidate):
            thumbs[label] = fit_thumbnail(caches[label].load(pair["prompt"], pair["seed"]).image, THUMB_SIZE)
            entry[f"{label}_thumb"] = f"thumbs/{index:05d}_{label}.png"
            thumbs[label].save(out / entry[f"{label}_thumb"])
            entry[f"{label}_link"] = relative_link(Path(pair[f"{label}_image"]), out)
        entries.append(entry)
        rows.append(ContactRow(f"seed {pair['seed']}: {pair['prompt']}", thumbs[baseline], thumbs[candidate],
                               pair["scores"][first][baseline], pair["scores"][first][candidate]))
    render_contact_sheet(rows, labels=(baseline, candidate)).save(out / "image_grid.png")
    report["image_grid"] = {"num_pairs": len(entries), "png": "image_grid.png", "scores_shown": first}
    return entries


def _grid_html(report: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    labels = (report["baseline"], report["candidate"])
    metric_labels = {name: metric["label"] for name, metric in report["metrics"].items()}
    lines = ["<table><tr><th>#</th><th>prompt</th>" + "".join(f"<th>{esc(label)}</th>" for label in labels)
             + "<th>scores</th></tr>"]
    for entry in entries:
        cells = []
        for label in labels:
            image = f'<img src="{esc(entry[f"{label}_thumb"], quote=True)}" alt="{esc(label, quote=True)}">'
            if entry.get(f"{label}_link"):
                image = f'<a href="{esc(entry[f"{label}_link"], quote=True)}">{image}</a>'
            cells.append(f"<td>{image}</td>")
        scores = "<br>".join(f"{esc(metric_labels[name])}: " + " | ".join(format_value(values[label]) for label in labels)
                             for name, values in entry["scores"].items())
        lines.append(f"<tr><td>{entry['index']}</td><td>{esc(entry['prompt'])}<br>seed {entry['seed']}</td>"
                     f"{''.join(cells)}<td>{scores}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the documents


def _model_table(report: Mapping[str, Any]) -> Table:
    header = ["", "model", "LoRA", "LoRA weight", "LAN", "images"]
    rows = [[label, spec["model"], spec["lora"] or "-", f"{spec['lora_weight']:g}" if spec["lora"] else "-",
             f"{spec['lan_strength']:g}", spec["images"]] for label, spec in report["models"].items()]
    return header, rows


def _settings_line(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    sampling = s["sampling"]
    return (f"{s['num_prompts']} prompts x {len(s['seeds'])} seed(s) = {s['num_pairs']} pairs from "
            f"{s['prompts'] or 'the given prompts'}; {sampling['sampler']} ({sampling['schedule']}), "
            f"{sampling['steps']} steps, CFG {sampling['guidance_scale']:g}, {sampling['width']}x{sampling['height']}, "
            f"{s['dtype']}. Win rates count ties as half; {_interval_kind(s)}.")


def _interval_kind(settings: Mapping[str, Any]) -> str:
    """How the intervals were made (:func:`hgdpo.evaluation.winrate.crossed_win_rate`)."""
    if len(settings["seeds"]) > 1 and settings["num_prompts"] > 1:
        return "95% intervals treat prompts and seeds as crossed random factors (two-way random-effects ANOVA)"
    return f"intervals are {settings['bootstrap_resamples']}-resample percentile-bootstrap 95% intervals"


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# HG-DPO evaluation: {report['candidate']} vs {report['baseline']}", "",
             *_markdown_table(_model_table(report)), _settings_line(report), "",
             "## Win rate (paper Table 1)", "", *_markdown_table(win_rate_table(report)),
             "![win rates](win_rates.png)", "",
             "## Mean scores", "", *_markdown_table(mean_score_table(report)),
             "![score differences](score_differences.png)", "",
             "## Colour shift (paper Table 2)", "",
             ("Mean of each HSV channel over all images (hue in degrees, colorsys convention), and the change "
              f"against {report['baseline']} in percent."), "", *_markdown_table(colour_table(report)),
             "![colour shift](colour_shift.png)", "",
             "## Latent statistics (paper Fig. 5b)", "",
             ("Channel-wise mean / std of each image's final latent over (H, W), averaged over images, and the L2 "
              "distance over channels between the two images of each (prompt, seed) pair."), "",
             *_markdown_table(latent_table(report)), *_markdown_table(distance_table(report)),
             "## Images", "",
             (f"First {report['image_grid']['num_pairs']} pairs ({report['baseline']} | {report['candidate']}, "
              f"{report['metrics'][report['image_grid']['scores_shown']]['label']} under each): "
              "![image grid](image_grid.png) -- with every score and links to the full images in "
              "[report.html](report.html)."), ""]
    return "\n".join(lines)


def _html(report: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    title = f"HG-DPO evaluation: {report['candidate']} vs {report['baseline']}"
    parts = [
        "<!DOCTYPE html>", f'<html><head><meta charset="utf-8"><title>{esc(title)}</title>',
        ("<style>body{font-family:sans-serif;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
         "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}</style></head><body>"),
        f"<h1>{esc(title)}</h1>", _html_table(_model_table(report)), f"<p>{esc(_settings_line(report))}</p>",
        "<h2>Win rate (paper Table 1)</h2>", _html_table(win_rate_table(report)), '<img src="win_rates.png">',
        "<h2>Mean scores</h2>", _html_table(mean_score_table(report)), '<img src="score_differences.png">',
        "<h2>Colour shift (paper Table 2)</h2>", _html_table(colour_table(report)), '<img src="colour_shift.png">',
        "<h2>Latent statistics (paper Fig. 5b)</h2>", _html_table(latent_table(report)),
        _html_table(distance_table(report)),
        "<h2>Images</h2>", _grid_html(report, entries), "</body></html>", "",
    ]
    return "\n".join(parts)


def write_evaluation_report(report: dict[str, Any], output_dir: str | Path, caches: Mapping[str, ImageSource],
                            grid_pairs: int = 16) -> None:
    """Write ``report.json``, ``report.md``, ``report.html``, the plots and the image grid into ``output_dir``."""
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _plot_win_rates(out / "win_rates.png", report)
    _plot_differences(out / "score_differences.png", report)
    _plot_colour(out / "colour_shift.png", report)
    entries = _write_grid(report, out, caches, grid_pairs)
    report["plots"] = ["win_rates.png", "score_differences.png", "colour_shift.png"]
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", _markdown(report))
    atomic_write_text(out / "report.html", _html(report, entries))
