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

Weights are never downloaded behind the user's back in offline setups: a missing file raises
:class:`~hgdpo.feedback.base.ScorerWeightsError` naming the files expected and the commands that fetch
them. The interface, the checks and the CLIP loader the scorers share live in :mod:`hgdpo.feedback.base`;
this module re-exports :class:`Scorer` and :class:`ScorerWeightsError`, the names callers use.

This module is part of the core library: it imports neither ComfyUI nor the WebUI.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hgdpo.feedback.base import (
    DEFAULT_CLIP_MODEL,
    PROCESSOR_FLAG,
    CLIPEmbedder,
    Scorer,
    ScorerWeightsError,
    WeightsSpec,
    check_batch_size,
    check_pairs,
    is_local,
    load_clip,
    missing_model_files,
    missing_processor_files,
)

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "DEFAULT_PICKSCORE_MODEL",
    "DEFAULT_PICKSCORE_PROCESSOR",
    "PICKSCORE_WEIGHTS",
    "CLIPScoreScorer",
    "FunctionScorer",
    "PickScoreScorer",
    "Scorer",
    "ScorerWeightsError",
    "load_scorer",
    "pickscore_folders",
]

logger = logging.getLogger(__name__)

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: PickScore's folders: ``models/pickscore/PickScore_v1`` (model) and ``models/pickscore/CLIP-ViT-H-14-...``
#: (processor); every frontend keeps them under its own ``models/pickscore`` (:meth:`WeightsSpec.under`).
PICKSCORE_WEIGHTS = WeightsSpec(
    "PickScore",
    DEFAULT_PICKSCORE_MODEL,
    "models/pickscore/PickScore_v1",
    DEFAULT_PICKSCORE_PROCESSOR,
    "models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K",
)


def default_processor(model: str | Path, fallback: str) -> str:
    """The processor to use when none is given: a local model folder's own processor files, else ``fallback``."""
    folder = Path(model).expanduser()
    if is_local(model) and folder.is_dir() and missing_processor_files(folder) is None:
        logger.info("Scorer processor: the files in the model folder %s (give %s to use another).", folder,
                    PROCESSOR_FLAG)
        return str(folder)
    logger.info("Scorer processor: %s (give %s to use another).", fallback, PROCESSOR_FLAG)
    return fallback


def pickscore_folders(root: str | Path) -> tuple[Path, Path]:
    """(model folder, processor folder) of PickScore under ``root``, or ScorerWeightsError saying what to fetch.

    ``root`` holds the folders of :data:`PICKSCORE_WEIGHTS`; it may also be the model folder itself when it
    holds the processor files too (the model folder stands in for a missing processor folder likewise).
    """
    root = Path(root).expanduser()
    if missing_model_files(root) is None and missing_processor_files(root) is None:
        return root, root
    spec = PICKSCORE_WEIGHTS.under(root)
    model, processor = Path(spec.model_dir), Path(spec.processor_dir)
    model_problem = missing_model_files(model)
    processor_problem = missing_processor_files(processor)
    if processor_problem and missing_processor_files(model) is None:
        processor, processor_problem = model, None
    if model_problem is None and processor_problem is None:
        return model, processor
    missing = [f"{folder} ({problem})" for folder, problem in ((model, model_problem), (processor, processor_problem))
               if problem]
    raise ScorerWeightsError(f"PickScore's files are missing: {'; '.join(missing)}. Fetch them once on a machine "
                             f"with internet access:\n{spec.fetch_commands()}")


class PickScoreScorer(CLIPEmbedder):
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
        check_batch_size(batch_size)
        processor = default_processor(model, DEFAULT_PICKSCORE_PROCESSOR) if processor is None else processor
        clip_model, clip_processor = load_clip(model, processor, dtype, PICKSCORE_WEIGHTS)
        super().__init__(clip_model, clip_processor, device, dtype, batch_size)

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """PickScore of each (prompt, image) pair: float32 CPU tensor ``[N]``."""
        return self.model.logit_scale.exp().float().cpu() * self.cosines(prompts, images)


class CLIPScoreScorer(CLIPEmbedder):
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
        check_batch_size(batch_size)
        processor = model if processor is None else processor
        spec = WeightsSpec(
            "CLIP score",
            DEFAULT_CLIP_MODEL,
            "models/clip/clip-vit-large-patch14",
            DEFAULT_CLIP_MODEL,
            "models/clip/clip-vit-large-patch14",
            model_filter=("--exclude", ("*.h5", "*.msgpack")),  # the repo also holds TensorFlow and Flax weights
        )
        clip_model, clip_processor = load_clip(model, processor, dtype, spec)
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
        self.batch_size = check_batch_size(batch_size)

    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """The function's values for each pair, float32 on the CPU."""
        check_pairs(prompts, images)
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
