"""Build an AI-feedback preference dataset from the user's own model (HG-DPO, Eq. 4-6).

For each prompt ``i`` the model samples a pool of ``N`` images (paper: N=20, DPM-Solver++ with 50
steps, CFG 5.0); image ``j`` starts from the noise of seed :func:`derive_seed` ``(seed, i, j)``, drawn
with its own generator, so any single image can be regenerated exactly from its recorded seed. A
scorer (any object with ``name`` and ``score(prompts, images) -> Tensor[N]``, higher is better)
scores every image as soon as its batch is decoded; only one batch, the best image so far and the
lowest few are held in memory (unless ``keep_pool``). The best image becomes the winner, the
``loser_rank``-th worst the loser (:func:`select_pair`, Eq. 6).

Output directory::

    out/
        build_config.json        settings of the run (a resumed run must match them)
        records/000042.json      one per finished prompt: the commit point
        images/0000/000042_win.png, 000042_lose.png        (or pool/0000/000042_007.png with keep_pool)
        index.parquet            the triplet dataset (:mod:`hgdpo.data.format`), written at the end

Each prompt is committed on its own: its images are written atomically, then its record. A killed
run re-run with the same command skips every prompt with a record and regenerates the others (an
uncommitted prompt's images are simply overwritten). Several processes (``accelerate launch``) split
the prompts by ``index % world_size``; the main process merges the records into the index.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

from hgdpo.feedback.scorers import SCORER_HELP, SCORER_MODEL_HELP, SCORER_PROCESSOR_HELP, load_named_scorer
from hgdpo.fileio import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from hgdpo.inference.sampling import ImageGenerator, SamplingConfig
from hgdpo.models.loading import (
    CONFIG_DIR_HELP,
    DEVICE_HELP,
    DTYPE_CHOICES,
    DTYPE_HELP,
    ModelOptions,
    family_size,
    peek_family,
    resolve_dtype,
)
from hgdpo.options import SEED_LIMITS, check_fields, check_value, nested, option, parse_resolution

__all__ = [
    "BuildConfig",
    "BuildResult",
    "PoolGenerator",
    "Scorer",
    "Selection",
    "build_dataset",
    "derive_seed",
    "select_pair",
]

logger = logging.getLogger("hgdpo.build")

CONFIG_FILENAME = "build_config.json"
RECORDS_DIRNAME = "records"
SAMPLER = "DPMSolverMultistepScheduler(dpmsolver++)"  # the "dpmpp_2m" of hgdpo.inference.sampling
RECORD_VERSION = 1
# settings a resumed run must share with the records already written
_SETTING_KEYS = ("model", "prompts_sha256", "num_prompts", "pool_size", "steps", "guidance_scale", "resolution",
                 "seed", "scorer", "scorer_model", "loser_rank", "min_score_gap", "keep_pool", "sampler",
                 "negative_prompt", "image_format")


class Scorer(Protocol):
    """What the builder needs of a scorer (see ``hgdpo.feedback.scorers``)."""

    name: str

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor: ...


@dataclass
class BuildConfig:
    """Settings of a dataset build (``trainer/build_dataset.py`` flags); the defaults are the paper's where it
    gives one."""

    model: str = option(help="SD1.5- or SDXL-family model (SDXL, Pony, Illustrious, NoobAI ...): single-file "
                             "checkpoint (.safetensors/.ckpt), diffusers folder or hub id.")
    prompts: str = option(help="Prompt file: .txt (one per line), .tsv/.csv (with a header) or .jsonl.")
    output_dir: str = option(help="Dataset folder (created; re-run the same command to resume).")
    pool_size: int = option(20, "Images generated per prompt, N (paper: 20).", at_least=2, at_most=10_000)
    scorer: str = option("pickscore", SCORER_HELP)
    scorer_model: str | None = option(None, SCORER_MODEL_HELP)
    scorer_processor: str | None = option(None, SCORER_PROCESSOR_HELP)
    resolution: str = option("auto", "Image size: N for NxN or WxH, multiples of 8 (auto: the model family's, "
                                     "SD1.5 512, SDXL 1024; SDXL models also draw well at their buckets, e.g. "
                                     "832x1216).")
    steps: int = option(50, "DPM-Solver++ sampling steps (paper: 50).", at_least=1, at_most=1000)
    guidance_scale: float = option(5.0, "Classifier-free guidance scale (paper: 5.0).", at_least=0, flag="--cfg")
    negative_prompt: str = option("", "Negative prompt for guidance (empty: the unconditional prompt).")
    batch_size: int = option(4, "Images per UNet batch; the images of one prompt share one text encoding.",
                             at_least=1)
    seed: int = option(0, "Base seed; image j of prompt i uses a seed derived from (seed, i, j), recorded per image.",
                       **SEED_LIMITS)
    loser_rank: int = option(1, "Loser = the k-th worst image of the pool (1 = the worst, as in the paper; see its "
                                "Table 5).", at_least=1)
    min_score_gap: float = option(0.0, "Skip (and record as skipped) prompts whose best-minus-worst score gap is "
                                       "below this.", at_least=0)
    keep_pool: bool = option(False, "Keep all N images of every pool, not only winner and loser.")
    prompt_column: str | None = option(None, "Prompt column of a .tsv/.csv (default: 'Prompt' if present, else the "
                                             "first) or key of a .jsonl (default: 'prompt').")
    category: str | None = option(None, "Keep only rows of this Category of a .tsv/.csv (e.g. 'People' in "
                                        "PartiPrompts.tsv).")
    export_pickapic: str | None = option(None, "Also write the dataset as a Pick-a-Pic v2 style .parquet file at "
                                               "PATH.", metavar="PATH")
    model_config_dir: str | None = option(None, CONFIG_DIR_HELP)
    model_options: ModelOptions = nested(ModelOptions)
    device: str | None = option(None, DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, DTYPE_CHOICES)
    image_format: str = option("png", "Format of the image files.", ("png", "jpeg"))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return parse_resolution(self.resolution)

    def validate(self) -> None:
        """Check every setting before anything is loaded; raise a one-line ValueError naming the option."""
        check_fields(self)
        check_value("--loser-rank", self.loser_rank, "int", {"at_least": 1, "at_most": max(1, self.pool_size - 1)})
        self.size  # noqa: B018  (raises on a bad resolution)
        if not Path(self.prompts).expanduser().is_file():
            raise ValueError(f"--prompts {self.prompts} not found; give a .txt, .tsv/.csv or .jsonl prompt file.")
        if self.model_config_dir and not Path(self.model_config_dir).expanduser().is_dir():
            raise ValueError(f"--model-config-dir {self.model_config_dir} is not a folder; give a diffusers-layout "
                             "config folder or leave it out.")
        if self.export_pickapic and Path(self.export_pickapic).expanduser().is_dir():
            raise ValueError(f"--export-pickapic {self.export_pickapic} is a folder; give a .parquet file path.")
        check_output_dir(Path(self.output_dir).expanduser())
        self.model_options.check_source(self.model, self.size)

    def load_scorer(self, device: torch.device | str) -> Scorer:
        """The scorer the options name (its model and processor, or the scorer's defaults)."""
        return load_named_scorer(self.scorer, self.scorer_model, self.scorer_processor, device)


def check_output_dir(out: Path) -> None:
    """Refuse an output folder that is a file, or holds files but is no build of this tool (never overwrite it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file; give a new or empty folder.")
    if not out.is_dir() or (out / CONFIG_FILENAME).is_file():
        return
    entries = sorted(p.name for p in out.iterdir())
    records = out / RECORDS_DIRNAME
    if entries and not (entries == [RECORDS_DIRNAME] and records.is_dir() and not any(records.iterdir())):
        raise ValueError(f"--output-dir {out} already holds files ({', '.join(entries[:4])}) but no {CONFIG_FILENAME}, "
                         "so it is no dataset build to resume; refusing to overwrite it. Give a new or empty folder.")


# --------------------------------------------------------------------------- seeds and selection


def derive_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The sampling seed of image ``image_index`` of prompt ``prompt_index``: in [0, 2**63)."""
    digest = hashlib.sha256(f"hgdpo-seed-v1:{int(seed)}:{int(prompt_index)}:{int(image_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Selection:
    """The pair picked from one pool (indices into the pool)."""

    winner: int
    loser: int
    win_score: float
    lose_score: float
    skipped: str | None = None  # why the prompt yields no pair, else None

    @property
    def gap(self) -> float:
        return self.win_score - self.lose_score


def select_pair(scores: Sequence[float], loser_rank: int = 1, min_score_gap: float = 0.0) -> Selection:
    """Eq. 6: winner = the best image (first on ties); loser = the ``loser_rank``-th lowest of the others.

    Ties among the others are broken by pool index (lower first). When ``win - lose < min_score_gap``
    the selection is returned with ``skipped`` set.
    """
    values = [float(s) for s in scores]
    if len(values) < 2:
        raise ValueError(f"need at least 2 scores to pick a pair, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"scores must be finite, got {values}")
    if not 1 <= loser_rank < len(values):
        raise ValueError(f"loser_rank must be in [1, {len(values) - 1}] for a pool of {len(values)}, got {loser_rank}")
    winner = max(range(len(values)), key=lambda j: (values[j], -j))
    others = sorted((j for j in range(len(values)) if j != winner), key=lambda j: (values[j], j))
    loser = others[loser_rank - 1]
    selection = Selection(winner, loser, values[winner], values[loser])
    if selection.gap < min_score_gap:
        reason = f"score gap {selection.gap:.6g} < min_score_gap {min_score_gap:g}"
        selection = Selection(winner, loser, values[winner], values[loser], skipped=reason)
    return selection


class _Keeper:
    """Streaming holder: the best image so far and the ``keep_lowest`` lowest (by score, index)."""

    def __init__(self, keep_lowest: int) -> None:
        self.keep_lowest = keep_lowest
        self.best: tuple[float, int, Image.Image] | None = None
        self.lowest: list[tuple[float, int, Image.Image]] = []

    def add(self, score: float, j: int, image: Image.Image) -> None:
        if self.best is None or score > self.best[0]:
            self.best = (score, j, image)
        self.lowest.append((score, j, image))
        self.lowest.sort(key=lambda item: (item[0], item[1]))
        del self.lowest[self.keep_lowest :]

    def image(self, j: int) -> Image.Image:
        for _, index, image in ([self.best] if self.best else []) + self.lowest:
            if index == j:
                return image
        raise RuntimeError(f"image {j} of the pool was not kept (selection bug)")


# --------------------------------------------------------------------------- generation


class PoolGenerator:
    """Samples images of one prompt with per-image seeds through the toolkit's one generation path.

    That path is :class:`~hgdpo.inference.sampling.ImageGenerator` with the builder's sampler
    (DPM-Solver++ 2M, :data:`SAMPLER`), so ``trainer/sample.py``, the evaluation and the trainer's
    validation regenerate a recorded (prompt, seed) to the same image.
    """

    def __init__(self, components, config: BuildConfig, device: torch.device | str, dtype: torch.dtype) -> None:
        width, height = config.size
        self.generator = ImageGenerator(components, device=device, dtype=dtype)
        self.sampling = SamplingConfig(steps=config.steps, guidance_scale=config.guidance_scale, sampler="dpmpp_2m",
                                       width=width, height=height, negative_prompt=config.negative_prompt)

    def generate(self, prompt: str, seeds: Sequence[int]) -> list[Image.Image]:
        """One RGB image per seed; image ``k`` depends only on ``prompt``, ``seeds[k]`` and the settings."""
        return self.generator.generate([prompt] * len(seeds), seeds, self.sampling).images


# --------------------------------------------------------------------------- records


def _settings(config: BuildConfig, prompts: Sequence[str], scorer_name: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    for prompt in prompts:
        raw = prompt.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "little") + raw)
    width, height = config.size
    forced = {name: value for name, value in vars(config.model_options).items()
              if name != "any_resolution" and value != "auto"}  # absent when auto: older builds resume
    return {
        **forced,
        "model": config.model,
        "prompts_sha256": digest.hexdigest(),
        "num_prompts": len(prompts),
        "pool_size": config.pool_size,
        "steps": config.steps,
        "guidance_scale": float(config.guidance_scale),
        "resolution": f"{width}x{height}",
        "seed": config.seed,
        "scorer": scorer_name,
        "scorer_model": config.scorer_model,
        "loser_rank": config.loser_rank,
        "min_score_gap": float(config.min_score_gap),
        "keep_pool": config.keep_pool,
        "sampler": SAMPLER,
        "negative_prompt": config.negative_prompt,
        "image_format": config.image_format,
    }


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_or_write_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / CONFIG_FILENAME
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is unreadable ({error}); delete it only if {out}/records is empty, "
                             "or use a new output directory") from None
        differ = [f"{key}: {previous.get(key)!r} -> {settings.get(key)!r}"
                  for key in _SETTING_KEYS if previous.get(key) != settings.get(key)]
        if differ:
            raise ValueError(
                f"{out} holds a dataset build with different settings; refusing to mix them ("
                + "; ".join(differ)
                + "). Re-run with the original settings to resume, or use a new output directory."
            )
        return
    atomic_write_text(path, json.dumps({"settings": settings, "created_by": "hgdpo.builder"}, indent=2) + "\n")


def _record_path(out: Path, i: int) -> Path:
    return out / RECORDS_DIRNAME / f"{i:06d}.json"


def _read_record(path: Path, i: int, prompt: str, digest: str) -> dict[str, Any]:
    advice = f"delete it to regenerate prompt {i}"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in ("prompt_index", "prompt", "status", "scores", "seeds", "settings") if k not in record]
        if missing:
            raise ValueError(f"missing keys {missing}")
        if record["status"] == "ok":
            for key in ("win_image", "lose_image", "win_score", "lose_score", "win_seed", "lose_seed"):
                if key not in record:
                    raise ValueError(f"missing key {key!r}")
        elif record["status"] != "skipped":
            raise ValueError(f"unknown status {record['status']!r}")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: corrupt build record ({error}); {advice}") from None
    if record["prompt_index"] != i or record["prompt"] != prompt:
        raise ValueError(f"{path}: record of prompt {record['prompt_index']} {record['prompt']!r} does not match "
                         f"prompt {i} {prompt!r} of the prompt file; {advice}")
    if record["settings"] != digest:
        raise ValueError(f"{path}: written by a run with different settings than {CONFIG_FILENAME}; {advice}")
    return record


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _remove_temporaries(out: Path) -> None:
    """Hidden temporaries that killed runs left behind (ours only, of dead processes)."""
    for folder in (out / RECORDS_DIRNAME, out / "images", out / "pool"):
        remove_stale_temporaries(folder, recursive=True)


# --------------------------------------------------------------------------- the build


@dataclass
class BuildResult:
    output_dir: Path
    num_prompts: int
    num_pairs: int
    num_skipped: int
    generated_prompts: int  # prompts this process generated in this call (the rest were resumed)
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (prompt index, reason)


def _build_prompt(generator: PoolGenerator, scorer: Scorer, config: BuildConfig, out: Path, i: int, prompt: str,
                  digest: str, progress) -> None:
    ext = ".jpg" if config.image_format == "jpeg" else ".png"
    seeds = [derive_seed(config.seed, i, j) for j in range(config.pool_size)]
    keeper = _Keeper(config.loser_rank + 1)  # the loser_rank-th lowest of the non-winners is among these
    scores: list[float] = []
    pool_files: list[str] = []
    for start in range(0, config.pool_size, config.batch_size):
        batch_seeds = seeds[start : start + config.batch_size]
        images = generator.generate(prompt, batch_seeds)
        values = scorer.score([prompt] * len(images), images)
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1).tolist()
        if len(values) != len(images):
            raise ValueError(f"scorer {scorer.name!r} returned {len(values)} scores for {len(images)} images")
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"scorer {scorer.name!r} returned non-finite scores {bad} for prompt {i} {prompt!r}")
        for k, (value, image) in enumerate(zip(values, images)):
            j = start + k
            scores.append(value)
            if config.keep_pool:
                rel = f"pool/{i // 1000:04d}/{i:06d}_{j:03d}{ext}"
                path = out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, _encode_image(image, config.image_format))
                pool_files.append(rel)
            keeper.add(value, j, image)
        del images
        if progress is not None:
            progress.update(len(batch_seeds))
    selection = select_pair(scores, config.loser_rank, config.min_score_gap)
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "prompt_index": i,
        "prompt": prompt,
        "settings": digest,
        "scores": scores,
        "seeds": seeds,
        "winner": selection.winner,
        "loser": selection.loser,
        "pool_images": pool_files or None,
    }
    if selection.skipped:
        record.update(status="skipped", reason=selection.skipped)
    else:
        if config.keep_pool:
            win_rel, lose_rel = pool_files[selection.winner], pool_files[selection.loser]
        else:
            sub = f"images/{i // 1000:04d}"
            win_rel, lose_rel = f"{sub}/{i:06d}_win{ext}", f"{sub}/{i:06d}_lose{ext}"
            for rel, j in ((win_rel, selection.winner), (lose_rel, selection.loser)):
                path = out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, _encode_image(keeper.image(j), config.image_format))
        record.update(status="ok", win_image=win_rel, lose_image=lose_rel, win_score=selection.win_score,
                      lose_score=selection.lose_score, win_seed=seeds[selection.winner],
                      lose_seed=seeds[selection.loser])
    # the commit point: once this file exists the prompt is done
    atomic_write_text(_record_path(out, i), json.dumps(record, indent=1) + "\n")


def _resolve_size(config: BuildConfig, components):
    """Check the resolution against the model's family and turn ``auto`` into its default, from the file's header
    when that tells the family (else from the loaded model, which is then returned)."""
    family = components.family if components is not None else peek_family(config.model)
    if family is None:  # a hub id or a pickle: only the weights tell
        components = config.model_options.load(config.model, config.model_config_dir, config.size)
        family = components.family
    config.model_options.check_size(family, config.size)
    config.resolution = "x".join(map(str, family_size(config.size, family)))
    return components


def build_dataset(config: BuildConfig, scorer: Scorer, *, components=None, show_progress: bool = True) -> BuildResult:
    """Generate, score and select; write the triplet dataset to ``config.output_dir`` (resumable).

    Args:
        config: the build settings.
        scorer: the scorer object (``name``, ``score(prompts, images)``).
        components: an already loaded model (default: ``config.model_options.load(config.model)``).
        show_progress: a tqdm bar in images on the main process.

    Raises:
        ValueError: bad settings, an output directory of a build with other settings, a corrupt record.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from hgdpo.data.pickapic import export_pickapic
    from hgdpo.data.writers import write_triplet_index
    from hgdpo.prompts import read_prompts

    config.validate()
    prompt_list = read_prompts(config.prompts, column=config.prompt_column, category=config.category)
    prompts = prompt_list.prompts
    if not prompts:
        raise ValueError(f"{config.prompts}: no prompts (dropped {prompt_list.dropped_empty} empty, "
                         f"{prompt_list.dropped_duplicates} duplicates)")
    components = _resolve_size(config, components)
    scorer_name = str(getattr(scorer, "name", type(scorer).__name__))
    settings = _settings(config, prompts, scorer_name)
    digest = _settings_digest(settings)
    out = Path(config.output_dir).expanduser()

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    state.wait_for_everyone()  # every rank has checked the output folder before the main one writes into it
    if state.is_main_process:
        (out / RECORDS_DIRNAME).mkdir(parents=True, exist_ok=True)
        _check_or_write_settings(out, settings)
        _remove_temporaries(out)
        if prompt_list.dropped_empty or prompt_list.dropped_duplicates:
            logger.info("%s: %d prompts (dropped %d empty, %d duplicates)", config.prompts, len(prompts),
                        prompt_list.dropped_empty, prompt_list.dropped_duplicates)
    state.wait_for_everyone()
    if not state.is_main_process:
        _check_or_write_settings(out, settings)  # raises on every rank alike

    mine = range(rank, len(prompts), world)
    pending = []
    for i in mine:
        path = _record_path(out, i)
        if path.exists():
            _read_record(path, i, prompts[i], digest)  # a corrupt record stops the run now
        else:
            pending.append(i)
    done_before = len(mine) - len(pending)
    if done_before and state.is_main_process:
        logger.info("Resuming: %d of this process's %d prompts already have a record", done_before, len(mine))

    if pending:
        if components is None:
            components = config.model_options.load(config.model, config.model_config_dir, config.size)
        device = torch.device(config.device) if config.device else state.device
        generator = PoolGenerator(components, config, device, resolve_dtype(config.dtype, device))
        progress = tqdm(total=len(pending) * config.pool_size, desc=f"building (rank {rank})" if world > 1 else
                        "building", unit="img", dynamic_ncols=True,
                        disable=not (show_progress and state.is_main_process))
        try:
            for i in pending:
                _build_prompt(generator, scorer, config, out, i, prompts[i], digest, progress)
        finally:
            progress.close()
    state.wait_for_everyone()

    result = BuildResult(out, len(prompts), 0, 0, len(pending), prompt_list.dropped_empty,
                         prompt_list.dropped_duplicates)
    if not state.is_main_process:
        return result
    rows, missing = [], []
    for i, prompt in enumerate(prompts):
        path = _record_path(out, i)
        if not path.exists():
            missing.append(i)
            continue
        record = _read_record(path, i, prompt, digest)
        if record["status"] == "skipped":
            result.skipped.append((i, record.get("reason", "")))
            continue
        for key in ("win_image", "lose_image"):
            if not (out / record[key]).is_file():
                raise ValueError(f"{path}: its image {out / record[key]} is missing; delete the record to "
                                 f"regenerate prompt {i}")
        rows.append({key: record[key] for key in ("prompt", "win_image", "lose_image", "win_score", "lose_score",
                                                  "scores", "win_seed", "lose_seed")})
    if missing:
        raise ValueError(f"{len(missing)} prompt(s) have no record after the build (e.g. {missing[:5]}); "
                         "re-run the same command to finish them")
    write_triplet_index(
        out, rows, pool_size=config.pool_size, scorer=scorer_name, model=config.model,
        image_format=config.image_format,
        extra_metadata={"builder": {k: v for k, v in settings.items() if k not in ("model", "scorer", "pool_size")},
                        "num_skipped": len(result.skipped)},
    )
    result.num_pairs, result.num_skipped = len(rows), len(result.skipped)
    logger.info("Wrote %s: %d pairs from %d prompts (%d skipped, %d generated now)", out / "index.parquet",
                len(rows), len(prompts), len(result.skipped), len(pending))
    if config.export_pickapic:
        count = export_pickapic(out, config.export_pickapic)
        logger.info("Exported %d pairs to %s (Pick-a-Pic v2 layout)", count, config.export_pickapic)
    return result

