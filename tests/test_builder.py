"""The AI-feedback dataset builder (HG-DPO Eq. 4-6) on the tiny model, with a real "warmth" scorer."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BUILD = [sys.executable, str(ROOT / "trainer" / "build_dataset.py")]
PROMPTS = ["a portrait of a woman", "a man riding a bicycle", "two children playing"]


def warmth(image: Image.Image) -> float:
    """Mean red minus mean blue: a deterministic, checkable score (higher = warmer)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


def warmth_scorer(prompts, images):
    """Plug-in scorer for the command line: ``--scorer tests.test_builder:warmth_scorer``."""
    return [warmth(image) for image in images]


class WarmthScorer:
    name = "warmth"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, images):
        assert len(prompts) == len(images)
        self.calls += 1
        return torch.tensor(warmth_scorer(prompts, images), dtype=torch.float32)


class CrashingScorer(WarmthScorer):
    """Dies on its n-th call, like a process killed mid-build."""

    def __init__(self, crash_on: int):
        super().__init__()
        self.crash_on = crash_on

    def score(self, prompts, images):
        if self.calls + 1 == self.crash_on:
            raise KeyboardInterrupt("simulated crash")
        return super().score(prompts, images)


class FlatForSomeScorer(WarmthScorer):
    """Warmth, except that prompts containing 'flat' score 0 for every image (gap 0)."""

    def score(self, prompts, images):
        values = super().score(prompts, images)
        return torch.where(torch.tensor(["flat" in p for p in prompts]), torch.zeros_like(values), values)


def _config(tmp_dir: Path, model, prompts_file, **overrides):
    from hgdpo.data.builder import BuildConfig

    options = dict(model=str(model), prompts=str(prompts_file), output_dir=str(tmp_dir), pool_size=4, steps=2,
                   resolution="64", batch_size=3, seed=7)
    options.update(overrides)
    return BuildConfig(**options)


def _write_prompts(path: Path, prompts) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tiny_components):
    from hgdpo.data.builder import build_dataset

    root = tmp_path_factory.mktemp("build")
    config = _config(root / "out", tiny_model_dir, _write_prompts(root / "prompts.txt", PROMPTS))
    result = build_dataset(config, WarmthScorer(), components=tiny_components, show_progress=False)
    return config, result


# --------------------------------------------------------------------------- prompts


def test_read_prompts_txt_tsv_jsonl(tmp_path):
    from hgdpo.prompts import read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("  a cat \n\n a dog\na cat\n   \nbird\n", encoding="utf-8")
    result = read_prompts(txt)
    assert result.prompts == ["a cat", "a dog", "bird"]
    assert (result.dropped_empty, result.dropped_duplicates) == (2, 1)

    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\n"
                   "a woman reading\tPeople\tSimple Detail\t\n"
                   "a red car\tVehicles\tColors\t\n"
                   "a man, smiling\tPeople\tBasic\tquoted \"note\"\n"
                   "a woman reading\tPeople\tSimple Detail\t\n"
                   "\tPeople\tBasic\t\n", encoding="utf-8")
    people = read_prompts(tsv, category="People")
    assert people.prompts == ["a woman reading", "a man, smiling"]
    assert (people.dropped_empty, people.dropped_duplicates) == (1, 1)
    assert read_prompts(tsv).prompts == ["a woman reading", "a red car", "a man, smiling"]
    assert read_prompts(tsv, column="Challenge").prompts == ["Simple Detail", "Colors", "Basic"]
    with pytest.raises(ValueError, match=r"no column 'Text'.*\['Prompt', 'Category', 'Challenge', 'Note'\]"):
        read_prompts(tsv, column="Text")

    csv_file = tmp_path / "p.csv"
    csv_file.write_text('caption,score\n"a child, laughing",1\nan old man,2\n', encoding="utf-8")
    assert read_prompts(csv_file).prompts == ["a child, laughing", "an old man"]  # no Prompt: first column

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": " a girl "}\n\n{"prompt": ""}\n{"prompt": "a girl"}\n{"prompt": "a boy"}\n',
                     encoding="utf-8")
    result = read_prompts(jsonl)
    assert result.prompts == ["a girl", "a boy"] and (result.dropped_empty, result.dropped_duplicates) == (1, 1)


def test_read_prompts_rejects_non_utf8_with_offset(tmp_path):
    from hgdpo.prompts import read_prompts

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        read_prompts(bad)
    message = str(info.value)
    assert str(bad) in message and "byte offset 5" in message and "re-save it as UTF-8" in message
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- selection and seeds


def test_select_pair_winner_loser_rank_and_min_gap():
    from hgdpo.data.builder import select_pair

    scores = [0.3, 0.9, 0.1, 0.5, 0.2]
    pick = select_pair(scores)
    assert (pick.winner, pick.loser, pick.win_score, pick.lose_score, pick.skipped) == (1, 2, 0.9, 0.1, None)
    assert select_pair(scores, loser_rank=2).loser == 4  # the second worst
    assert select_pair(scores, loser_rank=4).loser == 3  # the best of the others
    assert select_pair([1.0, 1.0, 1.0]).winner == 0 and select_pair([1.0, 1.0, 1.0]).loser == 1  # ties: never itself
    assert select_pair([0.5, 0.2, 0.2]).loser == 1
    gap = select_pair(scores, min_score_gap=0.81)
    assert gap.skipped and "0.8" in gap.skipped and (gap.winner, gap.loser) == (1, 2)
    assert select_pair(scores, min_score_gap=0.8).skipped is None  # 0.9 - 0.1 is not below 0.8
    for bad in (dict(loser_rank=0), dict(loser_rank=5)):
        with pytest.raises(ValueError, match="loser_rank"):
            select_pair(scores, **bad)
    with pytest.raises(ValueError, match="finite"):
        select_pair([0.1, float("nan")])


def test_keeper_holds_what_selection_needs():
    from hgdpo.data.builder import _Keeper, select_pair

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        rank = rng.randint(1, n - 1)
        keeper = _Keeper(rank + 1)
        for j, s in enumerate(scores):
            keeper.add(s, j, f"image{j}")
        pick = select_pair(scores, loser_rank=rank)
        assert keeper.image(pick.winner) == f"image{pick.winner}"
        assert keeper.image(pick.loser) == f"image{pick.loser}"
        assert len(keeper.lowest) <= rank + 1


def test_derive_seed_is_deterministic_distinct_and_int64():
    from hgdpo.data.builder import derive_seed

    seeds = {derive_seed(0, i, j) for i in range(50) for j in range(20)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, 1, 2) == derive_seed(3, 1, 2) != derive_seed(4, 1, 2)


# --------------------------------------------------------------------------- a full build


def test_build_writes_triplets_with_scores_and_seeds(built):
    from hgdpo.data.readers import open_preference_dataset

    config, result = built
    out = Path(config.output_dir)
    assert (result.num_pairs, result.num_skipped, result.generated_prompts) == (3, 0, 3)
    dataset = open_preference_dataset(out)
    assert len(dataset) == 3
    assert (dataset.info.pool_size, dataset.info.scorer, dataset.info.model) == (4, "warmth", config.model)
    assert dataset.metadata["builder"]["steps"] == 2 and dataset.metadata["builder"]["resolution"] == "64x64"
    table = __import__("pyarrow.parquet", fromlist=["x"]).read_table(out / "index.parquet").to_pydict()
    assert table["prompt"] == PROMPTS
    for i in range(3):
        win, lose = dataset.load_pair(i)
        assert win.size == lose.size == (64, 64)
        scores = table["scores"][i]
        assert len(scores) == 4
        # recorded scores are the scorer's values of the stored (lossless PNG) images
        assert warmth(win) == pytest.approx(table["win_score"][i], abs=1e-3) == pytest.approx(max(scores), abs=1e-3)
        assert warmth(lose) == pytest.approx(table["lose_score"][i], abs=1e-3) == pytest.approx(min(scores), abs=1e-3)
        assert warmth(win) >= warmth(lose)
        record = json.loads((out / "records" / f"{i:06d}.json").read_text())
        assert record["status"] == "ok" and record["prompt"] == PROMPTS[i] and len(record["seeds"]) == 4
        assert table["win_seed"][i] == record["seeds"][record["winner"]]
        assert table["lose_seed"][i] == record["seeds"][record["loser"]]
    assert json.loads((out / "build_config.json").read_text())["settings"]["pool_size"] == 4


def test_one_image_regenerates_from_its_recorded_seed_alone(built, tiny_components):
    from hgdpo.data.builder import PoolGenerator

    config, _ = built
    out = Path(config.output_dir)
    record = json.loads((out / "records" / "000002.json").read_text())
    generator = PoolGenerator(tiny_components, config, "cpu", torch.float32)
    for key in ("win", "lose"):
        image = generator.generate(record["prompt"], [record[f"{key}_seed"]])[0]  # batch of 1, not 3
        stored = np.asarray(Image.open(out / record[f"{key}_image"]), dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - stored).max() <= 1


def test_crash_and_resume_gives_the_same_dataset(tmp_path, built, tiny_components, tiny_model_dir):
    from hgdpo.data.builder import build_dataset

    config, _ = built
    prompts = _write_prompts(tmp_path / "prompts.txt", PROMPTS)
    resumed_config = _config(tmp_path / "out", tiny_model_dir, prompts)
    with pytest.raises(KeyboardInterrupt):  # 2 batches per prompt: dies during prompt 1's second batch
        build_dataset(resumed_config, CrashingScorer(crash_on=4), components=tiny_components, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / "records").iterdir()) == ["000000.json"]
    assert not (tmp_path / "out" / "index.parquet").exists()
    result = build_dataset(resumed_config, WarmthScorer(), components=tiny_components, show_progress=False)
    assert (result.num_pairs, result.generated_prompts) == (3, 2)
    for name in ("000000_win.png", "000001_lose.png", "000002_win.png"):
        a = np.asarray(Image.open(tmp_path / "out" / "images" / "0000" / name), dtype=np.int16)
        b = np.asarray(Image.open(Path(config.output_dir) / "images" / "0000" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    again = build_dataset(resumed_config, WarmthScorer(), components=tiny_components, show_progress=False)
    assert (again.num_pairs, again.generated_prompts) == (3, 0)


def test_changed_settings_and_corrupt_records_are_refused(tmp_path, built, tiny_components):
    from dataclasses import replace

    from hgdpo.data.builder import build_dataset

    config, _ = built
    with pytest.raises(ValueError, match=r"different settings.*steps: 2 -> 3.*seed: 7 -> 8"):
        build_dataset(replace(config, steps=3, seed=8), WarmthScorer(), components=tiny_components, show_progress=False)

    class Other(WarmthScorer):
        name = "other"

    with pytest.raises(ValueError, match=r"scorer: 'warmth' -> 'other'"):
        build_dataset(config, Other(), components=tiny_components, show_progress=False)

    copy = tmp_path / "copy"
    shutil.copytree(config.output_dir, copy)
    record = copy / "records" / "000001.json"
    record.write_text('{"prompt_index": 1, "prom')
    with pytest.raises(ValueError, match=r"000001\.json: corrupt build record.*delete it to regenerate prompt 1"):
        build_dataset(replace(config, output_dir=str(copy)), WarmthScorer(), components=tiny_components,
                      show_progress=False)
    record.unlink()  # as the message says: the prompt is regenerated
    result = build_dataset(replace(config, output_dir=str(copy)), WarmthScorer(), components=tiny_components,
                           show_progress=False)
    assert (result.num_pairs, result.generated_prompts) == (3, 1)


def test_keep_pool_loser_rank_and_min_gap_skip(tmp_path, tiny_components, tiny_model_dir):
    from hgdpo.data.builder import build_dataset
    from hgdpo.data.readers import open_preference_dataset

    prompts = _write_prompts(tmp_path / "prompts.txt", ["a warm portrait", "a flat portrait", "a man"])
    config = _config(tmp_path / "out", tiny_model_dir, prompts, keep_pool=True, loser_rank=2, min_score_gap=1e-6,
                     batch_size=4)
    result = build_dataset(config, FlatForSomeScorer(), components=tiny_components, show_progress=False)
    assert (result.num_pairs, result.num_skipped) == (2, 1) and result.skipped[0][0] == 1
    out = tmp_path / "out"
    skipped = json.loads((out / "records" / "000001.json").read_text())
    assert skipped["status"] == "skipped" and "min_score_gap" in skipped["reason"] and skipped["scores"] == [0.0] * 4
    assert len(list((out / "pool").rglob("*.png"))) == 12 and not (out / "images").exists()
    dataset = open_preference_dataset(out)
    assert [dataset.prompt(i) for i in range(len(dataset))] == ["a warm portrait", "a man"]
    assert dataset.metadata["num_skipped"] == 1
    for i, index in enumerate((0, 2)):
        record = json.loads((out / "records" / f"{index:06d}.json").read_text())
        scores = record["scores"]
        assert scores[record["loser"]] == sorted(scores)[1]  # the second worst
        win, lose = dataset.load_pair(i)
        assert warmth(win) == pytest.approx(max(scores), abs=1e-3)
        assert warmth(lose) == pytest.approx(sorted(scores)[1], abs=1e-3)
        assert [warmth(Image.open(out / rel)) for rel in record["pool_images"]] == pytest.approx(scores, abs=1e-3)


# --------------------------------------------------------------------------- the command line


def _records(out: Path) -> int:
    folder = out / "records"
    return len(list(folder.glob("[0-9]*.json"))) if folder.is_dir() else 0


def test_cli_killed_repeatedly_resumes_to_complete_dataset_and_exports(tmp_path, tiny_single_file, tiny_model_dir):
    pytest.importorskip("hgdpo.feedback.scorers")
    from hgdpo.data.readers import open_preference_dataset

    prompts = [f"a photo of person number {k}" for k in range(10)]
    prompt_file = _write_prompts(tmp_path / "prompts.txt", prompts)
    out = tmp_path / "out"
    common = [*BUILD, "--model", str(tiny_single_file), "--model-config-dir", str(tiny_model_dir),
              "--prompts", str(prompt_file), "--output-dir", str(out), "--pool-size", "3", "--steps", "2",
              "--resolution", "64", "--batch-size", "2", "--scorer", "tests.test_builder:warmth_scorer",
              "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random()
    kills = []
    for _ in range(3):
        before = _records(out)
        process = subprocess.Popen(common, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while _records(out) <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        delay = rng.uniform(0.0, 0.8)
        time.sleep(delay)
        if process.poll() is not None:
            break  # it finished before the kill
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        kills.append((delay, _records(out)))
        assert not (out / "index.parquet").exists()
    print("kills (delay, records):", kills)
    assert kills and kills[0][1] < len(prompts), f"no kill happened mid-build: {kills}"

    export = tmp_path / "pickapic.parquet"
    final = subprocess.run(common + ["--export-pickapic", str(export)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "10 pairs from 10 prompts" in final.stdout
    dataset = open_preference_dataset(out)
    assert sorted(dataset.prompt(i) for i in range(len(dataset))) == sorted(prompts), kills  # each exactly once
    assert _records(out) == 10 and not list(out.rglob("*.tmp-*"))
    for i in range(len(dataset)):
        win, lose = dataset.load_pair(i)  # every image decodes
        assert warmth(win) >= warmth(lose)
    exported = open_preference_dataset(export)
    assert len(exported) == len(dataset)
    for i in range(len(dataset)):
        assert exported.prompt(i) == dataset.prompt(i)
        assert warmth(exported.load_pair(i)[0]) == pytest.approx(warmth(dataset.load_pair(i)[0]), abs=3)

    changed = subprocess.run(common + ["--steps", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert changed.returncode == 1 and "error:" in changed.stderr and "steps: 2 -> 3" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_cli_help_documents_defaults_and_bad_input_fails_in_one_line(tmp_path):
    help_text = subprocess.run(BUILD + ["--help"], capture_output=True, text=True, timeout=120).stdout
    flat = " ".join(help_text.split())
    for option in ("--pool-size", "--scorer", "--scorer-model", "--resolution", "--steps", "--cfg", "--batch-size",
                   "--seed", "--loser-rank", "--min-score-gap", "--keep-pool", "--prompt-column", "--category",
                   "--export-pickapic", "--model-config-dir"):
        assert option in flat
    assert "(paper: 20). (default: 20)" in flat and "(paper: 5.0). (default: 5.0)" in flat
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe prompt\n")
    result = subprocess.run(BUILD + ["--model", "x", "--prompts", str(bad), "--output-dir", str(tmp_path / "o"),
                                     "--scorer", "tests.test_builder:warmth_scorer"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "re-save it as UTF-8" in result.stderr and "Traceback" not in result.stderr


def test_two_processes_split_the_prompts_and_the_main_one_merges(tmp_path, tiny_model_dir):
    """torchrun with 2 CPU processes (gloo), as `accelerate launch` runs several GPUs."""
    pytest.importorskip("hgdpo.feedback.scorers")
    from hgdpo.data.builder import derive_seed
    from hgdpo.data.readers import open_preference_dataset

    prompts = [f"prompt {k}" for k in range(5)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", BUILD[1],
               "--model", str(tiny_model_dir), "--prompts", str(_write_prompts(tmp_path / "p.txt", prompts)),
               "--output-dir", str(out), "--pool-size", "3", "--steps", "2", "--resolution", "64",
               "--scorer", "tests.test_builder:warmth_scorer", "--seed", "5", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(ROOT)})
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + result.stderr[-2000:]
    assert result.stdout.count("Dataset written") == 1
    dataset = open_preference_dataset(out)
    assert [dataset.prompt(i) for i in range(len(dataset))] == prompts  # merged in prompt order
    for i in range(5):
        record = json.loads((out / "records" / f"{i:06d}.json").read_text())
        assert record["seeds"] == [derive_seed(5, i, j) for j in range(3)]
