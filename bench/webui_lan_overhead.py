#!/usr/bin/env python
"""LAN samplers against their plain counterparts, in one WebUI process (AUTOMATIC1111 1.10 or Forge).

A benchmark, not a test. It drives a real WebUI through its HTTP API: the one named by
``HGDPO_WEBUI_DIR`` / ``HGDPO_WEBUI_PYTHON`` / ``HGDPO_WEBUI_CKPT``, started headless with this extension
by ``extension/webui_harness.py`` (on the CPU unless ``HGDPO_WEBUI_DEVICE=gpu``), with a random rank-8
HG-DPO LoRA on the attention linears (the trainer's layout); or a running WebUI with this extension
(``--url``; ``--pid`` adds its CPU time; ``--lora`` names a LoRA of its Lora folder).

For each sampler two variants are timed in the same process, one image (batch 1) per call, CFG 5:

* ``plain``  the WebUI's own sampler ("DPM++ 2M"): one UNet evaluation (cond + uncond) per step;
* ``lan``    "DPM++ 2M (HG-DPO LAN)" at LoRA weight 0.5, LAN strength 1: the SFT and the DPO model from
             the same noise, two UNet evaluations per step, LAN on every step.

LAN does twice the UNet work by construction, so the ratio approaches 2 as the UNet dominates; what
both variants share (text encoding, VAE decoding, PNG encoding, HTTP) pulls it below 2. Warm-up, then
rounds that alternate the order (plain-LAN, LAN-plain, ...); the time of a call is its wall time seen by
the client, and (with a known process) the WebUI process's CPU time (user + system, all threads), which
a busy shared machine disturbs less. A ratio is the median of the per-round ratios (``benchlib``).

    HGDPO_WEBUI_DIR=~/stable-diffusion-webui HGDPO_WEBUI_PYTHON=~/stable-diffusion-webui/venv/bin/python \\
    HGDPO_WEBUI_CKPT=~/models/v1-5-pruned-emaonly.safetensors python bench/webui_lan_overhead.py --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import BENCH_PROMPTS, cpu_name, median_ratio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extension.settings import lan_sampler_name
from extension.webui_harness import (
    WebUI,
    WebUIClient,
    config_from_environment,
    prepare_data_dir,
    process_cpu_seconds,
)

LORA = "hgdpo_bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--samplers", nargs="+", default=["DPM++ 2M"], help="plain sampler names; each gets its LAN twin")
    add("--size", type=int, default=256, help="image width and height")
    add("--steps", type=int, default=10)
    add("--cfg", type=float, default=5.0)
    add("--weight", type=float, default=0.5, help="HG-DPO LoRA weight")
    add("--rounds", type=int, default=3)
    add("--warmup", type=int, default=1, help="untimed calls of each variant first")
    add("--url", help="a running WebUI with this extension (instead of starting one)")
    add("--pid", type=int, help="with --url: the WebUI's process id, for its CPU time")
    add("--lora", default=LORA, help="with --url: an HG-DPO LoRA of that WebUI's Lora folder")
    add("--work-dir", help="the started WebUI's data dir (default: a temp dir)")
    add("--json", help="write the results here")
    return parser.parse_args(argv)


def write_lora(folder: Path) -> None:
    """A random rank-8 LoRA on SD1.5's attention linears (shapes from a meta-device UNet)."""
    import torch
    from diffusers import UNet2DConditionModel

    from hgdpo.models.tiny import sd15_configs
    from tests.sd15_factory import save_random_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in sd15_configs()["unet"].items() if not k.startswith("_")})
    save_random_lora(unet, folder / f"{LORA}.safetensors", rank=8, std=0.02)


class Client:
    """The timed API calls (a started WebUI or one at --url)."""

    def __init__(self, webui, pid: int | None):
        self.webui, self.pid = webui, pid

    def generate(self, args, sampler: str, lan: bool, seed: int) -> dict:
        body = {
            "prompt": BENCH_PROMPTS[0],
            "negative_prompt": "blurry",
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            "cfg_scale": args.cfg,
            "seed": seed,
            "batch_size": 1,
            "n_iter": 1,
            "sampler_name": lan_sampler_name(sampler) if lan else sampler,
            "send_images": True,
            "save_images": False,
        }
        if lan:
            body["alwayson_scripts"] = {"HG-DPO": {"args": [args.lora, args.weight, 1.0]}}
        cpu = process_cpu_seconds(self.pid) if self.pid else None
        start = time.perf_counter()
        status, payload = self.webui.post("/sdapi/v1/txt2img", body)
        wall = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"txt2img with {body['sampler_name']}: HTTP {status}: {str(payload)[:1000]}")
        cpu = process_cpu_seconds(self.pid) - cpu if self.pid else None
        return {"wall_s": wall, "cpu_s": cpu}


def run(args, client: Client, backend: str) -> dict:
    results = {"backend": backend, "samplers": {}}
    for sampler in args.samplers:
        for lan in (False, True):
            for index in range(args.warmup):
                client.generate(args, sampler, lan, seed=1000 + index)
        rounds = []
        for index in range(args.rounds):
            order = (False, True) if index % 2 == 0 else (True, False)
            timed = {("lan" if lan else "plain"): client.generate(args, sampler, lan, seed=index) for lan in order}
            rounds.append(timed)
            print(
                f"{sampler} round {index + 1}: plain {timed['plain']['wall_s']:.1f} s, "
                f"LAN {timed['lan']['wall_s']:.1f} s",
                flush=True,
            )
        summary = {}
        for measure in ("wall_s", "cpu_s"):
            if rounds[0]["plain"][measure] is None:
                continue
            plain = [r["plain"][measure] for r in rounds]
            lan = [r["lan"][measure] for r in rounds]
            ratio, low, high = median_ratio(lan, plain)
            summary[measure] = {"plain_median": statistics.median(plain), "lan_median": statistics.median(lan),
                                "ratio_median": ratio, "ratio_min": low, "ratio_max": high}
        results["samplers"][sampler] = {"rounds": rounds, "summary": summary}
    return results


def table(results: dict, args) -> str:
    title = (f"{results['backend']}, {args.size}x{args.size}, {args.steps} steps, batch 1, CFG {args.cfg}, "
             f"{args.rounds} rounds ({cpu_name() or platform.machine()})")
    lines = [title, "",
             "| sampler | plain s/image | LAN s/image | LAN / plain (wall) | LAN / plain (CPU time) |",
             "|---|---|---|---|---|"]
    for sampler, data in results["samplers"].items():
        wall, cpu = data["summary"]["wall_s"], data["summary"].get("cpu_s")
        cpu_text = f"{cpu['ratio_median']:.2f} ({cpu['ratio_min']:.2f}-{cpu['ratio_max']:.2f})" if cpu else "-"
        lines.append(f"| {sampler} | {wall['plain_median']:.1f} | {wall['lan_median']:.1f} | "
                     f"{wall['ratio_median']:.2f} ({wall['ratio_min']:.2f}-{wall['ratio_max']:.2f}) | {cpu_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        running = WebUIClient(args.url)
        results = run(args, Client(running, args.pid), running.get("/hgdpo/v1/status")["backend"])
    else:
        config, reason = config_from_environment()
        if config is None:
            print(f"error: {reason} (or pass --url)", file=sys.stderr)
            return 2
        args.lora = LORA
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="hgdpo-webui-bench-"))
        data_dir = prepare_data_dir(work, config.checkpoint)
        if not (data_dir / "models" / "Lora" / f"{LORA}.safetensors").exists():
            write_lora(data_dir / "models" / "Lora")
        with WebUI(config, data_dir) as webui:
            backend = webui.get("/hgdpo/v1/status")["backend"]
            results = run(args, Client(webui, webui.pid), backend)
    results.update(settings={key: getattr(args, key) for key in ("size", "steps", "cfg", "weight", "rounds", "warmup")},
                   cpu=cpu_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
