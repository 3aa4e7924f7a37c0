#!/usr/bin/env python
"""Whole-process wall time and peak memory of the README demo (trainer/demo.py), and each stage's share.

Runs the demo once in a fresh subprocess (so the figures are those a new user sees), measures its wall time
and its peak resident memory (the kernel's high-water mark of the child, ``ru_maxrss``), and reads the
demo's own per-stage timings (builder, trainer, evaluation) from ``figures.json``. The baseline of the shares
is the same run's whole wall time. Writes ``bench/results/demo-cpu.json``.

    python bench/demo_stages.py [--output bench/results/demo-cpu.json] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_name  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "demo-cpu.json"))
    parser.add_argument("--work-dir", default=None, help="Where the demo writes (default: a temporary folder).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        demo_dir = Path(args.work_dir or scratch) / "demo_output"
        started = time.monotonic()
        subprocess.run([sys.executable, str(ROOT / "trainer" / "demo.py"), "--output-dir", str(demo_dir)],
                       check=True, cwd=ROOT)
        wall = time.monotonic() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        figures = json.loads((demo_dir / "figures.json").read_text())
    stages = figures["seconds"]
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "stage_seconds": stages,
        "stage_share_of_wall": {stage: round(seconds / wall, 3) for stage, seconds in stages.items()},
        "other_seconds (start-up, model loading, report)": round(wall - sum(stages.values()), 1),
        "figures": figures,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "figures"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
