"""Training configuration: one dataclass, exposed as command-line flags and as a TOML file.

Every field's help text says its default and, where the paper fixes it, the paper's value.
Precedence: built-in defaults < ``--config FILE`` (TOML) < flags given on the command line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from hgdpo.models.loading import DTYPES, ModelOptions  # noqa: F401  (DTYPES: the precision names, where training code has them)
from hgdpo.options import (
    check_fields,
    config_parser,
    flag_name,
    nested,
    option,
    parse_config,
    parse_resolution,
    save_config,
    to_toml,
)
from hgdpo.training.losses import DEFAULT_BETA, DEFAULT_LAMBDA_STAT

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    # what to train
    model: str = option(None, "SD1.5- or SDXL-family model (SDXL, Pony, Illustrious, NoobAI ...): single-file "
                              ".safetensors/.ckpt, diffusers folder or hub id.")
    model_options: ModelOptions = nested(ModelOptions)
    dataset: str = option(None, "Triplet dataset folder (index.parquet) or Pick-a-Pic v2 style parquet file/folder.")
    output_dir: str = option(None, "Folder for the LoRA, checkpoints, logs and validation images.")
    output_name: str = option("hgdpo_lora", "File name (without .safetensors) of the final LoRA.")
    model_config_dir: str = option(
        None, "Diffusers-layout config folder for single-file checkpoints (default: the bundled configs of its "
              "family)."
    )
    people_only: bool = option(False, "Pick-a-Pic input: keep only pairs whose caption is about people ('(H)').")
    bad_images: str = option(
        "skip", "Corrupt or missing dataset image: skip the pair (counted) or stop.", ("skip", "stop")
    )
    # objective
    loss: str = option(
        "hgdpo",
        "hgdpo: DPO + statistic matching (Eq. 9); dpo: Diffusion-DPO only (Eq. 3); sft: noise-prediction loss "
        "on winners (the paper's SFT baseline).",
        ("hgdpo", "dpo", "sft"),
    )
    beta: float = option(
        DEFAULT_BETA, "DPO beta of Eq. 3 (paper: 2500; Salesforce's code writes 0.5*beta_dpo with beta_dpo=5000).",
        above=0,
    )
    lambda_stat: float = option(DEFAULT_LAMBDA_STAT, "Weight of the statistic-matching loss, Eq. 9 (paper: 10000).",
                                at_least=0)
    # LoRA
    lora_rank: int = option(8, "LoRA rank (paper: 8).", at_least=1, at_most=1024)
    lora_alpha: float = option(8.0, "LoRA alpha; the update is scaled by alpha/rank (default: 8).",
                                above=0)
    lora_targets: str = option("to_q,to_k,to_v,to_out.0", "Comma-separated UNet linears to adapt (paper: attention).")
    # data
    resolution: str = option("auto", "Training size: N for NxN or WxH such as 704x1024 (paper); multiples of 8 "
                                     "(auto: the model family's, SD1.5 512, SDXL 1024).")
    batch_size: int = option(1, "Pairs per device per micro-batch.", at_least=1)
    effective_batch_size: int = option(16, "Pairs per optimizer step over all devices, via accumulation (paper: 16).",
                                          at_least=1)
    cache_dir: str = option(
        None, "Where VAE latents and text embeddings are cached (default: $HGDPO_CACHE or ~/.cache/hgdpo)."
    )
    # optimisation
    max_steps: int = option(2000, "Optimizer steps to train.", at_least=1)
    learning_rate: float = option(1e-5, "AdamW learning rate (paper: 1e-5).", above=0)
    adam_beta1: float = option(0.9, "AdamW beta1 (paper: 0.9).", at_least=0, below=1)
    adam_beta2: float = option(0.999, "AdamW beta2 (paper: 0.999).", at_least=0, below=1)
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.", at_least=0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", above=0)
    optimizer: str = option(
        "adamw8bit", "adamw8bit (bitsandbytes, falls back to adamw with a warning where it cannot run) or adamw.",
        ("adamw8bit", "adamw"),
    )
    lr_scheduler: str = option("constant", "diffusers LR schedule.", LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "LR warm-up steps.", at_least=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).", at_least=0)
    mixed_precision: str = option("no", "Mixed precision: no, fp16 (GPU only) or bf16.", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet.")
    seed: int = option(0, "Seed for the LoRA init, data order, noise and timesteps.", at_least=0,
                        at_most=MAX_SEED)
    max_nonfinite_steps: int = option(5, "Stop after this many optimizer steps in a row with NaN/inf gradients.",
                                      at_least=1)
    # checkpoints, logs, validation
    checkpointing_steps: int = option(500, "Write a resumable checkpoint every N optimizer steps.", at_least=1)
    checkpoints_total_limit: int = option(
        3, "Keep this many newest checkpoints (the one just written is always kept).", at_least=1
    )
    resume: str = option(None, "'latest' or a checkpoint folder to continue from.")
    save_precision: str = option("fp16", "dtype of the saved LoRA file.", ("fp16", "bf16", "fp32"))
    log_every: int = option(1, "Log scalars to TensorBoard every N optimizer steps.", at_least=1)
    validation_steps: int = option(500, "Render validation images every N optimizer steps and at the end (0: never).",
                                   at_least=0)
    validation_prompts: list[str] = option(
        None, "Prompts for validation images (default: the dataset's first two prompts)."
    )
    validation_seeds: list[int] = option(None, "Seeds for validation images (default: 0 1).", at_least=0,
                                          at_most=MAX_SEED)
    validation_lora_weights: list[float] = option(
        None, "LoRA weights shown side by side (default: 0 0.5; paper: 0.5)."
    )
    validation_inference_steps: int = option(20, "DPM-Solver++ steps for validation images (paper sampling: 50).",
                                             at_least=1, at_most=1000)
    validation_guidance_scale: float = option(5.0, "CFG scale for validation images (paper: 5.0).",
                                                 at_least=0)

    def __post_init__(self) -> None:
        self.validation_seeds = self.validation_seeds or [0, 1]
        self.validation_lora_weights = self.validation_lora_weights or [0.0, 0.5]

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) in pixels; None for ``auto`` until :func:`hgdpo.training.loop.setup_run` sets it."""
        return parse_resolution(self.resolution)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_targets.split(",") if name.strip())

    def validate(self) -> None:
        """Check every option (type, range, choices, paths) before anything is loaded; raise a one-line ValueError."""
        for name in ("model", "dataset", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{flag_name(name)} is required (flag or config file).")
        check_fields(self)
        self.size  # noqa: B018  (raises on a bad resolution)
        if self.effective_batch_size % self.batch_size:
            raise ValueError(f"--effective-batch-size {self.effective_batch_size} must be a multiple of --batch-size "
                             f"{self.batch_size}.")
        if not self.target_modules:
            raise ValueError(f"--lora-targets {self.lora_targets!r}: name at least one UNet linear, e.g. to_q,to_k.")
        if not self.output_name.strip() or Path(self.output_name).name != self.output_name:
            raise ValueError(f"--output-name {self.output_name!r}: give a file name without folders.")
        self._validate_paths()

    def _validate_paths(self) -> None:
        for name in ("output_dir", "cache_dir"):
            value = getattr(self, name)
            if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
                raise ValueError(f"{flag_name(name)} {value} is a file; give a folder (it is created if missing).")
        if not Path(self.dataset).expanduser().exists():
            raise ValueError(f"--dataset {self.dataset} not found; give a triplet dataset folder (index.parquet) "
                             "or a Pick-a-Pic style .parquet file or folder.")
        if self.model_config_dir and not Path(self.model_config_dir).expanduser().is_dir():
            raise ValueError(f"--model-config-dir {self.model_config_dir} is not a folder; give a diffusers-layout "
                             "config folder or leave it out.")
        if self.resume not in (None, "latest"):
            named = Path(self.output_dir) / "checkpoints" / self.resume
            if not (Path(self.resume) / "state.json").is_file() and not (named / "state.json").is_file():
                raise ValueError(f"--resume {self.resume}: no checkpoint there (no state.json); give 'latest', a "
                                 "checkpoint folder, or a checkpoint name under OUTPUT_DIR/checkpoints.")

    def to_toml(self) -> str:
        """The config as a TOML document that ``--config`` reads back."""
        return to_toml(self)




def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Command-line flags for every :class:`TrainConfig` field, plus ``--config``."""
    return config_parser(TrainConfig, "Train an HG-DPO LoRA for an SD1.5- or SDXL-family model from a preference dataset.",
                         prog)


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and the TOML file named by ``--config``) into a validated :class:`TrainConfig`."""
    parser = build_parser()
    config, _ = parse_config(TrainConfig, parser, argv)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config


__all__ = ["DTYPES", "MAX_SEED", "TrainConfig", "build_parser", "load_config", "save_config"]
