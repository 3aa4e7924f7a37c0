"""What every scorer shares: the :class:`Scorer` interface, input checks, the missing-weights error and the
CLIP loader and embedder of the CLIP-based scorers (:mod:`hgdpo.feedback.scorers`, :mod:`hgdpo.feedback.metrics`).

Weights are never downloaded behind the user's back in offline setups: a local folder that lacks
files, or a hub id that cannot be fetched, raises :class:`ScorerWeightsError` naming the folder
contents expected and the ``huggingface-cli download`` / ``hf download`` commands that fetch them.

This module is part of the core library: it imports neither ComfyUI nor the WebUI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
MAX_TEXT_LENGTH = 77
MODEL_FLAG = "--scorer-model"
"""Command-line option through which hgdpo's tools take a scorer's model folder or hub id."""
PROCESSOR_FLAG = "--scorer-processor"
"""Command-line option through which hgdpo's tools take a scorer's processor folder or hub id."""

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class ScorerWeightsError(FileNotFoundError):
    """A scorer's model or processor files are missing locally and could not be fetched."""


@runtime_checkable
class Scorer(Protocol):
    """Scores (prompt, image) pairs; higher is better.

    ``score`` returns a float32 CPU tensor ``[N]`` with one score per pair (``prompts[i]``
    describes ``images[i]``). Implementations batch internally (``batch_size``) and hold at most
    one batch of preprocessed pixels at a time.
    """

    name: str

    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """One score per (prompt, image) pair, float32 on the CPU."""
        ...


def check_pairs(prompts: Sequence[str], images: Sequence[Image]) -> None:
    """TypeError / ValueError unless ``prompts`` is a sequence of strings, one per PIL image of ``images``."""
    import PIL.Image

    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings (one per image), not a single string.")
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images; give one prompt per image.")
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is a {type(prompt).__name__}, not a str.")
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"images[{index}] is a {type(image).__name__}, not a PIL.Image.Image.")


def check_batch_size(batch_size: int) -> int:
    """``batch_size``, or ValueError unless it is a positive integer."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return batch_size


def projected(output: Any) -> torch.Tensor:
    """Projected embeddings from ``get_image_features``/``get_text_features`` of any transformers.

    transformers 4 returns the tensor; transformers 5 returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` already holds the projection (``visual_projection``/``text_projection``).
    """
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"Unexpected CLIP feature output {type(output).__name__}: no embeddings tensor in it.")


def is_local(source: str | Path) -> bool:
    """A path on disk (or meant as one), as opposed to an ``owner/name`` hub id."""
    text = str(source)
    return (
        isinstance(source, Path)
        or Path(text).expanduser().exists()
        or text.startswith((".", "/", "~"))
        or text.count("/") != 1
    )


def download_help(repo_id: str, folder: str, option: str = "", patterns: Sequence[str] = ()) -> str:
    """Both CLIs' commands: ``huggingface-cli`` takes ``--include a b``, ``hf`` takes ``--include a --include b``."""
    quoted = [f'"{pattern}"' for pattern in patterns]
    legacy = f" {option} {' '.join(quoted)}" if patterns else ""
    current = "".join(f" {option} {pattern}" for pattern in quoted)
    return (
        f"    huggingface-cli download {repo_id}{legacy} --local-dir {folder}\n"
        f"    (huggingface_hub >= 1.0 names it: hf download {repo_id}{current} --local-dir {folder})"
    )


class WeightsSpec:
    """What a scorer needs on disk, and how to get it: used to word :class:`ScorerWeightsError`."""

    def __init__(
        self, scorer: str, model_repo: str, model_dir: str, processor_repo: str, processor_dir: str,
        model_filter: tuple[str, Sequence[str]] = ("", ()),
    ):
        self.scorer, self.model_filter = scorer, model_filter
        self.model_repo, self.model_dir = model_repo, model_dir
        self.processor_repo, self.processor_dir = processor_repo, processor_dir

    def under(self, root: str | Path) -> WeightsSpec:
        """The same weights in the folders of the same names under ``root`` (e.g. a frontend's models folder)."""
        return WeightsSpec(self.scorer, self.model_repo, str(Path(root) / Path(self.model_dir).name),
                           self.processor_repo, str(Path(root) / Path(self.processor_dir).name), self.model_filter)

    def fetch_commands(self) -> str:
        """The commands that download the model (and a processor of another repository) into their folders."""
        lines = [download_help(self.model_repo, self.model_dir, *self.model_filter)]
        if self.processor_repo != self.model_repo:
            lines.append(download_help(self.processor_repo, self.processor_dir, "--include", ("*.json", "*.txt")))
        return "\n".join(lines)

    def error(self, what: str, source: str | Path, problem: str) -> ScorerWeightsError:
        """The error for a missing/unfetchable ``what`` ("model" or "processor") at ``source``."""
        weights = " or ".join(WEIGHT_FILES[::2])
        lines = [
            f"{self.scorer}: cannot load the {what} from {str(source)!r}: {problem}",
            "",
            "Expected folders:",
            f"  model: config.json and the weights ({weights}), e.g. {self.model_dir}",
            "  processor: preprocessor_config.json (or processor_config.json) and the tokenizer (tokenizer.json, "
            + f"or vocab.json + merges.txt), e.g. {self.processor_dir}",
            "",
            "Fetch them once on a machine with internet access:",
            self.fetch_commands(),
        ]
        if self.processor_repo == self.model_repo:
            pointer = f"{MODEL_FLAG} {self.model_dir} (in Python: model={self.model_dir!r})"
        else:
            pointer = (
                f"{MODEL_FLAG} {self.model_dir} {PROCESSOR_FLAG} {self.processor_dir} "
                f"(in Python: model={self.model_dir!r}, processor={self.processor_dir!r})"
            )
        lines += ["", f"then point hgdpo at the downloaded files: {pointer}."]
        return ScorerWeightsError("\n".join(lines))


def missing_model_files(folder: Path) -> str | None:
    """What a transformers model folder lacks (config or weights), or None when it is complete."""
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"no weights file ({', '.join(WEIGHT_FILES)})"
    return None


def missing_processor_files(folder: Path) -> str | None:
    """What a CLIP processor folder lacks (image processor config or tokenizer), or None when it is complete."""
    if not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        return "preprocessor_config.json is missing"
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    return None if has_tokenizer else "no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"


def _dtype_option(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_clip(model: str | Path, processor: str | Path, dtype: torch.dtype, spec: WeightsSpec):
    """A ``CLIPModel`` (eval, frozen) and its ``CLIPProcessor``, or :class:`ScorerWeightsError`.

    Local folders are checked before anything is loaded, so a missing processor is reported without
    first reading gigabytes of model weights.
    """
    from transformers import CLIPModel, CLIPProcessor

    sources = {"processor": processor, "model": model}
    checks = {"processor": missing_processor_files, "model": missing_model_files}
    for what, source in sources.items():
        if is_local(source):
            folder = Path(source).expanduser()
            problem = checks[what](folder) if folder.is_dir() else "no such folder"
            if problem:
                raise spec.error(what, source, problem)
            sources[what] = str(folder)
    loaders = {
        "processor": CLIPProcessor.from_pretrained,
        "model": lambda source: CLIPModel.from_pretrained(source, **_dtype_option(dtype)),
    }
    loaded = {}
    for what, source in sources.items():
        try:
            loaded[what] = loaders[what](str(source))
        except OSError as error:  # offline, unreachable hub, unknown or gated repo
            if is_local(source):
                raise
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise spec.error(what, source, reason) from error
    return loaded["model"].requires_grad_(False).eval(), loaded["processor"]


# --------------------------------------------------------------------------- CLIP-based scorers


class CLIPEmbedder:
    """Shared batching and embedding of the CLIP-based scorers."""

    name = "clip-embedder"

    def __init__(self, model, processor, device: str | torch.device, dtype: torch.dtype, batch_size: int):
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device)
        self.processor = processor
        text_config = getattr(model.config, "text_config", None)
        self.max_length = min(MAX_TEXT_LENGTH, getattr(text_config, "max_position_embeddings", MAX_TEXT_LENGTH))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image]) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[n, projection_dim]`` of one batch."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        features = projected(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[n, projection_dim]`` of one batch."""
        tokens = self.processor.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        features = projected(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        )
        return features / features.norm(dim=-1, keepdim=True)

    def cosines(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """Cosine similarity of each pair, batch by batch, float32 on the CPU.

        Each distinct prompt is encoded once (a pool of N images of one prompt costs one text pass).
        """
        check_pairs(prompts, images)
        if not images:
            return torch.empty(0, dtype=torch.float32)
        unique = list(dict.fromkeys(prompts))
        text_embeds = torch.cat([self.embed_texts(unique[start:start + self.batch_size]).float()
                                 for start in range(0, len(unique), self.batch_size)])
        position = {prompt: i for i, prompt in enumerate(unique)}
        rows = torch.tensor([position[prompt] for prompt in prompts], device=text_embeds.device)
        result = torch.empty(len(images), dtype=torch.float32)
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            image_embeds = self.embed_images(images[start:stop])
            result[start:stop] = (text_embeds[rows[start:stop]] * image_embeds.float()).sum(-1).cpu()
        return result
