#!/usr/bin/env python
"""Kill -9 trials: the dataset builder and the trainer SIGKILLed at random moments, then resumed.

    python bench/kill_trials.py --trials 20 --json bench/results/kill-trials-cpu-tiny.json

Not a benchmark of speed and not run by CI (``tests/test_bad_input.py`` runs a two-trial version). On the
tiny random-weight model (``hgdpo.models.tiny``), each trial starts a fresh run, kills it with SIGKILL after a
random moment (after a random number of committed prompts / checkpoints, plus a random 0-2 s: anywhere from
model loading through encoding, generation, training, checkpointing and the final write),
and runs the same command again (``--resume latest`` for the trainer). Invariants checked per trial:

* builder: the finished dataset holds each prompt exactly once, every image decodes, no temporary is left,
  and it equals (prompts, scores, seeds) the dataset of an uninterrupted build;
* trainer: the final LoRA equals the LoRA of an uninterrupted run (max abs difference <= 1e-5) and no
  temporary is left under the checkpoints.

The baseline of each is an uninterrupted run in the same process, made first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [f"a photo of person number {k}" for k in range(8)]
TRAIN_STEPS = ["--resolution", "64", "--effective-batch-size", "2", "--validation-steps", "0",
               "--save-precision", "fp32", "--max-steps", "12", "--checkpointing-steps", "2",
               "--learning-rate", "1e-3", "--optimizer", "adamw"]


def warmth(prompts, images):
    """Plug-in scorer (``--scorer bench.kill_trials:warmth``): mean red minus mean blue."""
    import numpy as np

    return [float(np.asarray(image, dtype=np.float32)[..., 0].mean() - np.asarray(image, dtype=np.float32)[..., 2]
                  .mean()) for image in images]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HGDPO_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(command: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode:
        raise RuntimeError(f"{command[1]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.monotonic() - start


def _killed(command: list[str], env: dict[str, str], progress, target: int, delay: float) -> bool:
    """Start ``command``; once ``progress()`` reaches ``target``, wait ``delay`` s and SIGKILL it.

    False if it finished before the kill.
    """
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while progress() < target and process.poll() is None:
        time.sleep(0.01)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _count(folder: Path, pattern: str):
    return lambda: len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp-*")] if folder.exists() else []


def _dataset_rows(folder: Path) -> list[tuple]:
    from hgdpo.data.readers import open_preference_dataset

    dataset = open_preference_dataset(folder)
    rows = []
    for i in range(len(dataset)):
        dataset.load_pair(i)  # every image decodes
        meta = dataset.item_metadata(i)
        rows.append((dataset.prompt(i), meta["win_score"], meta["lose_score"], meta["win_seed"], meta["lose_seed"]))
    return sorted(rows)


def _lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def builder_trials(work: Path, model: Path, trials: int, rng: random.Random) -> dict:
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    def command(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "trainer" / "build_dataset.py"), "--model", str(model), "--prompts",
                str(prompts), "--output-dir", str(out), "--pool-size", "3", "--steps", "2", "--resolution", "64",
                "--batch-size", "2", "--scorer", "bench.kill_trials:warmth", "--no-progress"]

    env = _env(work / "cache")
    duration = _run(command(work / "build-straight"), env)
    expected = _dataset_rows(work / "build-straight")
    outcomes = []
    for trial in range(trials):
        out = work / f"build-{trial}"
        # the moment: k prompts committed (k = 0: anywhere in start-up), then a random fraction of a prompt
        target, delay = rng.randrange(len(PROMPTS)), rng.uniform(0.0, 2.0)
        killed = _killed(command(out), env, _count(out / "records", "*.json"), target, delay)
        records = len(list((out / "records").glob("*.json"))) if (out / "records").is_dir() else 0
        _run(command(out), env)
        rows = _dataset_rows(out)
        prompts_once = sorted(row[0] for row in rows) == sorted(PROMPTS)
        ok = prompts_once and rows == expected and not _temporaries(out)
        outcomes.append({"after_records": target, "delay_s": round(delay, 2), "killed": killed,
                         "records_at_kill": records, "ok": ok})
        print(f"builder trial {trial}: after {target} records + {delay:.2f}s killed={killed} records={records} "
              f"ok={ok}", flush=True)
    return {"uninterrupted_s": round(duration, 1), "trials": outcomes}


def trainer_trials(work: Path, model: Path, trials: int, rng: random.Random) -> dict:
    from hgdpo.data.synthetic import write_synthetic_triplets

    dataset = write_synthetic_triplets(work / "triplets", num_pairs=8)

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "trainer" / "train.py"), "--model", str(model), "--dataset",
                str(dataset), "--output-dir", str(out), *TRAIN_STEPS, *extra]

    duration = _run(command(work / "train-straight"), _env(work / "cache-straight"))
    expected = _lora(work / "train-straight" / "hgdpo_lora.safetensors")
    outcomes = []
    for trial in range(trials):
        out, env = work / f"train-{trial}", _env(work / f"cache-{trial}")
        # the moment: k checkpoints written (k = 0: anywhere in start-up and encoding), then a random delay
        target, delay = rng.randrange(6), rng.uniform(0.0, 2.0)
        killed = _killed(command(out), env, _count(out / "checkpoints", "checkpoint-*"), target, delay)
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
        _run(command(out, "--resume", "latest"), env)
        lora = _lora(out / "hgdpo_lora.safetensors")
        difference = max((lora[k] - expected[k]).abs().max().item() for k in expected) if lora.keys() == \
            expected.keys() else float("inf")
        ok = difference <= 1e-5 and not _temporaries(out / "checkpoints")
        outcomes.append({"after_checkpoints": target, "delay_s": round(delay, 2), "killed": killed,
                         "latest_at_kill": (checkpoints or [None])[-1],
                         "max_abs_difference": difference, "ok": ok})
        print(f"trainer trial {trial}: after {target} checkpoints + {delay:.2f}s killed={killed} "
              f"latest={(checkpoints or [None])[-1]} diff={difference:.2e} ok={ok}", flush=True)
    return {"uninterrupted_s": round(duration, 1), "trials": outcomes}


def _summary(result: dict) -> dict:
    trials = result["trials"]
    return {"trials": len(trials), "killed": sum(t["killed"] for t in trials), "ok": sum(t["ok"] for t in trials)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="Trials per tool.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill delays.")
    parser.add_argument("--only", choices=("builder", "trainer"), default=None, help="Run one tool's trials.")
    parser.add_argument("--json", default=None, help="Write the outcomes here.")
    arguments = parser.parse_args(argv)
    from hgdpo.models.tiny import build_tiny_model

    rng = random.Random(arguments.seed)
    report = {}
    with tempfile.TemporaryDirectory(prefix="hgdpo-kill-") as temporary:
        work = Path(temporary)
        model = build_tiny_model(work / "model")
        if arguments.only in (None, "builder"):
            report["builder"] = builder_trials(work, model, arguments.trials, rng)
        if arguments.only in (None, "trainer"):
            report["trainer"] = trainer_trials(work, model, arguments.trials, rng)
    report["summary"] = {name: _summary(result) for name, result in report.items()}
    print(json.dumps(report["summary"]))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(s["ok"] == s["trials"] for s in report["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
