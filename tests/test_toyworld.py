"""HG-DPO learns in the toy world: the whole pipeline (pools, AI feedback, DPO + statistic matching, LoRA,
evaluation) makes the shipped toy SFT model draw figures that the world's scorer prefers, on held-out prompts.

This runs the README demo's stages at a smaller size (a few CPU minutes). The judge's figure, which no
stage optimised, is reported in the assertion messages and printed.
"""

from __future__ import annotations

import pytest
import torch

from hgdpo.toyworld.demo import DemoSettings, run_demo
from hgdpo.toyworld.scorer import SHIPPED

pytestmark = pytest.mark.skipif(not (SHIPPED / "sft" / "unet").is_dir(), reason="the built toy world is not shipped")

SHORT = DemoSettings(num_train_prompts=64, num_eval_prompts=20, eval_seeds=(0, 1, 2, 3), pool_size=6,
                     train_steps=100, learning_rate=5e-4, compare_dpo_only=False, lora_weights=(1.0,), grid_prompts=4)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two on a busy machine
    try:
        return run_demo(tmp_path_factory.mktemp("toyworld") / "demo", SHORT, progress=lambda message: None)
    finally:
        torch.set_num_threads(threads)


def test_hgdpo_lora_beats_sft_by_the_scorer(figures):
    row = figures["models"]["lora_1"]
    scorer, judge = row["scorer_win_rate"], row["judge_win_rate"]
    print(f"scorer win rate {scorer}, judge win rate {judge}, judge-correct {figures['models']['sft']['judge_correct']}"
          f" -> {row['judge_correct']}")
    # the judge's figure is reported, not asserted: the demo's 160 pairs put it above 0.5 with 95% confidence
    # (0.57 [0.52, 0.63] at 1, README), but these 80 pairs (seeds 0-3 of the same prompts) do not (0.51 [0.43, 0.59])
    assert scorer["low"] > 0.5, f"scorer win rate {scorer} (judge {judge})"


def test_lan_keeps_the_gain_and_the_report_is_written(figures):
    row = figures["models"]["lora_lan"]
    assert row["scorer_win_rate"]["rate"] > 0.5, row
    assert figures["training"]["hgdpo"]["dpo/implicit_accuracy last"] > 0.5
    assert figures["report"].endswith("report.html")
