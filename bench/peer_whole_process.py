#!/usr/bin/env python
"""Whole-process benchmark: ``trainer/train.py`` against diffusers' own ``train_diffusion_dpo.py``.

Both scripts run as a user runs them, each in its own process under ``/usr/bin/time -v``, on the same
random-weight SD1.5-architecture model (``hgdpo.models.tiny.sd15_configs``, saved as a diffusers folder
with a tokenizer) and the same Pick-a-Pic-style parquet file. Runs alternate (ours, peer, ours, ...) and
the figures are medians over rounds: wall, user and system CPU seconds, minor and major page faults,
peak RSS, and the 1-minute load average after each run. ``ours-glibc-defaults`` is our trainer with
the allocator settings of :mod:`hgdpo.training.allocator` switched off. The peer script is not part of this repository: pass its path (from a diffusers checkout,
``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``; it needs ``datasets`` and ``wandb``).

    python bench/peer_whole_process.py --peer /tmp/train_diffusion_dpo.py --python VENV/bin/python --json bench/results/whole-cpu-sd15-64.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hgdpo.training.allocator import DISABLE_ENV

_TIME_FIELDS = {
    "user_s": "User time (seconds)",
    "sys_s": "System time (seconds)",
    "minor_faults": "Minor (reclaiming a frame) page faults",
    "major_faults": "Major (requiring I/O) page faults",
    "max_rss_kib": "Maximum resident set size (kbytes)",
}


def build_model(path: Path, arch: str) -> Path:
    """A random-weight diffusers folder with a ``tokenizer/`` (diffusers' script loads one from there)."""
    from hgdpo.models.loading import clip_tokenizer
    from hgdpo.models.tiny import build_models, save_diffusers_folder, sd15_configs, tiny_sd15_configs

    if (path / "model_index.json").exists():
        return path
    configs = sd15_configs() if arch == "sd15" else tiny_sd15_configs()
    save_diffusers_folder(build_models(configs, seed=0), configs, path)
    clip_tokenizer().save_pretrained(path / "tokenizer")
    index = json.loads((path / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def build_dataset(folder: Path, pairs: int, resolution: int) -> Path:
    """``train.parquet`` in Pick-a-Pic v2's columns (random JPEGs); both trainers read it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    file = folder / "train.parquet"
    if file.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buffer, "JPEG")
        return buffer.getvalue()

    table = pa.table({
        "caption": [f"a photo of object number {i}" for i in range(pairs)],
        "jpg_0": [jpeg() for _ in range(pairs)],
        "jpg_1": [jpeg() for _ in range(pairs)],
        "label_0": [1.0] * pairs,
        "label_1": [0.0] * pairs,
    })
    pq.write_table(table, file)
    return folder


def ours_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [args.python, str(REPO / "trainer" / "train.py"), "--model", str(model),
            "--dataset", str(data / "train.parquet"), "--output-dir", str(out), "--cache-dir", str(out / "cache"),
            "--resolution", str(args.resolution), "--batch-size", str(args.pairs),
            "--effective-batch-size", str(args.pairs), "--max-steps", str(args.steps),
            "--mixed-precision", "no", "--optimizer", "adamw", "--checkpointing-steps", "100000",
            "--validation-steps", "0", "--seed", "0"]


def peer_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [args.python, str(Path(args.peer).resolve()), "--pretrained_model_name_or_path", str(model),
            "--dataset_name", str(data), "--dataset_split_name", "train", "--output_dir", str(out),
            "--cache_dir", str(out / "hf-cache"), "--resolution", str(args.resolution),
            "--train_batch_size", str(args.pairs), "--max_train_steps", str(args.steps),
            "--mixed_precision", "no", "--checkpointing_steps", "100000", "--rank", "8",
            "--beta_dpo", "2500", "--learning_rate", "1e-5", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--seed", "0", "--report_to", "tensorboard"]


def timed_run(command: list[str], out: Path, env: dict[str, str]) -> dict:
    """Run ``command`` under ``/usr/bin/time -v`` in a fresh output folder; its wall time, counters, load."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(["/usr/bin/time", "-v"] + command, check=False, stdout=handle, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if done.returncode:
        raise RuntimeError(f"{command[1]} failed ({done.returncode}); see {log}:\n{text[-3000:]}")
    result = {"wall_s": wall, "load_average_1min_after": os.getloadavg()[0]}
    for key, label in _TIME_FIELDS.items():
        match = re.search(re.escape(label) + r":\s*([\d.]+)", text)
        result[key] = float(match.group(1)) if match else None
    return result


def summary(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", help="path of diffusers' train_diffusion_dpo.py (omit to run ours only)")
    parser.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2, help="pairs per optimizer step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both processes")
    parser.add_argument("--work", default="/tmp/hgdpo-peer-bench", help="model, data and outputs go here")
    parser.add_argument("--python", default=sys.executable, help="interpreter of both (the peer needs datasets)")
    parser.add_argument("--variants", default="ours,ours-glibc-defaults,diffusers",
                        help="any of: ours, ours-glibc-defaults (HGDPO_KEEP_FREED_MEMORY=0), diffusers")
    parser.add_argument("--json", help="write the settings, every run and the medians here")
    args = parser.parse_args()

    work = Path(args.work)
    model = build_model(work / f"model-{args.arch}", args.arch)
    data = build_dataset(work / f"data-{args.pairs * args.steps}-{args.resolution}", args.pairs * args.steps,
                         args.resolution)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    known = {"ours": (ours_command, {}), "ours-glibc-defaults": (ours_command, {DISABLE_ENV: "0"}),
             "diffusers": (peer_command, {})}
    variants = {name: known[name] for name in args.variants.split(",")}
    if "diffusers" in variants and not args.peer:
        parser.error("--peer is needed to run diffusers' script")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
        for name in order:
            out = work / f"out-{name}"
            command, extra_env = variants[name]
            result = timed_run(command(args, model, data, out), out, dict(env, **extra_env))
            runs[name].append(result)
            print(f"round {round_index} {name}: " + ", ".join(f"{k} {v:.6g}" for k, v in result.items()), flush=True)
    medians = {name: summary(values) for name, values in runs.items()}
    report = {
        "settings": vars(args),
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "load_average": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
        "runs": runs,
        "medians": medians,
    }
    if "diffusers" in medians:
        peer = medians["diffusers"]
        report["ratios_over_diffusers"] = {
            name: {key: values[key] / peer[key] for key in ("wall_s", "user_s", "sys_s", "minor_faults", "max_rss_kib")}
            for name, values in medians.items() if name != "diffusers"}
    print(json.dumps({"medians": medians, "ratios": report.get("ratios_over_diffusers")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
