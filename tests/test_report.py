"""The dataset report (hgdpo.evaluation.dataset_report): statistics by hand, and end to end on a tiny built dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_builder import WarmthScorer, _config, _write_prompts

ROOT = Path(__file__).resolve().parents[1]
REPORT = [sys.executable, str(ROOT / "trainer" / "dataset_report.py")]
PROMPTS = ["a portrait of a woman <script>alert(1)</script>", "a man riding a bicycle", "two children & a dog"]


# --------------------------------------------------------------------------- statistics by hand


def test_score_gap_stats_match_numpy():
    from hgdpo.evaluation.statistics import score_gap_stats

    gaps = np.array([0.5, 2.0, -1.0, 3.5, 0.0, 1.25, 7.0])
    stats = score_gap_stats(gaps)
    assert stats["count"] == 7 and stats["num_non_finite"] == 0 and stats["num_non_positive"] == 2
    assert stats["mean"] == pytest.approx(gaps.sum() / 7)
    assert stats["std"] == pytest.approx(np.sqrt(((gaps - gaps.sum() / 7) ** 2).sum() / 7))
    assert (stats["min"], stats["max"], stats["median"]) == (-1.0, 7.0, 1.25)
    ordered = np.sort(gaps)
    assert stats["quantiles"]["q25"] == pytest.approx(ordered[1] + 0.5 * (ordered[2] - ordered[1]))  # pos 1.5
    assert stats["quantiles"]["q50"] == pytest.approx(1.25)
    assert stats["quantiles"]["q05"] == pytest.approx(np.quantile(gaps, 0.05))
    with_nan = score_gap_stats([1.0, float("nan"), 3.0])
    assert with_nan["count"] == 2 and with_nan["num_non_finite"] == 1 and with_nan["mean"] == 2.0
    empty = score_gap_stats([])
    assert empty["count"] == 0 and empty["mean"] is None and empty["quantiles"]["q50"] is None
    json.dumps(empty, allow_nan=False)


def test_channel_stats_and_distance_on_hand_made_latents():
    from hgdpo.evaluation.statistics import channel_stats, rank_distance_curve, stat_distance

    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 4, 8, 8))
    mean, std = channel_stats(base)
    assert mean.shape == std.shape == (1, 4)
    assert mean[0, 2] == pytest.approx(base[0, 2].mean()) and std[0, 3] == pytest.approx(base[0, 3].std())
    t_mean, t_std = channel_stats(torch.tensor(base, dtype=torch.float32))  # torch input works too
    assert np.allclose(t_mean, mean, atol=1e-6) and np.allclose(t_std, std, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        channel_stats(base[0])

    shifted = np.concatenate([base, base, base, base])
    shifted[1, 1] += 0.5  # channel 1 shifted: mean moves by 0.5, std unchanged
    shifted[2, 1] += 2.0
    shifted[3, 0] *= 3.0  # channel 0 scaled: std triples
    m, s = channel_stats(shifted)
    d_mean, d_std = stat_distance(m[0], s[0], m, s)
    assert d_mean[0] == 0.0 and d_std[0] == 0.0  # identical statistics
    assert d_mean[1] == pytest.approx(0.5) and d_mean[2] == pytest.approx(2.0) and d_mean[2] > d_mean[1]
    assert d_std[1] == pytest.approx(0.0, abs=1e-12) and d_std[3] == pytest.approx(2 * s[0, 0])
    assert d_mean[3] == pytest.approx(2 * abs(m[0, 0]))

    # Fig. 5b curve: pools given in shuffled order are ranked by score; two prompts averaged, one shorter
    curve = rank_distance_curve([
        ([0.1, 0.9, 0.5, 0.3], m[[3, 0, 1, 2]], s[[3, 0, 1, 2]]),  # ranked: 0, 1, 2, 3
        ([2.0, 1.0, 0.0], m[[0, 0, 1]] + 1.0, s[[0, 0, 1]]),  # a constant shift does not change distances
    ])
    assert curve["ranks"] == [2, 3, 4] and curve["num_prompts"] == [2, 2, 1]
    assert curve["mean_distance"] == pytest.approx([(0.5 + 0.0) / 2, (2.0 + 0.5) / 2, d_mean[3]])
    assert curve["mean_score"] == pytest.approx([(0.9 + 2.0) / 2, (0.5 + 1.0) / 2, (0.3 + 0.0) / 2, 0.1])
    assert rank_distance_curve([])["ranks"] == []


def test_render_contact_sheet_grid():
    from hgdpo.evaluation.figures import ContactRow, render_contact_sheet

    rows = [ContactRow("p" * 300, Image.new("RGB", (64, 32), "red"), Image.new("RGB", (16, 16), "blue"), 1.5, None)
            for _ in range(3)]
    sheet = render_contact_sheet(rows, cell=48)
    assert sheet.mode == "RGB" and sheet.width < 2 * 48 + 20 and sheet.height >= 3 * 48
    pixels = np.asarray(sheet)
    assert (pixels == [255, 0, 0]).all(axis=-1).any() and (pixels == [0, 0, 255]).all(axis=-1).any()
    assert render_contact_sheet([]).size[1] > 0


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pooled_dataset(tmp_path_factory, tiny_model_dir, tiny_components):
    from hgdpo.data.builder import build_dataset

    root = tmp_path_factory.mktemp("report-build")
    config = _config(root / "out", tiny_model_dir, _write_prompts(root / "prompts.txt", PROMPTS), keep_pool=True,
                     batch_size=4)
    build_dataset(config, WarmthScorer(), components=tiny_components, show_progress=False)
    return root / "out"


def test_write_report_end_to_end(pooled_dataset, tiny_components, tmp_path):
    from hgdpo.data.readers import open_preference_dataset
    from hgdpo.evaluation.dataset_report import write_report

    out = tmp_path / "report"
    report = write_report(pooled_dataset, out, components=tiny_components, max_pairs=2, batch_size=3)
    for name in ("report.json", "report.md", "score_gap_hist.png", "latent_stat_distance.png",
                 "contact_sheet.html", "contact_sheet.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) == {"dataset", "scores", "latent", "contact_sheet", "notes"}
    assert saved["dataset"]["num_pairs"] == 3 and saved["dataset"]["pool_size"] == 4

    dataset = open_preference_dataset(pooled_dataset)
    gaps = [dataset.item_metadata(i)["win_score"] - dataset.item_metadata(i)["lose_score"] for i in range(3)]
    assert saved["scores"]["gap"]["count"] == 3 and saved["scores"]["gap"]["mean"] == pytest.approx(np.mean(gaps))
    assert saved["scores"]["gap"]["min"] >= 0 and saved["scores"]["winner"]["count"] == 3

    latent = saved["latent"]
    assert (latent["num_pairs"], latent["num_pools"], latent["latent_channels"]) == (3, 3, 4)
    assert latent["image_size"] == [64, 64]
    assert latent["winner_vs_loser"]["mean_distance"]["count"] == 3
    curve = latent["rank_curve"]
    assert curve["ranks"] == [2, 3, 4] and curve["num_prompts"] == [3, 3, 3]
    assert all(d > 0 for d in curve["mean_distance"] + curve["std_distance"])
    assert curve["mean_score"] == sorted(curve["mean_score"], reverse=True)
    # the rank-N distance is the winner-vs-loser distance (loser = the worst of the pool)
    assert curve["mean_distance"][-1] == pytest.approx(latent["winner_vs_loser"]["mean_distance"]["mean"], rel=1e-4)

    assert saved["contact_sheet"]["num_pairs"] == 2
    for name in ("score_gap_hist.png", "latent_stat_distance.png", "contact_sheet.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.width > 50 and image.height > 50
    page = (out / "contact_sheet.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for src in ("thumbs/00000_win.png", "thumbs/00001_lose.png"):
        assert f'src="{src}"' in page and (out / src).is_file()
    link = os.path.relpath(pooled_dataset / dataset.item_metadata(0)["win_image"], out).replace(os.sep, "/")
    assert f'href="{link}"' in page and (out / link).is_file()
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "Fig. 5b" in markdown and "(score_gap_hist.png)" in markdown and "| 4 |" in markdown


def test_report_without_model_and_without_pools(tmp_path, triplet_dataset):
    from hgdpo.evaluation.dataset_report import write_report

    report = write_report(triplet_dataset, tmp_path / "r", max_pairs=3)
    assert report["latent"] is None and any("--model" in note for note in report["notes"])
    assert report["contact_sheet"]["num_pairs"] == 3
    assert not (tmp_path / "r" / "latent_stat_distance.png").exists()
    assert (tmp_path / "r" / "contact_sheet.png").is_file()


def test_cli_runs_and_reports_a_missing_dataset(pooled_dataset, tiny_single_file, tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(REPORT + ["--dataset", str(pooled_dataset), "--output-dir", str(tmp_path / "r"),
                                  "--model", str(tiny_single_file), "--model-config-dir", str(tiny_model_dir),
                                  "--max-pairs", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "Report written" in ok.stdout and "3 kept pools" in ok.stdout
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["contact_sheet"]["num_pairs"] == 1 and saved["latent"]["rank_curve"]["ranks"] == [2, 3, 4]

    missing = subprocess.run(REPORT + ["--dataset", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr
