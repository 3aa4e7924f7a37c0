"""Evaluate an HG-DPO model against a baseline as the paper does (Tables 1-3, 5, 6; Fig. 5b).

For every prompt of a test set (the paper: the 177 ``People`` prompts of PartiPrompts) and every seed,
the baseline and the candidate each generate one image from the same prompt and seed. Then:

* **win rates** (Tables 1, 3, 5, 6): every metric scores both images of each (prompt, seed) pair; the
  candidate's win rate is the share of pairs where its image scores higher, ties counting half, with a
  95% interval (:mod:`hgdpo.evaluation.winrate`): a percentile bootstrap over prompts for one seed; with
  several seeds, prompts and seeds are crossed random factors, since pairs sharing either are correlated;
* **colour shift** (Table 2): each model's mean hue, saturation and value and their change against the
  baseline in percent (:mod:`hgdpo.evaluation.colorshift`);
* **latent statistics** (Fig. 5b's statistic): the channel-wise mean / std of each image's final
  latent, and the L2 distance of these statistics between the two images of a pair
  (:func:`hgdpo.evaluation.statistics.stat_distance`).

Images are cached on disk, one PNG per (model configuration, prompt, seed) under
``<image cache>/<model digest>/``; the digest covers the checkpoint, the LoRA file's hash, its weight,
LAN, the sampler settings and the precision. Re-running with other metrics generates nothing; an
interrupted run resumes with the missing images (each PNG is written atomically, see
:mod:`hgdpo.fileio`), and the model is loaded only when an image is missing. Each PNG carries the
WebUI-style ``parameters`` text and the latent statistics of its final latent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hgdpo.inference.sampling import NOISE_RULE, SamplingConfig
from hgdpo.models.loading import CONFIG_DIR_HELP, DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP
from hgdpo.options import SEED_LIMITS, check_fields, check_value, field_of, option, same_as

if TYPE_CHECKING:
    from PIL.Image import Image

    from hgdpo.inference.sampling import ImageGenerator
    from hgdpo.feedback.scorers import Scorer

logger = logging.getLogger(__name__)

LATENT_STATS_KEY = "hgdpo-latent-stats"
MODEL_FILE = "model.json"
METRIC_LABELS = {"pickscore": "PickScore", "hpsv2": "HPS v2", "hps": "HPS v2", "imagereward": "ImageReward",
                 "aesthetic": "Aesthetic", "laion-aesthetic": "Aesthetic", "clip": "CLIP", "clipscore": "CLIP",
                 "clip-score": "CLIP"}
PAPER_METRICS = ("pickscore", "hpsv2", "imagereward", "aesthetic", "clip")  # the column order of Table 1
SCORE_CHUNK = 32


# --------------------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class ModelSpec:
    """One side of the comparison: a checkpoint, optionally with an HG-DPO LoRA at a weight and LAN (Eq. 7)."""

    model: str
    lora: str | None = None
    lora_weight: float = 0.5
    lan_strength: float = 0.0
    label: str = "model"

    def validate(self) -> None:
        if self.lora is not None and not Path(self.lora).expanduser().is_file():
            raise FileNotFoundError(f"{self.label}: LoRA file {self.lora} not found.")
        if not 0.0 <= self.lan_strength <= 1.0:
            raise ValueError(f"{self.label}: LAN strength must lie in [0, 1], got {self.lan_strength}.")
        if self.lan_strength > 0.0 and self.lora is None:
            raise ValueError(f"{self.label}: LAN samples the model with and without its LoRA in lockstep, so it "
                             "needs a LoRA.")

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        """``base`` with this model's LoRA weight (0 without a LoRA) and LAN strength."""
        return replace(base, lora_weight=self.lora_weight if self.lora else 0.0, lan_strength=self.lan_strength)

    def describe(self) -> str:
        text = Path(self.model).name or self.model
        if self.lora:
            text += f" + {Path(self.lora).name} @ {self.lora_weight:g}"
        if self.lan_strength:
            text += f", LAN {self.lan_strength:g}"
        return text


@dataclass(frozen=True)
class MetricSpec:
    """A metric by :func:`hgdpo.feedback.scorers.load_scorer` name (or plug-in), with its weights."""

    name: str
    model: str | None = None
    processor: str | None = None

    @property
    def label(self) -> str:
        return METRIC_LABELS.get(self.name.lower(), self.name)

    def load(self, device: torch.device) -> Scorer:
        from hgdpo.feedback.scorers import load_named_scorer

        return load_named_scorer(self.name, self.model, self.processor, device)


@dataclass
class EvaluationConfig:
    """Everything :func:`run_evaluation` needs; ``trainer/evaluate.py --help`` documents each field."""

    baseline: ModelSpec
    candidate: ModelSpec
    prompts: list[str]
    output_dir: Path
    metrics: list[MetricSpec] = field(default_factory=lambda: [MetricSpec(name) for name in PAPER_METRICS])
    seeds: list[int] = option([0], "Seeds; each prompt is generated once per seed.", **SEED_LIMITS)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    image_cache: Path | None = option(None, "Folder of the generated images, shared by runs (default: "
                                            "OUTPUT_DIR/images).")
    batch_size: int = option(4, "Images per UNet batch.", at_least=1)
    grid_pairs: int = option(16, "Pairs shown side by side in the image grid.", at_least=0)
    tie_tolerance: float = option(0.0, "Score differences up to this count as ties.", at_least=0)
    resamples: int = option(10_000, "Bootstrap resamples of the 95%% intervals (with one seed).", at_least=1, at_most=10_000_000,
                            flag="--bootstrap")
    model_config_dir: str | None = option(None, CONFIG_DIR_HELP)
    device: str | None = option(None, DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, DTYPE_CHOICES)
    prompt_source: str = ""

    def validate(self) -> None:
        self.sampling.validate()
        self.baseline.validate()
        self.candidate.validate()
        if not self.prompts:
            raise ValueError("No prompts to evaluate.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Seeds must be a non-empty list without repeats, got {self.seeds}.")
        if not self.metrics:
            raise ValueError("No metric given.")
        if len({metric.name.lower() for metric in self.metrics}) != len(self.metrics):
            raise ValueError(f"A metric is named twice: {[metric.name for metric in self.metrics]}.")
        if self.baseline.label == self.candidate.label:
            raise ValueError(f"The two models need different labels, both are {self.baseline.label!r}.")
        check_fields(self)
        weight = field_of(SamplingConfig, "lora_weight").metadata["limits"]
        for name, side in (("baseline", self.baseline), ("candidate", self.candidate)):
            check_value(f"--{name}-lora-weight", side.lora_weight, "float", weight)
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output-dir {self.output_dir} is a file; give a folder (it is created if missing).")

    @property
    def pairs(self) -> list[tuple[str, int]]:
        """Every (prompt, seed) compared, prompt-major."""
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    @property
    def cache_root(self) -> Path:
        return Path(self.image_cache) if self.image_cache is not None else Path(self.output_dir) / "images"


# --------------------------------------------------------------------------- the command line's options

PARTI_URL = "https://github.com/google-research/parti/blob/main/PartiPrompts.tsv"


def _lora_weight_option(side: str):
    """``--<side>-lora-weight``: the sampling LoRA weight's default and range."""
    return same_as(SamplingConfig, "lora_weight", flag=None, metavar="W",
                   help=f"Weight of the {side}'s LoRA (paper: 0.5).")


def _lan_option(side: str):
    """``--<side>-lan [STRENGTH]``: the sampling LAN strength's default and range."""
    return same_as(SamplingConfig, "lan_strength", flag=None,
                   help=f"LAN for the {side} (needs its LoRA): bare flag = strength 1 (paper Eq. 7), 0 = off.")


@dataclass
class EvaluationOptions:
    """The ``trainer/evaluate.py`` flags (and ``--config`` TOML keys); :meth:`to_config` reads the prompts."""

    baseline: str = option(help="Baseline (SFT) model: single-file .safetensors/.ckpt, diffusers folder or hub id.",
                           metavar="MODEL")
    prompts: str = option(help="Prompt file: .tsv/.csv (a header row), .txt (one per line) or .jsonl. The paper's "
                               f"test set is the People category of PartiPrompts.tsv ({PARTI_URL}).")
    output_dir: str = option(help="Report folder (created).")
    baseline_lora: str | None = option(None, "HG-DPO LoRA (kohya .safetensors) of the baseline.", metavar="PATH")
    baseline_lora_weight: float = _lora_weight_option("baseline")
    baseline_lan: float = _lan_option("baseline")
    baseline_label: str = option("baseline", "Name of the baseline in the report.")
    candidate: str | None = option(None, "Candidate model (default: the baseline's; give --candidate-lora).",
                                   metavar="MODEL")
    candidate_lora: str | None = option(None, "HG-DPO LoRA (kohya .safetensors) of the candidate.", metavar="PATH")
    candidate_lora_weight: float = _lora_weight_option("candidate")
    candidate_lan: float = _lan_option("candidate")
    candidate_label: str = option("candidate", "Name of the candidate in the report.")
    category: str | None = option(None, "Keep only rows of this Category of a .tsv/.csv (default: People when the "
                                        "table has a Category column, as PartiPrompts; '' keeps every row).")
    prompt_column: str | None = option(None, "Prompt column of a .tsv/.csv (default: Prompt, else the first).")
    max_prompts: int | None = option(None, "Evaluate only the first N prompts.", at_least=0)
    seeds: list[int] = same_as(EvaluationConfig, "seeds")
    image_cache: str | None = same_as(EvaluationConfig, "image_cache")
    metrics: list[str] = option(list(PAPER_METRICS), "Metrics: pickscore, hpsv2, imagereward, aesthetic, clip, or "
                                                     "plug-ins 'package.module:callable'.")
    metric_model: list[str] = option(
        [], "Weights of a metric: file, folder or hub id (pickscore: PickScore_v1 folder; hpsv2: HPS_v2_compressed.pt; "
            "imagereward: ImageReward.pt or its folder; aesthetic: sac+logos+ava1-l14-linearMSE.pth; clip: a "
            "CLIPModel folder). Repeatable.", metavar="NAME=SOURCE", repeat=True)
    metric_processor: list[str] = option(
        [], "Second source of a metric (pickscore: CLIP-ViT-H-14 processor; imagereward: bert-base-uncased tokenizer; "
            "aesthetic: the CLIP ViT-L/14 model folder). Repeatable.", metavar="NAME=SOURCE", repeat=True)
    steps: int = same_as(SamplingConfig, "steps")
    guidance_scale: float = same_as(SamplingConfig, "guidance_scale")
    sampler: str = same_as(SamplingConfig, "sampler")
    schedule: str = same_as(SamplingConfig, "schedule")
    resolution: str = option("auto", "Image size: N for NxN or WxH, multiples of 8 (auto: the model family's, "
                                     "SD1.5 512, SDXL 1024).")
    negative_prompt: str = same_as(SamplingConfig, "negative_prompt")
    batch_size: int = same_as(EvaluationConfig, "batch_size")
    grid_pairs: int = same_as(EvaluationConfig, "grid_pairs")
    tie_tolerance: float = same_as(EvaluationConfig, "tie_tolerance")
    resamples: int = same_as(EvaluationConfig, "resamples")
    model_config_dir: str | None = same_as(EvaluationConfig, "model_config_dir",
                                           help="Diffusers-layout config folder for single-file models (default: "
                                                "the bundled configs of their family).")
    device: str | None = same_as(EvaluationConfig, "device")
    dtype: str = same_as(EvaluationConfig, "dtype")

    def side(self, name: str) -> ModelSpec:
        """The ``baseline`` or ``candidate`` model as these options describe it."""
        return ModelSpec(model=getattr(self, name) or self.baseline, lora=getattr(self, f"{name}_lora"),
                         lora_weight=getattr(self, f"{name}_lora_weight"), lan_strength=getattr(self, f"{name}_lan"),
                         label=getattr(self, f"{name}_label"))

    def to_config(self) -> EvaluationConfig:
        """The :class:`EvaluationConfig` the options describe (the prompt file read, metric sources matched)."""
        from hgdpo.models.loading import family_size, peek_family
        from hgdpo.options import parse_resolution
        from hgdpo.prompts import read_prompts

        check_fields(self)
        size, family = parse_resolution(self.resolution), peek_family(self.baseline)
        width, height = family_size(size, family) if family is not None else size or (None, None)
        category = default_category(self.prompts, self.category)
        prompts = read_prompts(self.prompts, column=self.prompt_column, category=category).prompts
        if self.max_prompts is not None:
            prompts = prompts[:self.max_prompts]
        models = parse_sources(self.metric_model, "--metric-model")
        processors = parse_sources(self.metric_processor, "--metric-processor")
        unused = sorted((set(models) | set(processors)) - {name.lower() for name in self.metrics})
        if unused:
            raise ValueError(f"--metric-model/--metric-processor name metrics not in --metrics: {', '.join(unused)}.")
        return EvaluationConfig(
            baseline=self.side("baseline"), candidate=self.side("candidate"), prompts=prompts,
            output_dir=Path(self.output_dir),
            metrics=[MetricSpec(name, models.get(name.lower()), processors.get(name.lower())) for name in self.metrics],
            seeds=list(self.seeds),
            sampling=SamplingConfig(steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                                    schedule=self.schedule, width=width, height=height,
                                    negative_prompt=self.negative_prompt),
            image_cache=Path(self.image_cache) if self.image_cache else None, batch_size=self.batch_size,
            grid_pairs=self.grid_pairs, tie_tolerance=self.tie_tolerance, resamples=self.resamples,
            model_config_dir=self.model_config_dir, device=self.device, dtype=self.dtype,
            prompt_source=f"{self.prompts}" + (f" (category {category})" if category else ""),
        )


def parse_sources(items: Sequence[str], flag: str) -> dict[str, str]:
    """``NAME=SOURCE`` items as a dict (metric names lower-cased)."""
    result = {}
    for item in items:
        name, separator, source = item.partition("=")
        if not separator or not name or not source:
            raise ValueError(f"{flag} {item!r}: write NAME=SOURCE, e.g. {flag} hpsv2=models/HPS_v2_compressed.pt.")
        result[name.strip().lower()] = source
    return result


def default_category(path: str, category: str | None) -> str | None:
    """The category filter: the one given ('' = none), else People for a table with a Category column."""
    from hgdpo.prompts import CATEGORY_COLUMN

    if category is not None:
        return category or None
    suffix = Path(path).suffix.lower()
    if suffix not in (".tsv", ".csv") or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8-sig") as handle:
        header = handle.readline().rstrip("\r\n").split("\t" if suffix == ".tsv" else ",")
    return "People" if CATEGORY_COLUMN in header else None


# --------------------------------------------------------------------------- the image cache


def model_digest(spec: ModelSpec, sampling: SamplingConfig, dtype: torch.dtype, model_config_dir: str | None) -> str:
    """16 hex digits identifying the images a model configuration makes (everything but the prompt and seed)."""
    from hgdpo.models.loading import file_sha256, model_fingerprint

    identity = {
        "model": model_fingerprint(spec.model),
        "lora": file_sha256(spec.lora) if spec.lora else None,
        "sampling": asdict(spec.sampling(sampling)),
        "dtype": str(dtype),
        "model_config_dir": model_config_dir,
        "noise": NOISE_RULE,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CachedImage:
    """A generated image and the channel-wise mean / std of the latent it was decoded from."""

    image: Image
    latent_mean: np.ndarray
    latent_std: np.ndarray


class ImageCache:
    """The generated images of one model configuration: ``<root>/<digest>/<prompt hash>-<seed>.png``."""

    def __init__(self, root: str | Path, digest: str):
        self.folder = Path(root) / digest
        self.digest = digest

    def path(self, prompt: str, seed: int) -> Path:
        return self.folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:16]}-{int(seed)}.png"

    def has(self, prompt: str, seed: int) -> bool:
        return self.path(prompt, seed).is_file()

    def describe(self, description: dict[str, Any]) -> None:
        """Write ``model.json`` (what made these images) once, for people browsing the cache."""
        from hgdpo.fileio import atomic_write_text

        if not (self.folder / MODEL_FILE).is_file():
            atomic_write_text(self.folder / MODEL_FILE, json.dumps(description, indent=2) + "\n")

    def save(self, prompt: str, seed: int, image: Image, latent_mean: np.ndarray, latent_std: np.ndarray,
             parameters: str) -> Path:
        """Write the PNG atomically with the WebUI ``parameters`` text and the latent statistics."""
        from PIL.PngImagePlugin import PngInfo

        from hgdpo.fileio import atomic_path
        from hgdpo.inference.infotext import PARAMETERS_KEY

        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
        info.add_text(LATENT_STATS_KEY, json.dumps({"mean": [float(v) for v in latent_mean],
                                                    "std": [float(v) for v in latent_std]}))
        path = self.path(prompt, seed)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        return path

    def load(self, prompt: str, seed: int) -> CachedImage:
        from PIL import Image

        path = self.path(prompt, seed)
        with Image.open(path) as image:
            image.load()
            stats = json.loads(image.info.get(LATENT_STATS_KEY, '{"mean": [], "std": []}'))
            return CachedImage(image.convert("RGB"), np.asarray(stats["mean"]), np.asarray(stats["std"]))


# --------------------------------------------------------------------------- generation


def load_generator(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                   model_config_dir: str | None = None) -> ImageGenerator:
    """An :class:`~hgdpo.inference.sampling.ImageGenerator` for ``spec`` (the model plus its LoRA, if any)."""
    from hgdpo.inference.sampling import ImageGenerator
    from hgdpo.models.loading import load_model

    return ImageGenerator(load_model(spec.model, config_dir=model_config_dir), lora=spec.lora, device=device,
                          dtype=dtype)


def _parameters(spec: ModelSpec, sampling: SamplingConfig, prompt: str, seed: int) -> str:
    from hgdpo.inference import infotext

    fields: dict[str, object] = {"Steps": sampling.steps, "Sampler": sampling.sampler_label,
                                 "Schedule type": "Karras" if sampling.schedule == "karras" else None,
                                 "CFG scale": sampling.guidance_scale, "Seed": seed,
                                 "Size": f"{sampling.width}x{sampling.height}", "Model": Path(spec.model).stem}
    if spec.lora:
        fields.update({infotext.LORA_KEY: Path(spec.lora).stem, infotext.WEIGHT_KEY: sampling.lora_weight})
    if sampling.lan_strength:
        fields[infotext.LAN_KEY] = sampling.lan_strength
    return infotext.format_parameters(prompt, sampling.negative_prompt, fields)


def generate_missing(spec: ModelSpec, cache: ImageCache, pairs: Sequence[tuple[str, int]], sampling: SamplingConfig,
                     make_generator: Callable[[ModelSpec], ImageGenerator], batch_size: int = 4,
                     show_progress: bool = False) -> int:
    """Generate and cache the images of ``pairs`` that ``cache`` lacks; return how many were generated.

    The model is built (``make_generator(spec)``) only when an image is missing.
    """
    from tqdm.auto import tqdm

    from hgdpo.evaluation.statistics import channel_stats

    missing = [(prompt, seed) for prompt, seed in pairs if not cache.has(prompt, seed)]
    if not missing:
        return 0
    generator = make_generator(spec)
    config = spec.sampling(sampling).for_family(generator.family)
    with tqdm(total=len(missing), desc=f"generating ({spec.label})", disable=not show_progress) as progress:
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            output = generator.generate([prompt for prompt, _ in batch], [seed for _, seed in batch], config)
            means, stds = channel_stats(output.latents)
            for k, (prompt, seed) in enumerate(batch):
                cache.save(prompt, seed, output.images[k], means[k], stds[k], _parameters(spec, config, prompt, seed))
            progress.update(len(batch))
    return len(missing)


# --------------------------------------------------------------------------- measuring


def _chunks(pairs: Sequence[tuple[str, int]], size: int) -> Iterator[Sequence[tuple[str, int]]]:
    for start in range(0, len(pairs), size):
        yield pairs[start:start + size]


def score_cached(scorer: Scorer, cache: ImageCache, pairs: Sequence[tuple[str, int]]) -> np.ndarray:
    """The scorer's score of each cached image, read from disk ``SCORE_CHUNK`` images at a time."""
    scores = [np.zeros(0)]
    for chunk in _chunks(pairs, SCORE_CHUNK):
        images = [cache.load(prompt, seed).image for prompt, seed in chunk]
        scores.append(scorer.score([prompt for prompt, _ in chunk], images).double().numpy())
    return np.concatenate(scores)


def metric_result(metric: MetricSpec, baseline: np.ndarray, candidate: np.ndarray, tie_tolerance: float,
                  resamples: int, seeds: int = 1) -> dict[str, Any]:
    """Means, the candidate's win rate with its 95% interval (Tables 1, 3, 5, 6), and the score differences.

    The scores are prompt-major over ``seeds`` seeds per prompt; with several, the interval resamples
    prompts and seeds (:func:`~hgdpo.evaluation.winrate.crossed_win_rate`).
    """
    from hgdpo.evaluation.statistics import score_gap_stats
    from hgdpo.evaluation.winrate import crossed_win_rate, outcomes_from_scores

    outcomes = outcomes_from_scores(candidate, baseline, tie_tolerance).reshape(-1, seeds)
    return {
        "label": metric.label,
        "model": metric.model,
        "processor": metric.processor,
        "baseline_mean": float(baseline.mean()),
        "candidate_mean": float(candidate.mean()),
        "win_rate": crossed_win_rate(outcomes, resamples=resamples).as_dict(),
        "difference": score_gap_stats(candidate - baseline),
    }


def measure_images(cache: ImageCache, pairs: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: mean (hue degrees, saturation, value) ``[N, 3]`` and latent channel mean / std ``[N, C]``."""
    from hgdpo.evaluation.colorshift import mean_hsv

    hsv, means, stds = [], [], []
    for prompt, seed in pairs:
        cached = cache.load(prompt, seed)
        hsv.append(mean_hsv(cached.image))
        means.append(cached.latent_mean)
        stds.append(cached.latent_std)
    return np.array(hsv), np.array(means), np.array(stds)


def latent_section(stats: dict[str, tuple[np.ndarray, np.ndarray]], baseline: str, candidate: str) -> dict[str, Any]:
    """Channel-wise latent mean / std per model, and their L2 distance between the two images of each pair."""
    from hgdpo.evaluation.statistics import score_gap_stats, stat_distance

    (mean_b, std_b), (mean_c, std_c) = stats[baseline], stats[candidate]
    mean_distance, std_distance = stat_distance(mean_b, std_b, mean_c, std_c)
    return {
        "latent_channels": int(mean_b.shape[1]),
        "models": {label: {"channel_mean": mean.mean(axis=0).tolist(), "channel_std": std.mean(axis=0).tolist()}
                   for label, (mean, std) in stats.items()},
        "pair_distance": {"mean_distance": score_gap_stats(mean_distance),
                          "std_distance": score_gap_stats(std_distance)},
    }


# --------------------------------------------------------------------------- the run


def _resolve_device(config: EvaluationConfig) -> tuple[torch.device, torch.dtype]:
    from accelerate import PartialState

    from hgdpo.models.loading import resolve_dtype

    device = torch.device(config.device) if config.device else PartialState().device
    return device, resolve_dtype(config.dtype, device)


def _check_metric_sources(metrics: Sequence[MetricSpec]) -> None:
    """Fail before generating when a metric's weights were given as a local path that does not exist."""
    from hgdpo.feedback.base import is_local

    for metric in metrics:
        for what, source in (("model", metric.model), ("processor", metric.processor)):
            if source and is_local(source) and not Path(source).expanduser().exists():
                raise FileNotFoundError(f"Metric {metric.name}: {what} {source} not found.")


def run_evaluation(config: EvaluationConfig, *,
                   make_generator: Callable[[ModelSpec], ImageGenerator] | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Generate (or reuse) both models' images, score them, and write the report; return ``report.json``'s content.

    Args:
        config: the evaluation settings.
        make_generator: builds a model's generator (default: :func:`load_generator` on the configured device).
        show_progress: tqdm bars for generation and scoring.
    """
    from tqdm.auto import tqdm

    from hgdpo.evaluation.colorshift import colour_shift
    from hgdpo.evaluation.report import write_evaluation_report

    config.validate()
    _check_metric_sources(config.metrics)
    device, dtype = _resolve_device(config)
    if make_generator is None:
        def make_generator(spec: ModelSpec) -> ImageGenerator:
            return load_generator(spec, device, dtype, config.model_config_dir)

    pairs = config.pairs
    specs = (config.baseline, config.candidate)
    caches: dict[str, ImageCache] = {}
    generated: dict[str, int] = {}
    for spec in specs:
        cache = ImageCache(config.cache_root, model_digest(spec, config.sampling, dtype, config.model_config_dir))
        cache.folder.mkdir(parents=True, exist_ok=True)
        cache.describe({"label": spec.label, **asdict(spec), "sampling": asdict(spec.sampling(config.sampling)),
                        "dtype": str(dtype), "model_config_dir": config.model_config_dir})
        generated[spec.label] = generate_missing(spec, cache, pairs, config.sampling, make_generator,
                                                 config.batch_size, show_progress)
        caches[spec.label] = cache
        logger.info("%s: %d images generated, %d from the cache %s", spec.label, generated[spec.label],
                    len(pairs) - generated[spec.label], cache.folder)

    scores: dict[str, dict[str, np.ndarray]] = {}
    metrics: dict[str, Any] = {}
    for metric in tqdm(config.metrics, desc="metrics", disable=not show_progress):
        scorer = metric.load(device)
        scores[metric.name] = {spec.label: score_cached(scorer, caches[spec.label], pairs) for spec in specs}
        del scorer
        metrics[metric.name] = metric_result(metric, scores[metric.name][config.baseline.label],
                                             scores[metric.name][config.candidate.label], config.tie_tolerance,
                                             config.resamples, seeds=len(config.seeds))

    measured = {spec.label: measure_images(caches[spec.label], pairs) for spec in specs}
    hsv = {label: values[0] for label, values in measured.items()}
    results: dict[str, Any] = {
        "settings": {
            "prompts": config.prompt_source, "num_prompts": len(config.prompts), "seeds": list(config.seeds),
            "num_pairs": len(pairs), "sampling": asdict(config.sampling), "dtype": str(dtype).removeprefix("torch."),
            "tie_tolerance": config.tie_tolerance, "bootstrap_resamples": config.resamples, "confidence": 0.95,
        },
        "models": {
            spec.label: {**asdict(spec), "description": spec.describe(), "digest": caches[spec.label].digest,
                         "images": str(caches[spec.label].folder), "generated_now": generated[spec.label]}
            for spec in specs
        },
        "baseline": config.baseline.label,
        "candidate": config.candidate.label,
        "metrics": metrics,
        "colour_shift": colour_shift(hsv, config.baseline.label),
        "latent_statistics": latent_section({label: values[1:] for label, values in measured.items()},
                                            config.baseline.label, config.candidate.label),
        "pairs": [
            {"prompt": prompt, "seed": seed,
             **{f"{spec.label}_image": str(caches[spec.label].path(prompt, seed)) for spec in specs},
             "scores": {name: {label: float(values[label][i]) for label in values} for name, values in scores.items()},
             "hsv": {label: [float(v) for v in hsv[label][i]] for label in hsv}}
            for i, (prompt, seed) in enumerate(pairs)
        ],
    }
    write_evaluation_report(results, config.output_dir, caches, config.grid_pairs)
    return results
