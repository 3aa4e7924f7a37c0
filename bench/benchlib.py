"""Helpers shared by the benchmark scripts in this folder (imported as ``benchlib``)."""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# people prompts, like the paper's training and test data
BENCH_PROMPTS = (
    "portrait photo of a young woman laughing, golden hour, 85mm, detailed skin",
    "a man in a blue suit standing in a rainy street at night, cinematic light",
    "two children playing football on a beach, summer, candid photograph",
    "an elderly woman knitting by the window, soft natural light, film grain",
    "a chef tasting soup in a busy restaurant kitchen, warm tones",
    "a grandfather reading to his granddaughter on a sofa, cosy evening light",
    "a female runner crossing the finish line, crowd cheering, telephoto",
    "a street musician playing violin under a bridge, overcast day",
)


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def median_ratio(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios (the variants of one round ran back to back)."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return statistics.median(ratios), min(ratios), max(ratios)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rounds(functions: dict, rounds: int, warmup: int, device: torch.device, label: str):
    """Warm-up rounds, then ``rounds`` timed rounds, the variant order rotating by one each round."""
    names = list(functions)
    for w in range(warmup):
        for name in names:
            start = time.perf_counter()
            functions[name]()
            print(f"  warm-up {w + 1}: {name} {time.perf_counter() - start:.2f}s", flush=True)
    seconds = {name: [] for name in names}
    cpu_seconds = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        line = []
        for name in order:
            gc.collect()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            functions[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - wall)
            cpu_seconds[name].append(time.process_time() - cpu)
            line.append(f"{name} {seconds[name][-1]:.2f}s")
        print(f"  {label} round {r + 1}/{rounds}: " + ", ".join(line), flush=True)
    return seconds, cpu_seconds


def proc_status(field_name: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def write_summary(path: str | None, summary: dict) -> None:
    """Write a benchmark's summary as JSON to ``path`` (nothing when no path was asked for)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")
