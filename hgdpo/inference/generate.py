"""The ``trainer/sample.py`` job: prompts and seeds in, PNG files with generation parameters out."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hgdpo.inference import infotext
from hgdpo.feedback.scorers import SCORER_HELP, SCORER_MODEL_HELP, SCORER_PROCESSOR_HELP, load_named_scorer
from hgdpo.inference.sampling import ImageGenerator, SamplingConfig, best_of_n
from hgdpo.models.loading import (
    CONFIG_DIR_HELP,
    DEVICE_HELP,
    DTYPE_CHOICES,
    DTYPE_HELP,
    ModelOptions,
    peek_family,
    resolve_dtype,
)
from hgdpo.models.lora_runtime import read_lora
from hgdpo.options import SEED_LIMITS, check_fields, nested, option

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.feedback.scorers import Scorer

logger = logging.getLogger(__name__)

COUNT_LIMITS = {"at_least": 1, "at_most": 10_000}


@dataclass
class GenerateJob:
    """What to generate and where: the ``trainer/sample.py`` flags (``--help`` documents each field)."""

    model: str = option(help="SD1.5- or SDXL-family model (the SFT model): single-file .safetensors/.ckpt, "
                             "diffusers folder or hub id.")
    prompt: list[str] = option([], "A prompt (repeatable; same as a positional PROMPT).", repeat=True)
    prompts: str | None = option(None, "Prompt file: .txt (one per line), .tsv/.csv (with a header) or .jsonl.")
    category: str | None = option(None, "Keep only rows of this Category of a .tsv/.csv (e.g. People).")
    output_dir: Path = option(Path("outputs"), "Folder for the PNG files (created).")
    config: SamplingConfig = nested(SamplingConfig)
    lora: str | None = option(None, "HG-DPO LoRA (kohya .safetensors); the DPO model is the model plus this LoRA.")
    dpo_model: str | None = option(None, "A separate DPO checkpoint instead of (or besides) --lora; costs a second "
                                         "copy of the UNet.")
    best_of: int = option(1, "Generate N candidates per image and keep the one the scorer prefers.", metavar="N",
                          **COUNT_LIMITS)
    num_images: int = option(1, "Images per prompt.", **COUNT_LIMITS)
    seed: int = option(0, "Base seed: image j of prompt i uses seed + (i*num_images + j)*best_of (+k for "
                          "candidate k).", **SEED_LIMITS)
    batch_size: int = option(4, "Images (or candidates) per UNet batch.", **COUNT_LIMITS)
    save_candidates: bool = option(False, "With --best-of: also save every candidate, ranked, under "
                                          "OUTPUT_DIR/candidates/.")
    save_sft: bool = option(False, "With --lan: also save the SFT trajectory's image (no extra cost).")
    two_forwards: bool = option(False, "With --lan and --lora: evaluate SFT and DPO in two UNet calls instead of "
                                       "one batched call.")
    scorer: str = option("pickscore", SCORER_HELP)
    scorer_model: str | None = option(None, SCORER_MODEL_HELP)
    scorer_processor: str | None = option(None, SCORER_PROCESSOR_HELP)
    model_config_dir: str | None = option(None, CONFIG_DIR_HELP)
    model_options: ModelOptions = nested(ModelOptions)
    device: str | None = option(None, DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, DTYPE_CHOICES)

    @property
    def shared_forward(self) -> bool:
        """Whether one UNet call evaluates the SFT and the DPO half of a LAN batch."""
        return not self.two_forwards

    def prompt_texts(self) -> list[str]:
        """The prompts given as text, then those of the prompt file."""
        from hgdpo.prompts import read_prompts

        return [*self.prompt, *(read_prompts(self.prompts, category=self.category) if self.prompts else [])]

    def validate(self) -> None:
        check_fields(self)
        self.config.validate()
        if not self.prompt_texts():
            raise ValueError("No prompt given: pass PROMPT, --prompt TEXT or --prompts FILE.")
        for flag, path in (("--lora", self.lora), ("--model-config-dir", self.model_config_dir)):
            if path is not None and not Path(path).expanduser().exists():
                raise FileNotFoundError(f"{flag} {path} not found; check the path.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output-dir {self.output_dir} is a file; give a folder (it is created if missing).")
        if self.save_sft and (self.config.lan_strength == 0.0 or self.best_of > 1):
            raise ValueError("--save-sft needs --lan and no --best-of (the SFT image comes from the lockstep "
                             "trajectory of a single image).")

    def items(self) -> Iterator[tuple[int, str, int]]:
        """(output index, prompt, base seed) of every output image."""
        for i, prompt in enumerate(self.prompt_texts()):
            for j in range(self.num_images):
                index = i * self.num_images + j
                yield index, prompt, self.seed + index * self.best_of


def _parameters(job: GenerateJob, prompt: str, seed: int, model_hash: str | None, lora_hash: str | None,
                score: float | None) -> str:
    """The WebUI-style ``parameters`` text of one image."""
    config = job.config
    fields: dict[str, object] = {
        "Steps": config.steps,
        "Sampler": config.sampler_label,
        "Schedule type": "Karras" if config.schedule == "karras" else None,
        "CFG scale": config.guidance_scale,
        "Seed": seed,
        "Size": f"{config.width}x{config.height}",
        "Model hash": model_hash,
        "Model": Path(job.model).stem,
    }
    if job.lora:
        fields.update({infotext.LORA_KEY: Path(job.lora).stem, infotext.LORA_HASH_KEY: lora_hash,
                       infotext.WEIGHT_KEY: config.lora_weight})
    if job.dpo_model:
        fields["HG-DPO model"] = Path(job.dpo_model).stem
    if config.lan_strength > 0.0:
        fields[infotext.LAN_KEY] = config.lan_strength
    if job.best_of > 1:
        fields.update({infotext.BEST_OF_KEY: job.best_of, infotext.SCORE_KEY: infotext.format_score(score)})
    return infotext.format_parameters(prompt, config.negative_prompt, fields)


def _short_hash(path: str | None, length: int) -> str | None:
    """The WebUI's short file hash (sha256 prefix) of a single file; None for folders and hub ids."""
    from hgdpo.models.loading import file_sha256

    return file_sha256(path)[:length] if path and Path(path).is_file() else None


def _load_generator(job: GenerateJob) -> ImageGenerator:
    from accelerate import PartialState

    device = torch.device(job.device) if job.device else PartialState().device
    family = peek_family(job.model)
    if job.lora and family is not None:
        read_lora(job.lora, family)  # a LoRA of the other family is refused before any weights load
    sft = job.model_options.load(job.model, job.model_config_dir, job.config.size)
    dpo = job.model_options.load(job.dpo_model, job.model_config_dir, job.config.size) if job.dpo_model else None
    return ImageGenerator(sft, lora=job.lora, dpo_components=dpo, device=device,
                          dtype=resolve_dtype(job.dtype, device))


def _load_scorer(job: GenerateJob, device: torch.device) -> Scorer | None:
    if job.best_of == 1:
        return None
    return load_named_scorer(job.scorer, job.scorer_model, job.scorer_processor, device)


def run_generate_job(job: GenerateJob, show_progress: bool = True) -> list[Path]:
    """Generate every image of the job; returns the paths written."""
    from tqdm.auto import tqdm

    job.validate()
    generator = _load_generator(job)
    job = replace(job, config=job.config.for_family(generator.family))  # the family's size when none was given
    if generator.lora is not None:
        from hgdpo.models.lora_runtime import describe

        logger.info("LoRA %s at weight %s", describe(generator.lora), job.config.lora_weight)
    scorer = _load_scorer(job, generator.device)  # before sampling: missing weights fail fast
    model_hash, lora_hash = _short_hash(job.model, 10), _short_hash(job.lora, 12)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(image: Image, name: str, prompt: str, seed: int, score: float | None = None) -> None:
        parameters = _parameters(job, prompt, seed, model_hash, lora_hash, score)
        written.append(infotext.save_png(image, job.output_dir / name, parameters))

    items = list(job.items())
    if scorer is None:
        for start in tqdm(range(0, len(items), job.batch_size), desc="batches", disable=not show_progress):
            batch = items[start:start + job.batch_size]
            output = generator.generate([prompt for _, prompt, _ in batch], [seed for _, _, seed in batch],
                                        job.config, return_sft=job.save_sft, shared_forward=job.shared_forward,
                                        show_progress=show_progress)
            for k, (index, prompt, seed) in enumerate(batch):
                save(output.images[k], f"{index:05d}-{seed}.png", prompt, seed)
                if job.save_sft:
                    sft_job = replace(job, lora=None, config=replace(job.config, lan_strength=0.0))
                    sft_path = job.output_dir / f"{index:05d}-{seed}-sft.png"
                    parameters = _parameters(sft_job, prompt, seed, model_hash, None, None)
                    written.append(infotext.save_png(output.sft_images[k], sft_path, parameters))
        return written
    for index, prompt, seed in tqdm(items, desc="images", disable=not show_progress):
        ranked = best_of_n(generator, prompt, seed, job.best_of, scorer, job.config, job.batch_size, show_progress)
        best = ranked[0]
        save(best.image, f"{index:05d}-{seed + best.index}.png", prompt, seed + best.index, best.score)
        if job.save_candidates:
            for rank, candidate in enumerate(ranked, start=1):
                save(candidate.image, f"candidates/{index:05d}-rank{rank:02d}-{seed + candidate.index}.png", prompt,
                     seed + candidate.index, candidate.score)
    return written
