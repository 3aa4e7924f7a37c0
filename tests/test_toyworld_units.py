"""The toy world's renderer, malformations, prompt grammar, judge and scorer (fast, no diffusion model)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hgdpo.toyworld import world
from hgdpo.toyworld.demo import FRAMES, TITLE_HEIGHT, framed, grid_pairs, panel
from hgdpo.toyworld.judge import AnatomyJudge, count_parts, judge
from hgdpo.toyworld.scorer import SHIPPED, WorldScorer

ROOT = Path(__file__).resolve().parents[1]


def _sample_scenes(count: int, seed: int = 3) -> list[world.Scene]:
    rng = random.Random(seed)
    return [rng.choice(world.all_scenes()) for _ in range(count)]


def test_grammar_round_trips_every_prompt_and_refuses_others():
    scenes = world.all_scenes()
    assert len(scenes) == len(set(scene.prompt for scene in scenes)) == 240
    assert all(world.parse_prompt(scene.prompt) == scene for scene in scenes)
    assert world.parse_prompt("A  Person in a red shirt with arms out ON A BEACH").pose == "arms_out"
    with pytest.raises(ValueError, match="not in the toy world's grammar"):
        world.parse_prompt("a cat on a sofa")


def test_render_is_deterministic_and_seed_moves_the_figure():
    scene = world.Scene("man", "blue", "arms_out", "night")
    first = np.asarray(world.render(scene, 5))
    assert first.shape == (world.SIZE, world.SIZE, 3)
    assert np.array_equal(first, np.asarray(world.render(scene, 5)))
    assert not np.array_equal(first, np.asarray(world.render(scene, 6)))


@pytest.mark.parametrize("kind", world.MALFORMATIONS)
def test_each_malformation_changes_the_image(kind):
    scene = world.Scene("woman", "green", "both_arms_up", "beach")
    changed = [not np.array_equal(np.asarray(world.render(scene, seed)), np.asarray(world.malform(scene, kind, seed)))
               for seed in range(10)]
    assert all(changed)


def test_swapped_malformations_draw_another_scene():
    scene = world.Scene("person", "red", "arms_down", "grass")
    assert world.drawn_scene(scene, "wrong_pose", 1).pose != "arms_down"
    assert world.drawn_scene(scene, "wrong_colour", 1).colour != "red"
    assert world.drawn_scene(scene, "melted", 1) == scene
    with pytest.raises(ValueError, match="Unknown malformation"):
        world.malform(scene, "two_heads")


def test_judge_passes_clean_renders_and_scores_them_above_malformed_ones():
    """On 100 scenes: clean renders are judged correct, and each beats its malformed twin far more often than not."""
    scenes = _sample_scenes(100)
    clean = [judge(scene.prompt, world.render(scene, i)) for i, scene in enumerate(scenes)]
    assert np.mean([result["correct"] for result in clean]) >= 0.95
    for kind in world.MALFORMATIONS:
        bad = [judge(scene.prompt, world.malform(scene, kind, i)) for i, scene in enumerate(scenes)]
        better = np.mean([c["score"] > b["score"] for c, b in zip(clean, bad)])
        assert better >= 0.5, (kind, better)
        assert np.mean([result["correct"] for result in bad]) <= 0.6, kind


def test_judge_reads_the_prompt():
    scene = world.Scene("person", "yellow", "arms_out", "indoor")
    image = world.render(scene, 0)
    assert judge(scene.prompt, image)["correct"] == 1.0
    other = world.Scene("person", "purple", "both_arms_up", "indoor")
    result = judge(other.prompt, image)
    assert result["colour"] == 0.0 and result["pose"] == 0.0


def test_grid_frames_each_image_in_the_judges_verdict():
    scene = world.Scene("woman", "green", "one_arm_up", "beach")
    good, bad = world.render(scene, 3), world.malform(scene, "missing_limb", 3)
    for image, colour in ((good, FRAMES[True]), (bad, FRAMES[False])):
        cell, verdict = framed(image, scene.prompt, scale=3)
        assert verdict == (colour == FRAMES[True])
        cell = np.asarray(cell)
        assert cell.shape == (world.SIZE * 3 + 6, world.SIZE * 3 + 6, 3)
        assert all(tuple(cell[y, x]) == colour for y, x in ((0, 0), (1, 50), (-1, -1), (50, -3)))
        assert np.array_equal(cell[3:-3, 3:-3][::3, ::3], np.asarray(image))  # the image itself, enlarged


def test_panel_places_each_image_in_rows_under_its_title():
    scene = world.Scene("man", "blue", "arms_out", "grass")
    images = [world.render(scene, 0), world.malform(scene, "extra_limb", 1), world.render(scene, 2)]
    sheet = np.asarray(panel(images, [scene.prompt] * 3, "SFT", columns=2, scale=2))
    side = world.SIZE * 2 + 4
    assert sheet.shape == (TITLE_HEIGHT + 2 * side, 2 * side, 3)
    corners = [tuple(sheet[TITLE_HEIGHT + row * side, column * side]) for row, column in ((0, 0), (0, 1), (1, 0))]
    assert corners == [FRAMES[True], FRAMES[False], FRAMES[True]]
    assert (sheet[TITLE_HEIGHT + side:, side:] == 255).all()  # the empty fourth place stays white
    assert (sheet[:TITLE_HEIGHT] < 128).any()  # the title is drawn


def test_grid_pairs_show_every_prompt_before_any_again_with_the_seeds_in_turn():
    indices = grid_pairs(num_prompts=3, num_seeds=4, count=7)
    assert [(index // 4, index % 4) for index in indices] == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 3), (0, 2)]
    assert len(grid_pairs(num_prompts=2, num_seeds=2, count=10)) == 4


def test_count_parts():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True
    mask[5:8, 5] = True
    mask[0, 7] = True  # a speck below the minimum size
    assert count_parts(mask) == 2


def test_judge_as_a_scorer_plugin():
    from hgdpo.feedback.scorers import load_scorer

    scorer = load_scorer("hgdpo.toyworld.judge:AnatomyJudge")
    assert isinstance(scorer, AnatomyJudge)
    scene = world.Scene("man", "red", "one_arm_up", "beach")
    scores = scorer.score([scene.prompt] * 2, [world.render(scene, 0), world.malform(scene, "melted", 0)])
    assert scores[0] > scores[1]


@pytest.mark.skipif(not (SHIPPED / "scorer.safetensors").is_file(), reason="the built world is not shipped")
def test_shipped_scorer_prefers_clean_renders_and_is_blind_to_extra_limbs_only_partly():
    scorer = WorldScorer()
    scenes = _sample_scenes(100, seed=11)
    prompts = [scene.prompt for scene in scenes]
    clean = scorer.score(prompts, [world.render(scene, i) for i, scene in enumerate(scenes)])
    for kind in world.MALFORMATIONS:
        bad = scorer.score(prompts, [world.malform(scene, kind, i) for i, scene in enumerate(scenes)])
        assert (clean > bad).float().mean() >= 0.6, kind


def test_demo_output_folder_is_replaced_only_when_the_demo_wrote_it(tmp_path):
    from hgdpo.toyworld.demo import DEMO_MARKER, prepare_output_dir

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"not the demo's")
    with pytest.raises(FileExistsError, match="was not written by the demo"):
        prepare_output_dir(mine)
    assert (mine / "holiday.png").read_bytes() == b"not the demo's"
    with pytest.raises(FileExistsError, match="not a folder"):
        prepare_output_dir(mine / "holiday.png")

    demo = prepare_output_dir(tmp_path / "demo_output")
    assert (demo / DEMO_MARKER).is_file()
    (demo / "report.html").write_text("old run")
    assert list(prepare_output_dir(demo).iterdir()) == [demo / DEMO_MARKER]  # an earlier run is replaced


@pytest.mark.parametrize("flag, value", [("--threads", "0"), ("--train-steps", "0")])
def test_demo_refuses_bad_counts_before_anything_runs(tmp_path, flag, value):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(ROOT / "trainer" / "demo.py"), "--output-dir", str(out), flag, value],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{flag} must be at least 1, got 0." in result.stderr
    assert not out.exists()
