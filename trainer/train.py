#!/usr/bin/env python
"""Train an HG-DPO LoRA for an SD1.5-family model.

    python trainer/train.py --model model.safetensors --dataset triplets/ --output-dir out --max-steps 2000
    accelerate launch trainer/train.py --config my_run.toml          # several GPUs, data parallel

Writes ``<output-dir>/hgdpo_lora.safetensors`` (kohya format: ComfyUI, WebUI, diffusers) and the
config that produced it beside it. ``--resume latest`` continues an interrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.training.config import load_config  # noqa: E402
from hgdpo.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    from hgdpo.training.loop import train

    return run_cli(lambda: f"LoRA written to {train(config)}")


if __name__ == "__main__":
    sys.exit(main())
