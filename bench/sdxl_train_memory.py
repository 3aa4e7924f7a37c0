#!/usr/bin/env python
"""SDXL training, whole process: pairs/s and peak GPU memory of ours against diffusers' SDXL DPO recipe.

Both run as a user runs them, in their own process, on the same random-weight model of the real SDXL
architecture (the bundled configs in ``hgdpo/models/configs/sdxl``; ``--arch tiny`` for a check on the
CPU), the same Pick-a-Pic-style parquet file, batch and resolution, with gradient checkpointing,
bf16 and 8-bit AdamW (the last two on CUDA only):

* ``ours``: ``trainer/train.py --model <folder>`` (the family is detected from the folder);
* ``diffusers``: ``train_diffusion_dpo_sdxl.py`` from diffusers' ``examples/research_projects/diffusion_dpo``
  (``--peer``; not part of this repository, it needs ``datasets`` and ``wandb``).

Each runs twice, with ``--steps`` A and B optimizer steps (alternated: A of each, then B of each), under a
wrapper that records the process's wall time, ``torch.cuda.max_memory_allocated`` and ``ru_maxrss`` at exit
(``--threads`` sets OMP_NUM_THREADS for both; on a shared CPU one thread avoids oversubscription).
Throughput is ``(B - A) * pairs / (wall_B - wall_A)``, so loading and encoding cancel out; the peak is that of
run B.
A run that fails is recorded with its error and the others go on.

    python bench/sdxl_train_memory.py --peer /tmp/train_diffusion_dpo_sdxl.py \
        --json bench/results/gpu-train-sdxl-1024.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peer_whole_process import build_dataset

from hgdpo.models.families import SDXL
from hgdpo.models.loading import clip_tokenizer
from hgdpo.models.tiny import build_models

_WRAPPER = """
import atexit, json, resource, runpy, sys, time
start = time.perf_counter()
def report():
    import torch
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print("PROBE " + json.dumps({"wall_s": time.perf_counter() - start, "cuda_peak_bytes": peak,
                                 "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_model(path: Path, arch: str) -> Path:
    """A random-weight SDXL diffusers folder with both tokenizers (diffusers' script loads them from there)."""
    from tests import sdxl_factory

    if (path / "model_index.json").exists():
        return path
    if arch == "full":
        configs = {name: json.loads((SDXL.config_dir / name / "config.json").read_text())
                   for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    else:
        configs = sdxl_factory.tiny_sdxl_configs()
    sdxl_factory.save_diffusers_folder(build_models(configs, seed=0), configs, path)
    for name in ("tokenizer", "tokenizer_2"):
        clip_tokenizer().save_pretrained(path / name)
    index = json.loads((path / "model_index.json").read_text())
    index.update(tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "CLIPTokenizer"])
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def ours_command(args, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    command = [str(REPO / "trainer" / "train.py"), "--model", str(model), "--dataset", str(data / "train.parquet"),
               "--output-dir", str(out), "--cache-dir", str(out.parent / "cache-ours"),
               "--resolution", str(args.resolution), "--batch-size", str(args.pairs),
               "--effective-batch-size", str(args.pairs), "--max-steps", str(steps), "--gradient-checkpointing",
               "--mixed-precision", args.mixed_precision, "--optimizer", args.optimizer,
               "--checkpointing-steps", "100000", "--validation-steps", "0", "--seed", "0"]
    if args.resolution != 1024:  # off SDXL's buckets (a CPU run at small size): ours refuses it unless asked
        command.append("--any-resolution")
    return command


def peer_command(args, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    command = [str(Path(args.peer).resolve()), "--pretrained_model_name_or_path", str(model),
               "--dataset_name", str(data), "--dataset_split_name", "train", "--output_dir", str(out),
               "--cache_dir", str(out / "hf-cache"), "--resolution", str(args.resolution),
               "--train_batch_size", str(args.pairs), "--max_train_steps", str(steps), "--gradient_checkpointing",
               "--mixed_precision", args.mixed_precision, "--checkpointing_steps", "100000", "--rank", "8",
               "--learning_rate", "1e-5", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
               "--seed", "0", "--report_to", "tensorboard"]
    return command + (["--use_8bit_adam"] if args.optimizer == "adamw8bit" else [])


def probed_run(command: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run a script under the wrapper; its wall time and peaks, or its error."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], check=False, stdout=handle,
                              stderr=subprocess.STDOUT, env=env)
    text = log.read_text(errors="replace")
    probe = [line for line in text.splitlines() if line.startswith("PROBE ")]
    if done.returncode or not probe:
        return {"error": f"exit {done.returncode}; see {log}", "tail": text[-1500:]}
    return json.loads(probe[-1].removeprefix("PROBE "))


def alternated_runs(args, variants: dict, model: Path, data: Path, env: dict[str, str]) -> dict[str, dict]:
    """Every variant's runs of A then B steps, alternated (A of each, then B of each: a change of load on a
    shared machine hits both alike); a variant whose run A failed skips its run B."""
    runs = {name: {} for name in variants}
    for steps in args.steps:
        for name, command_of in variants.items():
            if any("error" in run for run in runs[name].values()):
                continue
            out = Path(args.work) / f"out-{name}-{steps}"
            run = probed_run(command_of(args, model, data, out, steps), out.parent / f"{out.name}.log", env)
            run["load_average_after"] = os.getloadavg()  # other jobs on a shared machine
            runs[name][steps] = run
            print(f"{name}, {steps} steps: {run}", flush=True)
    return runs


def figures(args, by_steps: dict[int, dict]) -> dict:
    """One variant's pairs/s from the difference of its runs A and B, and the peaks of run B (or its error)."""
    short, long = args.steps
    errors = [run["error"] for run in by_steps.values() if "error" in run]
    seconds = None if errors else by_steps[long]["wall_s"] - by_steps[short]["wall_s"]
    if seconds is not None and seconds <= 0:  # the load changed between the runs more than the extra steps cost
        errors = [f"run B was not slower than run A ({seconds:.1f} s)"]
    if errors:
        return {"runs": by_steps, "error": errors[0]}
    return {"runs": by_steps, "pairs_per_s": (long - short) * args.pairs / seconds,
            "s_per_step": seconds / (long - short), "cuda_peak_bytes": by_steps[long]["cuda_peak_bytes"],
            "max_rss_kib": by_steps[long]["max_rss_kib"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", help="diffusers' train_diffusion_dpo_sdxl.py (omit to run ours only)")
    parser.add_argument("--arch", choices=("full", "tiny"), default="full")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per optimizer step (one micro-batch)")
    parser.add_argument("--steps", type=lambda text: tuple(int(n) for n in text.split(",")), default=(3, 9),
                        help="A,B: the two run lengths")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw8bit")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of each run (OMP_NUM_THREADS); 0: torch's default (all cores)")
    parser.add_argument("--work", default="/tmp/hgdpo-sdxl-bench", help="model, data and outputs go here")
    parser.add_argument("--json", help="write the settings, every run and the figures here")
    args = parser.parse_args()

    work = Path(args.work)
    model = work / f"model-sdxl-{args.arch}"
    # built in a child process: this one would keep the model's memory (10 GB at full size) beside the runs
    builder = multiprocessing.get_context("spawn").Process(target=build_model, args=(model, args.arch))
    builder.start()
    builder.join()
    if builder.exitcode:
        raise SystemExit(f"building the model failed (exit {builder.exitcode})")
    data = build_dataset(work / f"data-{args.pairs * max(args.steps)}-{args.resolution}",
                         args.pairs * max(args.steps), args.resolution)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    if args.threads:  # torch's intra-op threads in both scripts (OpenMP/MKL read these at start)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    variants = {"ours": ours_command} | ({"diffusers": peer_command} if args.peer else {})
    results = {name: figures(args, by_steps)
               for name, by_steps in alternated_runs(args, variants, model, data, env).items()}
    report = {"settings": {key: value for key, value in vars(args).items()},
              "environment": {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                              "load_average": os.getloadavg()},
              "results": results}
    if all("pairs_per_s" in value for value in results.values()) and "diffusers" in results:
        ours, peer = results["ours"], results["diffusers"]
        report["ours_over_diffusers"] = {"pairs_per_s": ours["pairs_per_s"] / peer["pairs_per_s"]}
        if ours["cuda_peak_bytes"] and peer["cuda_peak_bytes"]:
            report["ours_over_diffusers"]["cuda_peak"] = ours["cuda_peak_bytes"] / peer["cuda_peak_bytes"]
    print(json.dumps({name: {k: v for k, v in value.items() if k != "runs"} for name, value in results.items()},
                     indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in value for value in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
