"""Image-preference scorers: the AI feedback that ranks generated images for HG-DPO.

A scorer maps (prompt, image) pairs to one number each, higher is better::

    scorer = load_scorer("pickscore", model="models/pickscore/PickScore_v1",
                         processor="models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K")
    scores = scorer.score(prompts, images)  # float32 CPU tensor [N]; prompts[i] describes images[i]

Built in:

* ``"pickscore"`` -- :class:`PickScoreScorer`, PickScore (Kirstain et al., 2023), the AI feedback of
  the HG-DPO paper, computed exactly as its reference code: ``logit_scale.exp() * cos(text, image)``,
  a raw score per pair (around 20 for real images), never softmaxed across a batch.
* ``"clip"`` -- :class:`CLIPScoreScorer`, the CLIP score of Hessel et al. (2021) as torchmetrics
  computes it: ``100 * max(cos(text, image), 0)`` with any transformers ``CLIPModel``.
* ``"hpsv2"``, ``"aesthetic"``, ``"imagereward"`` -- the paper's other evaluation metrics, in
  :mod:`hgdpo.feedback.metrics` (imported only when one is built).
* ``"package.module:callable"`` -- a plug-in (see :func:`load_scorer`). The paper names PickScore's
  blindness to fine anatomy (malformed fingers, extra limbs) as the main limitation of its feedback;
  a plug-in lets users bring a hand- or anatomy-aware scorer (or an ensemble) without touching hgdpo.

Weights are never downloaded behind the user's back in offline setups: a local folder that lacks
files, or a hub id that cannot be fetched, raises :class:`ScorerWeightsError` naming the folder
contents expected and the ``huggingface-cli download`` / ``hf download`` commands that fetch them.

This module is part of the core library: it imports neither ComfyUI nor the WebUI.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
MAX_TEXT_LENGTH = 77
MODEL_FLAG = "--scorer-model"
"""Command-line option through which hgdpo's tools take a scorer's model folder or hub id."""
PROCESSOR_FLAG = "--scorer-processor"
"""Command-line option through which hgdpo's tools take a scorer's processor folder or hub id."""

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


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


# --------------------------------------------------------------------------- helpers


def _check_pairs(prompts: Sequence[str], images: Sequence[Image]) -> None:
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


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return batch_size


def _projected(output: Any) -> torch.Tensor:
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


def _is_local(source: str | Path) -> bool:
    """A path on disk (or meant as one), as opposed to an ``owner/name`` hub id."""
    text = str(source)
    return (
        isinstance(source, Path)
        or Path(text).expanduser().exists()
        or text.startswith((".", "/", "~"))
        or text.count("/") != 1
    )


def _download_help(repo_id: str, folder: str, option: str = "", patterns: Sequence[str] = ()) -> str:
    """Both CLIs' commands: ``huggingface-cli`` takes ``--include a b``, ``hf`` takes ``--include a --include b``."""
    quoted = [f'"{pattern}"' for pattern in patterns]
    legacy = f" {option} {' '.join(quoted)}" if patterns else ""
    current = "".join(f" {option} {pattern}" for pattern in quoted)
    return (
        f"    huggingface-cli download {repo_id}{legacy} --local-dir {folder}\n"
        f"    (huggingface_hub >= 1.0 names it: hf download {repo_id}{current} --local-dir {folder})"
    )


class _WeightsSpec:
    """What a scorer needs on disk, and how to get it: used to word :class:`ScorerWeightsError`."""

    def __init__(
        self, scorer: str, model_repo: str, model_dir: str, processor_repo: str, processor_dir: str,
        model_filter: tuple[str, Sequence[str]] = ("", ()),
    ):
        self.scorer, self.model_filter = scorer, model_filter
        self.model_repo, self.model_dir = model_repo, model_dir
        self.processor_repo, self.processor_dir = processor_repo, processor_dir

    def error(self, what: str, source: str | Path, problem: str) -> ScorerWeightsError:
        """The error for a missing/unfetchable ``what`` ("model" or "processor") at ``source``."""
        weights = " or ".join(_WEIGHT_FILES[::2])
        lines = [
            f"{self.scorer}: cannot load the {what} from {str(source)!r}: {problem}",
            "",
            "Expected folders:",
            f"  model: config.json and the weights ({weights}), e.g. {self.model_dir}",
            "  processor: preprocessor_config.json (or processor_config.json) and the tokenizer (tokenizer.json, "
            + f"or vocab.json + merges.txt), e.g. {self.processor_dir}",
            "",
            "Fetch them once on a machine with internet access:",
            _download_help(self.model_repo, self.model_dir, *self.model_filter),
        ]
        if self.processor_repo == self.model_repo:
            pointer = f"{MODEL_FLAG} {self.model_dir} (in Python: model={self.model_dir!r})"
        else:
            lines.append(_download_help(self.processor_repo, self.processor_dir, "--include", ("*.json", "*.txt")))
            pointer = (
                f"{MODEL_FLAG} {self.model_dir} {PROCESSOR_FLAG} {self.processor_dir} "
                f"(in Python: model={self.model_dir!r}, processor={self.processor_dir!r})"
            )
        lines += ["", f"then point hgdpo at the downloaded files: {pointer}."]
        return ScorerWeightsError("\n".join(lines))


def _missing_model_files(folder: Path) -> str | None:
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return f"no weights file ({', '.join(_WEIGHT_FILES)})"
    return None


def _missing_processor_files(folder: Path) -> str | None:
    if not any((folder / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        return "preprocessor_config.json is missing"
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    return None if has_tokenizer else "no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"


def default_processor(model: str | Path, fallback: str) -> str:
    """The processor to use when none is given: a local model folder's own processor files, else ``fallback``."""
    folder = Path(model).expanduser()
    if _is_local(model) and folder.is_dir() and _missing_processor_files(folder) is None:
        logger.info("Scorer processor: the files in the model folder %s (give %s to use another).", folder,
                    PROCESSOR_FLAG)
        return str(folder)
    logger.info("Scorer processor: %s (give %s to use another).", fallback, PROCESSOR_FLAG)
    return fallback


def _dtype_option(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_clip(model: str | Path, processor: str | Path, dtype: torch.dtype, spec: _WeightsSpec):
    """A ``CLIPModel`` (eval, frozen) and its ``CLIPProcessor``, or :class:`ScorerWeightsError`.

    Local folders are checked before anything is loaded, so a missing processor is reported without
    first reading gigabytes of model weights.
    """
    from transformers import CLIPModel, CLIPProcessor

    sources = {"processor": processor, "model": model}
    checks = {"processor": _missing_processor_files, "model": _missing_model_files}
    for what, source in sources.items():
        if _is_local(source):
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
            if _is_local(source):
                raise
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise spec.error(what, source, reason) from error
    return loaded["model"].requires_grad_(False).eval(), loaded["processor"]


# --------------------------------------------------------------------------- CLIP-based scorers


class _CLIPEmbedder:
    """Shared batching and embedding of the CLIP-based scorers."""

    name = "clip-embedder"

    def __init__(self, model, processor, device: str | torch.device, dtype: torch.dtype, batch_size: int):
        self.batch_size = _check_batch_size(batch_size)
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
        features = _projected(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[n, projection_dim]`` of one batch."""
        tokens = self.processor.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        features = _projected(
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
        _check_pairs(prompts, images)
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


class PickScoreScorer(_CLIPEmbedder):
    """PickScore (Kirstain et al., 2023): ``logit_scale.exp() * cos(text_emb, image_emb)`` per pair.

    As the reference code: CLIP-H text and image embeddings, each L2-normalised, text tokenized with
    ``padding="max_length", truncation=True, max_length=77``. The raw score is returned (not a softmax
    over the images of a prompt), so scores of different batches and prompts are comparable.

    Args:
        model: ``yuvalkirstain/PickScore_v1`` (hub id) or a local folder holding it.
        processor: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (hub id) or a local folder with its
            ``preprocessor_config.json`` and tokenizer files. Default: the model folder itself when it
            holds those files (a local copy saved with its processor), else that hub id; the choice is logged.
        device, dtype: where and in which precision the model runs; scores are float32 on the CPU.
        batch_size: pairs embedded at once.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str | Path = DEFAULT_PICKSCORE_MODEL,
        processor: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ):
        _check_batch_size(batch_size)
        spec = _WeightsSpec(
            "PickScore",
            DEFAULT_PICKSCORE_MODEL,
            "models/pickscore/PickScore_v1",
            DEFAULT_PICKSCORE_PROCESSOR,
            "models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K",
        )
        processor = default_processor(model, DEFAULT_PICKSCORE_PROCESSOR) if processor is None else processor
        clip_model, clip_processor = _load_clip(model, processor, dtype, spec)
        super().__init__(clip_model, clip_processor, device, dtype, batch_size)

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """PickScore of each (prompt, image) pair: float32 CPU tensor ``[N]``."""
        return self.model.logit_scale.exp().float().cpu() * self.cosines(prompts, images)


class CLIPScoreScorer(_CLIPEmbedder):
    """CLIP score (Hessel et al., 2021) as torchmetrics computes it: ``100 * max(cos(text, image), 0)``.

    Works with any transformers ``CLIPModel``; scores lie in ``[0, 100]`` (real image-caption pairs
    score about 25-35 with ViT-L/14). Text is truncated to 77 tokens.

    Args:
        model: ``openai/clip-vit-large-patch14`` (hub id) or any local CLIPModel folder.
        processor: processor folder or hub id; defaults to ``model`` (CLIP repos ship both).
        device, dtype, batch_size: as for :class:`PickScoreScorer`.
    """

    name = "clip"

    def __init__(
        self,
        model: str | Path = DEFAULT_CLIP_MODEL,
        processor: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ):
        _check_batch_size(batch_size)
        processor = model if processor is None else processor
        spec = _WeightsSpec(
            "CLIP score",
            DEFAULT_CLIP_MODEL,
            "models/clip/clip-vit-large-patch14",
            DEFAULT_CLIP_MODEL,
            "models/clip/clip-vit-large-patch14",
            model_filter=("--exclude", ("*.h5", "*.msgpack")),  # the repo also holds TensorFlow and Flax weights
        )
        clip_model, clip_processor = _load_clip(model, processor, dtype, spec)
        super().__init__(clip_model, clip_processor, device, dtype, batch_size)

    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """CLIP score of each (prompt, image) pair: float32 CPU tensor ``[N]`` in ``[0, 100]``."""
        return 100.0 * self.cosines(prompts, images).clamp(min=0.0)


# --------------------------------------------------------------------------- plug-ins


class FunctionScorer:
    """Wraps a plain function ``(prompts, images) -> sequence of floats`` as a :class:`Scorer`.

    The function is called once per batch of ``batch_size`` pairs; its values become a float32 CPU
    tensor.
    """

    def __init__(self, function: Callable[[Sequence[str], Sequence[Image]], Any], name: str | None = None,
                 batch_size: int = 16):
        self.function = function
        self.name = name or getattr(function, "__qualname__", type(function).__name__)
        self.batch_size = _check_batch_size(batch_size)

    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """The function's values for each pair, float32 on the CPU."""
        _check_pairs(prompts, images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            values = self.function(list(prompts[start:stop]), list(images[start:stop]))
            values = torch.as_tensor(values).detach().to("cpu", torch.float32).reshape(-1)
            if values.numel() != len(images[start:stop]):
                raise ValueError(
                    f"Scorer function {self.name} returned {values.numel()} values for "
                    f"{len(images[start:stop])} pairs; it must return one score per pair."
                )
            chunks.append(values)
        return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.float32)


def _metric(class_name: str) -> Callable[..., Scorer]:
    """A factory of the evaluation metric ``hgdpo.feedback.metrics.<class_name>``, imported when first built."""

    def factory(**kwargs: Any) -> Scorer:
        from hgdpo.feedback import metrics

        return getattr(metrics, class_name)(**kwargs)

    return factory


_BUILTIN = {
    "pickscore": PickScoreScorer,
    "pick": PickScoreScorer,
    "clip": CLIPScoreScorer,
    "clipscore": CLIPScoreScorer,
    "clip-score": CLIPScoreScorer,
    "hpsv2": _metric("HPSv2Scorer"),
    "hps": _metric("HPSv2Scorer"),
    "aesthetic": _metric("AestheticScorer"),
    "laion-aesthetic": _metric("AestheticScorer"),
    "imagereward": _metric("ImageRewardScorer"),
}


def _accepted(function: Callable, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split ``options`` into those the callable's signature takes and those it does not."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass nothing
        return {}, list(options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(options), []
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in options.items() if k in names}, [k for k in options if k not in names]


def _is_scoring_function(function: Callable) -> bool:
    """A function with at least two required positional parameters is ``(prompts, images) -> scores``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) >= 2


def _import_plugin(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"Plug-in scorer {spec!r} must be written 'package.module:callable'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"Plug-in scorer {spec!r}: cannot import module {module_name!r} ({error}). Is it installed, "
            "or on PYTHONPATH?"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"Plug-in scorer {spec!r}: module {module_name!r} has no attribute {attribute!r}."
            ) from None
    return target


SCORER_HELP = "Scorer: 'pickscore' (paper), 'clip', or a plug-in 'package.module:callable'."
SCORER_MODEL_HELP = "Scorer model folder or hub id (default: the scorer's own default)."
SCORER_PROCESSOR_HELP = "Scorer processor folder or hub id (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."


def load_named_scorer(spec: str, model: str | Path | None, processor: str | Path | None,
                      device: str | torch.device = "cpu") -> Scorer:
    """:func:`load_scorer` with an optional second source (``processor``; ``None``: the scorer's default)."""
    options = {"processor": processor} if processor else {}
    return load_scorer(spec, model=model, device=device, **options)


def load_scorer(spec: str, model: str | Path | None = None, device: str | torch.device = "cpu",
                **kwargs: Any) -> Scorer:
    """Build a scorer from a name or a plug-in reference.

    Args:
        spec: ``"pickscore"``, ``"clip"``, ``"hpsv2"``, ``"aesthetic"``, ``"imagereward"``, or
            ``"package.module:callable"``. A plug-in callable may be
            a scorer class or factory (called with ``model=`` and ``device=`` where its signature takes
            them, plus ``kwargs``) returning an object with ``score(prompts, images)``; an object with
            ``score`` itself; or a plain function ``(prompts, images) -> sequence of floats``, which
            is wrapped in a :class:`FunctionScorer`.
        model: model folder or hub id (``None``: the scorer's default).
        device: where the model runs.
        **kwargs: passed on, e.g. ``processor=``, ``dtype=``, ``batch_size=``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Scorer spec must be a non-empty string, got {spec!r}.")
    spec = spec.strip()
    if ":" not in spec:
        factory = _BUILTIN.get(spec.lower())
        if factory is None:
            raise ValueError(
                f"Unknown scorer {spec!r}: use one of {', '.join(_BUILTIN)}, or a plug-in "
                "'package.module:callable'."
            )
        if model is not None:
            kwargs["model"] = model
        return factory(device=device, **kwargs)

    target = _import_plugin(spec)
    if not isinstance(target, type) and hasattr(target, "score"):
        if model is not None or kwargs:
            logger.warning("Plug-in scorer %s is an object; model= and other options are ignored.", spec)
        return target
    if not callable(target):
        raise TypeError(f"Plug-in scorer {spec!r} is a {type(target).__name__}: neither callable nor a scorer.")
    if not isinstance(target, type) and _is_scoring_function(target):
        if model is not None:
            logger.warning("Plug-in scorer %s is a plain scoring function; model=%s is ignored.", spec, model)
        options, rejected = _accepted(FunctionScorer, kwargs)
        if rejected:
            raise TypeError(f"Plug-in scorer {spec!r} is a scoring function; unexpected options {rejected}.")
        return FunctionScorer(target, name=spec, **options)

    standard = {"model": model, "device": device} if model is not None else {"device": device}
    options, rejected = _accepted(target, standard)
    if rejected:
        logger.info("Plug-in scorer %s does not take %s; not passed.", spec, ", ".join(rejected))
    extra, rejected = _accepted(target, kwargs)
    if rejected:
        raise TypeError(f"Plug-in scorer {spec!r} does not accept the options {rejected}.")
    result = target(**options, **extra)
    if hasattr(result, "score"):
        if not hasattr(result, "name"):
            try:
                result.name = spec
            except AttributeError:
                pass
        return result
    if callable(result):
        return FunctionScorer(result, name=spec)
    raise TypeError(
        f"Plug-in scorer {spec!r} returned a {type(result).__name__} without a score(prompts, images) method."
    )
