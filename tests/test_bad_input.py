"""Bad input on the real command lines: a one-line error naming the input and the fix, and nothing on disk changed.

Every case runs the CLI in a subprocess. Options are checked before any model is loaded, so the model path
here is never read (a case that got as far as loading would fail differently, and slowly).
"""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hgdpo.training.checkpoint import CheckpointManager, TrainingState

ROOT = Path(__file__).resolve().parents[1]


def _cli(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "trainer" / f"{name}.py")]


def tree_digest(*folders: Path) -> str:
    """sha256 over every path, file content and symlink target below ``folders``."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            digest.update(str(path.relative_to(folder)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, triplet_dataset):
    """A dataset, a run folder with checkpoints, a foreign dataset folder, a prompt file, a plain file."""
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    manager = CheckpointManager(run, keep_last=3)
    for step in (2, 4):
        manager.save(TrainingState(step=step, batches_seen=step), {"w": torch.full((2,), float(step))}, {})
    foreign = root / "foreign"
    shutil.copytree(triplet_dataset, foreign)
    (root / "prompts.txt").write_text("a person\n")
    (root / "a_file").write_text("not a folder\n")
    (root / "bad.toml").write_text("batch_size = [oops\n")
    (root / "typed.toml").write_text('batch_size = "abc"\n')
    return {"root": root, "run": run, "dataset": Path(triplet_dataset), "foreign": foreign}


def _train(w, *extra):
    return ["train", "--model", "no/model", "--dataset", w["dataset"], "--output-dir", w["run"], *extra]


def _build(w, *extra, output=None):
    return ["build_dataset", "--model", "no/model", "--prompts", w["root"] / "prompts.txt", "--output-dir",
            output or (w["root"] / "new-build"), *extra]


def _sample(w, *extra):
    return ["sample", "--model", "no/model", "--output-dir", w["root"] / "samples", "a person", *extra]


def _evaluate(w, *extra):
    return ["evaluate", "--baseline", "no/model", "--candidate-lora", w["root"] / "prompts.txt", "--prompts",
            w["root"] / "prompts.txt", "--output-dir", w["root"] / "eval", "--metrics", "clip", *extra]


# (case id, argv builder, exit code, words the last stderr line must contain)
CASES = [
    ("train-batch-size-0", lambda w: _train(w, "--batch-size", 0), 2, ["--batch-size 0", ">= 1"]),
    ("train-effective-batch-size-0", lambda w: _train(w, "--effective-batch-size", 0), 2,
     ["--effective-batch-size 0", ">= 1"]),
    ("train-not-a-multiple", lambda w: _train(w, "--batch-size", 4, "--effective-batch-size", 6), 2,
     ["--effective-batch-size 6", "multiple of --batch-size 4"]),
    ("train-checkpointing-steps-0", lambda w: _train(w, "--checkpointing-steps", 0), 2,
     ["--checkpointing-steps 0", ">= 1"]),
    ("train-log-every-0", lambda w: _train(w, "--log-every", 0), 2, ["--log-every 0", ">= 1"]),
    ("train-max-steps-negative", lambda w: _train(w, "--max-steps", -5), 2, ["--max-steps -5", ">= 1"]),
    ("train-learning-rate-negative", lambda w: _train(w, "--learning-rate=-1e-05"), 2,
     ["--learning-rate -1e-05", "> 0"]),
    ("train-learning-rate-nan", lambda w: _train(w, "--learning-rate", "nan"), 2, ["--learning-rate nan", "finite"]),
    ("train-lora-rank-0", lambda w: _train(w, "--lora-rank", 0), 2, ["--lora-rank 0", ">= 1"]),
    ("train-beta-inf", lambda w: _train(w, "--beta", "inf"), 2, ["--beta inf", "finite"]),
    ("train-adam-beta1-1.5", lambda w: _train(w, "--adam-beta1", 1.5), 2, ["--adam-beta1 1.5", "< 1"]),
    ("train-checkpoints-limit-0", lambda w: _train(w, "--checkpoints-total-limit", 0), 2,
     ["--checkpoints-total-limit 0", ">= 1"]),
    ("train-seed-negative", lambda w: _train(w, "--seed", -1), 2, ["--seed -1", ">= 0"]),
    ("train-output-dir-is-a-file", lambda w: _train(w, "--output-dir", w["root"] / "a_file"), 2,
     ["--output-dir", "is a file", "give a folder"]),
    ("train-output-name-with-folder", lambda w: _train(w, "--output-name", "sub/lora"), 2,
     ["--output-name 'sub/lora'", "without folders"]),
    ("train-dataset-missing", lambda w: ["train", "--model", "m", "--dataset", w["root"] / "nope", "--output-dir",
                                         w["run"]], 2, ["--dataset", "nope", "not found"]),
    ("train-resume-unknown", lambda w: _train(w, "--resume", "checkpoint-00000999"), 2,
     ["--resume checkpoint-00000999", "give 'latest'"]),
    ("train-config-missing", lambda w: _train(w, "--config", w["root"] / "none.toml"), 2,
     ["--config", "none.toml", "cannot read"]),
    ("train-config-bad-toml", lambda w: _train(w, "--config", w["root"] / "bad.toml"), 2,
     ["--config", "bad.toml", "TOML"]),
    ("train-config-wrong-type", lambda w: _train(w, "--config", w["root"] / "typed.toml"), 2,
     ["--batch-size", "expected an integer", "'abc'"]),
    ("train-lr-scheduler-unknown", lambda w: _train(w, "--lr-scheduler", "bogus"), 2, ["--lr-scheduler", "bogus"]),
    ("train-lora-targets-empty", lambda w: _train(w, "--lora-targets", ","), 2, ["--lora-targets", "at least one"]),
    ("build-cfg-nan", lambda w: _build(w, "--cfg", "nan"), 1, ["--cfg nan", "finite"]),
    ("build-pool-size-1", lambda w: _build(w, "--pool-size", 1), 1, ["--pool-size 1", ">= 2"]),
    ("build-steps-0", lambda w: _build(w, "--steps", 0), 1, ["--steps 0", ">= 1"]),
    ("build-loser-rank-too-high", lambda w: _build(w, "--pool-size", 3, "--loser-rank", 5), 1,
     ["--loser-rank 5", "<= 2"]),
    ("build-min-score-gap-negative", lambda w: _build(w, "--min-score-gap", -1), 1, ["--min-score-gap -1", ">= 0"]),
    ("build-seed-negative", lambda w: _build(w, "--seed", -3), 1, ["--seed -3", ">= 0"]),
    ("build-prompts-missing", lambda w: ["build_dataset", "--model", "m", "--prompts", w["root"] / "none.txt",
                                         "--output-dir", w["root"] / "new-build"], 1, ["--prompts", "not found"]),
    ("build-over-a-foreign-dataset", lambda w: _build(w, output=w["foreign"]), 1,
     ["--output-dir", "no build_config.json", "refusing to overwrite", "new or empty folder"]),
    ("build-output-dir-is-a-file", lambda w: _build(w, output=w["root"] / "a_file"), 1,
     ["--output-dir", "is a file"]),
    ("sample-steps-0", lambda w: _sample(w, "--steps", 0), 1, ["--steps 0", ">= 1"]),
    ("sample-cfg-nan", lambda w: _sample(w, "--cfg", "nan"), 1, ["--cfg nan", "finite"]),
    ("sample-lan-2", lambda w: _sample(w, "--lan", 2), 1, ["--lan 2", "<= 1"]),
    ("sample-width-odd", lambda w: _sample(w, "--width", 500), 1, ["500xauto", "multiples of 8"]),
    ("sample-lora-missing", lambda w: _sample(w, "--lora", w["root"] / "none.safetensors"), 1,
     ["--lora", "none.safetensors", "not found"]),
    ("sample-best-of-0", lambda w: _sample(w, "--best-of", 0), 1, ["--best-of 0", ">= 1"]),
    ("evaluate-tie-tolerance-nan", lambda w: _evaluate(w, "--tie-tolerance", "nan"), 1,
     ["--tie-tolerance nan", "finite"]),
    ("evaluate-bootstrap-0", lambda w: _evaluate(w, "--bootstrap", 0), 1, ["--bootstrap 0", ">= 1"]),
    ("evaluate-seed-negative", lambda w: _evaluate(w, "--seeds", -1), 1, ["--seeds -1", ">= 0"]),
    ("report-batch-size-0", lambda w: ["dataset_report", "--dataset", w["dataset"], "--output-dir",
                                       w["root"] / "report", "--batch-size", 0], 1, ["--batch-size 0", ">= 1"]),
    ("report-dataset-missing", lambda w: ["dataset_report", "--dataset", w["root"] / "nope", "--output-dir",
                                          w["root"] / "report"], 1, ["--dataset", "nope", "not found"]),
    ("cache-prune-negative-age", lambda w: ["cache", "--cache-dir", w["root"], "prune", "--older-than", -1], 1,
     ["--older-than -1", ">= 0"]),
    ("cache-dir-missing", lambda w: ["cache", "--cache-dir", w["root"] / "nope", "report"], 1,
     ["--cache-dir", "nope", "not a folder"]),
]


@pytest.mark.parametrize(("case", "argv", "code", "words"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_fails_in_one_line_and_changes_nothing(world, case, argv, code, words):
    args = [str(a) for a in argv(world)]
    watched = (world["run"], world["dataset"], world["foreign"])
    before = tree_digest(*watched)
    result = subprocess.run(_cli(args[0]) + args[1:], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "error" in line, line
    for word in words:
        assert word in line, (word, line)
    assert tree_digest(*watched) == before, "a refused command changed files on disk"
    for made in ("new-build", "samples", "eval", "report"):
        assert not (world["root"] / made).exists(), f"{made} was created by a refused command"
