"""The evaluation pipeline: colour shift (Table 2) on hand-computed images, the image cache, resumable
generation with the tiny model, win rates, and ``trainer/evaluate.py`` end to end."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hgdpo.evaluation.colorshift import colour_shift, images_mean_hsv, mean_hsv, percent_change, rgb_to_hsv
from hgdpo.evaluation.evaluate import ImageCache, MetricSpec, ModelSpec, generate_missing, metric_result, model_digest
from hgdpo.inference.sampling import SamplingConfig
from hgdpo.evaluation.winrate import crossed_win_rate, win_rate

ROOT = Path(__file__).resolve().parents[1]


def brightness(prompts, images):
    """A plug-in metric: mean grey level of each image."""
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in images]


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, rgb)


# --------------------------------------------------------------------------- colour shift (Table 2)


def test_rgb_to_hsv_is_colorsys():
    rng = np.random.default_rng(0)
    pixels = np.concatenate([rng.integers(0, 256, (500, 3)), [[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 255, 0],
                                                              [0, 255, 255], [255, 0, 255], [9, 9, 200], [200, 9, 9]]])
    pixels = pixels / 255.0
    expected = np.array([colorsys.rgb_to_hsv(*pixel) for pixel in pixels])
    np.testing.assert_allclose(rgb_to_hsv(pixels), expected, rtol=0, atol=1e-12)


def test_mean_hsv_on_hand_computed_images():
    half = Image.new("RGB", (10, 4), (255, 0, 0))
    half.paste((0, 0, 255), (5, 0, 10, 4))  # left red (hue 0), right blue (hue 240)
    np.testing.assert_allclose(mean_hsv(half), [120.0, 1.0, 1.0])
    np.testing.assert_allclose(mean_hsv(solid((255, 128, 0))), [60.0 * 128 / 255, 1.0, 1.0])  # orange
    np.testing.assert_allclose(mean_hsv(solid((0, 255, 0))), [120.0, 1.0, 1.0])
    np.testing.assert_allclose(mean_hsv(solid((128, 128, 128))), [0.0, 0.0, 128 / 255])  # grey: hue 0
    np.testing.assert_allclose(mean_hsv(solid((200, 100, 100))), [0.0, 0.5, 200 / 255])
    np.testing.assert_allclose(mean_hsv(Image.new("L", (3, 3), 51)), [0.0, 0.0, 0.2])
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    pil = np.asarray(noise.convert("HSV"), dtype=np.float64).reshape(-1, 3).mean(0) / 255.0
    np.testing.assert_allclose(mean_hsv(noise) / [360.0, 1.0, 1.0], pil, atol=3 / 255)  # PIL's 8-bit HSV


def test_colour_shift_is_the_percentage_change_against_the_baseline():
    per_image = {"sft": images_mean_hsv([solid((200, 100, 100)), solid((200, 100, 100))]),
                 "dpo": images_mean_hsv([solid((200, 50, 50)), solid((200, 0, 0))])}
    table = colour_shift(per_image, baseline="sft")
    assert table["sft"]["saturation_change_percent"] == 0.0
    assert table["dpo"]["saturation"] == pytest.approx((0.75 + 1.0) / 2)
    assert table["dpo"]["saturation_change_percent"] == pytest.approx(75.0)  # 0.875 vs 0.5
    assert table["dpo"]["value_change_percent"] == pytest.approx(0.0)
    assert table["dpo"]["hue_change_percent"] is None  # the baseline's mean hue is 0
    assert percent_change(1.1, 1.0) == pytest.approx(10.0)


# --------------------------------------------------------------------------- cache, generation, win rates


def test_image_cache_round_trip_and_model_digest(tmp_path, tiny_model_dir, tiny_lora):
    from hgdpo.inference.infotext import PARAMETERS_KEY, parse_parameters

    cache = ImageCache(tmp_path, "abc")
    image = solid((10, 200, 30), (16, 16))
    path = cache.save("a woman, singing", 7, image, np.array([0.5, -1.0]), np.array([2.0, 3.0]),
                      "a woman, singing\nSteps: 2, Sampler: DPM++ 2M, Seed: 7")
    assert cache.has("a woman, singing", 7) and not cache.has("a woman, singing", 8)
    assert [p.name for p in cache.folder.iterdir()] == [path.name]  # no temporary left behind
    loaded = cache.load("a woman, singing", 7)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(image))
    assert loaded.latent_mean.tolist() == [0.5, -1.0] and loaded.latent_std.tolist() == [2.0, 3.0]
    with Image.open(path) as png:
        assert parse_parameters(png.info[PARAMETERS_KEY])[2]["Seed"] == "7"

    base = SamplingConfig(steps=2, width=64, height=64)
    plain, lora = ModelSpec(str(tiny_model_dir)), ModelSpec(str(tiny_model_dir), lora=str(tiny_lora))
    digest = model_digest(plain, base, torch.float32, None)
    assert digest == model_digest(ModelSpec(str(tiny_model_dir), label="other"), base, torch.float32, None)
    assert digest == model_digest(ModelSpec(str(tiny_model_dir), lora_weight=1.0), base, torch.float32, None)
    variants = {model_digest(lora, base, torch.float32, None),
                model_digest(ModelSpec(str(tiny_model_dir), lora=str(tiny_lora), lora_weight=1.0), base, torch.float32,
                             None),
                model_digest(ModelSpec(str(tiny_model_dir), lora=str(tiny_lora), lan_strength=1.0), base,
                             torch.float32, None),
                model_digest(plain, SamplingConfig(steps=3, width=64, height=64), torch.float32, None),
                model_digest(plain, base, torch.float16, None), digest}
    assert len(variants) == 6


def test_generate_missing_resumes_and_loads_the_model_only_when_needed(tmp_path, tiny_components):
    from hgdpo.inference.sampling import ImageGenerator

    loads = []

    def make_generator(spec):
        loads.append(spec.label)
        return ImageGenerator(tiny_components, device="cpu")

    spec = ModelSpec(tiny_components.source, label="sft")
    cache = ImageCache(tmp_path, "sft")
    pairs = [("a woman singing", 0), ("a woman singing", 1), ("a man running", 0)]
    config = SamplingConfig(steps=2, width=64, height=64)
    assert generate_missing(spec, cache, pairs, config, make_generator, batch_size=2) == 3
    assert generate_missing(spec, cache, pairs, config, make_generator, batch_size=2) == 0
    assert loads == ["sft"]  # the second call found everything cached
    before = np.asarray(cache.load("a woman singing", 1).image)
    cache.path("a woman singing", 1).unlink()  # as if killed before this image was written
    assert generate_missing(spec, cache, pairs, config, make_generator, batch_size=2) == 1
    assert np.array_equal(np.asarray(cache.load("a woman singing", 1).image), before)  # same seed, same image
    stats = cache.load("a man running", 0)
    assert stats.latent_mean.shape == stats.latent_std.shape == (4,) and (stats.latent_std > 0).all()


def test_metric_result_counts_ties_as_half():
    baseline = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    candidate = np.array([2.0, 3.0, 4.0, 4.0, 1.0])  # 3 wins, 1 tie, 1 loss
    result = metric_result(MetricSpec("pickscore"), baseline, candidate, tie_tolerance=0.0, resamples=2000)
    assert result["label"] == "PickScore" and result["win_rate"]["rate"] == pytest.approx(0.7)
    assert (result["win_rate"]["wins"], result["win_rate"]["ties"], result["win_rate"]["losses"]) == (3, 1, 1)
    assert result["win_rate"] == win_rate([1, 1, 1, 0.5, 0], resamples=2000).as_dict()
    assert result["difference"]["mean"] == pytest.approx(-0.2)
    assert metric_result(MetricSpec("x"), baseline, baseline + 0.05, 0.1, 100)["win_rate"]["ties"] == 5


# --------------------------------------------------------------------------- trainer/evaluate.py


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "trainer" / "evaluate.py"), *arguments, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.tiny_clip import build_tiny_clip, build_tiny_processor

    folder = tmp_path_factory.mktemp("clip") / "clip"
    build_tiny_clip().save_pretrained(folder)
    build_tiny_processor().save_pretrained(folder)
    return folder



def test_crossed_interval_widens_when_one_seed_decides_every_prompt():
    # 40 prompts x 8 seeds: the candidate wins every prompt on 5 seeds and loses every prompt on 3
    table = np.tile(np.array([1.0] * 5 + [0.0] * 3), (40, 1))
    crossed, pairs = crossed_win_rate(table), win_rate(table.ravel())
    assert crossed.rate == pairs.rate == pytest.approx(0.625) and (crossed.wins, crossed.losses) == (200, 120)
    assert pairs.low > 0.5, "320 pairs taken as independent exclude 0.5"
    assert crossed.low < 0.5 < 0.625 < crossed.high, "8 seeds do not"
    # independent outcomes: the crossed interval is about as wide as the one over pairs
    noise = np.random.default_rng(1).choice([0.0, 0.5, 1.0], size=(40, 8), p=[0.3, 0.2, 0.5])
    ratio = (crossed_win_rate(noise).high - crossed_win_rate(noise).low) / (
        win_rate(noise.ravel()).high - win_rate(noise.ravel()).low)
    assert 0.8 < ratio < 1.25


def test_crossed_interval_of_one_seed_is_the_bootstrap_over_prompts_and_metric_result_uses_it():
    outcomes = [1, 1, 0, 0.5, 1, 0]
    assert crossed_win_rate(np.array(outcomes)[:, None], resamples=500) == win_rate(outcomes, resamples=500)
    with pytest.raises(ValueError, match="prompts x seeds"):
        crossed_win_rate(np.array(outcomes))
    baseline = np.zeros(40 * 8)
    candidate = np.tile(np.array([1.0] * 5 + [-1.0] * 3), 40)  # prompt-major, 8 seeds per prompt
    result = metric_result(MetricSpec("x"), baseline, candidate, 0.0, 2000, seeds=8)["win_rate"]
    assert result == crossed_win_rate(candidate.reshape(40, 8) > 0, resamples=2000).as_dict()

def test_evaluate_cli_end_to_end(tmp_path, tiny_model_dir, tiny_lora, clip_dir):
    prompts = tmp_path / "parti.tsv"
    prompts.write_text("Prompt\tCategory\nbond\tAbstract\na woman singing\tPeople\na man running\tPeople\n"
                       "two children playing\tPeople\n", encoding="utf-8")
    out = tmp_path / "report"
    common = ["--baseline", str(tiny_model_dir), "--candidate-lora", str(tiny_lora), "--candidate-lora-weight", "1",
              "--prompts", str(prompts), "--output-dir", str(out), "--steps", "2", "--resolution", "64",
              "--bootstrap", "500"]
    plugin = "tests.test_evaluation:brightness"
    result = run_cli(*common, "--metrics", "clip", plugin, "--metric-model", f"clip={clip_dir}")
    assert result.returncode == 0, result.stderr
    assert "win rate vs baseline: CLIP" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["num_prompts"] == 3 and report["settings"]["num_pairs"] == 3  # People rows only
    assert {name: model["generated_now"] for name, model in report["models"].items()} == {"baseline": 3,
                                                                                          "candidate": 3}
    caches = {label: ImageCache(out / "images", model["digest"]) for label, model in report["models"].items()}
    pairs = [(pair["prompt"], pair["seed"]) for pair in report["pairs"]]
    images = {label: [cache.load(*pair).image for pair in pairs] for label, cache in caches.items()}
    assert not np.array_equal(np.asarray(images["baseline"][0]), np.asarray(images["candidate"][0]))  # the LoRA acts
    scores = {label: brightness(None, images[label]) for label in images}
    assert [pair["scores"][plugin]["candidate"] for pair in report["pairs"]] == pytest.approx(scores["candidate"])
    outcomes = [1.0 if c > b else 0.0 if c < b else 0.5 for b, c in zip(scores["baseline"], scores["candidate"])]
    assert report["metrics"][plugin]["win_rate"] == win_rate(outcomes, resamples=500).as_dict()
    hsv = {label: images_mean_hsv(images[label]) for label in images}
    for label, row in colour_shift(hsv, "baseline").items():
        assert report["colour_shift"][label] == pytest.approx(row)
    assert report["latent_statistics"]["latent_channels"] == 4
    for name in ("report.md", "report.html", "win_rates.png", "score_differences.png", "colour_shift.png",
                 "image_grid.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "thumbs").glob("*.png"))) == 6
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "| candidate vs baseline |" in markdown and "## Colour shift (paper Table 2)" in markdown
    assert 'href="images/' in page and "<th>CLIP</th>" in page

    # another metric later: nothing regenerated; a lost image: only that one regenerated, identically
    lost = caches["candidate"].path(*pairs[1])
    before = np.asarray(images["candidate"][1])
    lost.unlink()
    again = run_cli(*common, "--metrics", plugin)
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert {name: model["generated_now"] for name, model in report["models"].items()} == {"baseline": 0,
                                                                                          "candidate": 1}
    assert list(report["metrics"]) == [plugin]
    regenerated = np.asarray(caches["candidate"].load(*pairs[1]).image).astype(int)
    assert np.abs(regenerated - before).max() <= 1  # same seed; batch 1 now, batch 3 before: float rounding only


def test_evaluate_cli_reports_bad_options(tmp_path, tiny_model_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "trainer" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a woman singing\n", encoding="utf-8")
    common = ["--baseline", str(tiny_model_dir), "--prompts", str(prompts), "--output-dir", str(tmp_path / "out")]
    cases = [(["--metrics", "clip", "--metric-model", "hpsv2=x.pt"], "not in --metrics: hpsv2"),
             (["--metrics", "hpsv2", "--metric-model", f"hpsv2={tmp_path / 'missing.pt'}"], "missing.pt not found"),
             (["--candidate-lan"], "needs a LoRA"),
             (["--metric-model", "hpsv2"], "write NAME=SOURCE")]
    for arguments, message in cases:
        assert cli.main([*common, *arguments]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()  # refused before generating anything
