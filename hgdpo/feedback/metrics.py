"""The HG-DPO paper's evaluation metrics (Tables 1, 3, 5, 6) behind the :class:`~hgdpo.feedback.scorers.Scorer` interface.

PickScore and the CLIP score live in :mod:`hgdpo.feedback.scorers`; this module adds the other three, each computed
as its reference implementation computes it, with weights from a local file or folder (offline) or a hub id:

* ``"hpsv2"`` -- :class:`HPSv2Scorer`, Human Preference Score v2 / v2.1 (Wu et al., 2023) as
  ``hpsv2.img_score.score`` (github.com/tgxs002/HPSv2) computes it: open_clip ``ViT-H-14`` loaded with the
  HPS checkpoint; the image preprocessed by HPSv2's ``preprocess_val`` (``light_augmentation=True``: RGB,
  ``ToTensor``, ``ResizeMaxSize(224)`` = the longest side resized to 224 (bicubic, on the tensor) and the
  short side zero-padded to 224, centred; OpenAI mean / std); the prompt by open_clip's tokenizer (77
  tokens); the score is ``cos(image, text)`` of the L2-normalised features, no logit scale (about 0.2-0.3).
  Tensor resizing follows the installed torchvision (antialiased since 0.17, as a fresh ``pip install
  hpsv2`` gets it; hpsv2 pins no torchvision version).
* ``"aesthetic"`` -- :class:`AestheticScorer`, the LAION aesthetic predictor v2 (improved-aesthetic-predictor,
  ``simple_inference.py``): the CLIP ViT-L/14 image embedding (``encode_image``: the projected class token),
  L2-normalised, through the MLP ``Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
  Dropout, Linear(64, 16), Linear(16, 1)`` with **no** activations (state-dict keys ``layers.0/2/4/6/7``),
  weights ``sac+logos+ava1-l14-linearMSE.pth``. Scores about 1-10. The image goes through OpenAI CLIP's
  ``preprocess`` (PIL bicubic resize of the short side to 224, centre crop, RGB, OpenAI mean / std).
* ``"imagereward"`` -- :class:`ImageRewardScorer`, ImageReward v1.0 (Xu et al., 2023) as
  ``ImageReward.ImageReward.score`` (github.com/THUDM/ImageReward) computes it: BLIP's ViT-L/16 at 224 px
  encodes the image (OpenAI CLIP's ``preprocess``), BLIP's BERT-base text encoder reads the prompt
  (``bert-base-uncased`` tokenizer plus BLIP's ``[DEC]`` / ``[ENC]`` tokens, ``max_length=35``) with
  cross-attention to every image token, and the ``[CLS]`` feature goes through the same 5-layer linear MLP
  (768 inputs); reward = ``(mlp - 0.16717362830052426) / 1.0333394966054072``. The reference's BLIP code
  (``vit.py``, ``med.py``) is not a dependency: the same network is built from transformers'
  ``BlipVisionModel`` (BLIP's ViT: fused qkv, pre-norm blocks, final norm on every token; LayerNorm eps
  1e-6 as BLIP's ViT) and ``BlipTextModel`` (a port of BLIP's ``med.py`` BERT with cross-attention in every
  layer), and the checkpoint's keys are renamed to them (:func:`imagereward_state_dict`). The only
  numerical difference is the additive mask of padded text positions (BLIP: -10000, transformers: the
  dtype's minimum); both give those positions an attention weight of exactly 0 in float32.

Checkpoints are read with ``torch.load(weights_only=True)``. A missing file, or a hub id that cannot be
fetched, raises :class:`~hgdpo.feedback.base.ScorerWeightsError` naming the expected files and the download
commands; a file of another architecture raises ``ValueError`` naming the missing and unexpected keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hgdpo.feedback.base import (
    DEFAULT_CLIP_MODEL,
    CLIPEmbedder,
    ScorerWeightsError,
    WeightsSpec,
    check_batch_size,
    check_pairs,
    download_help,
    is_local,
    load_clip,
    projected,
)
from hgdpo.safe_load import load_pickle

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCHITECTURE = "ViT-H-14"

AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")  # the original name, TRL's copy
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_TEXT_LENGTH = 35
BLIP_VIT_LARGE: dict[str, Any] = {  # create_vit("large", 224) of BLIP / ImageReward
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
}
BLIP_VISION_NAMES = (  # BLIP ViT key prefix -> BlipVisionModel's, outside the blocks
    ("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."), ("norm.", "post_layernorm."))
BLIP_LAYER_NAMES = (  # BLIP ViT block key parts -> BlipEncoderLayer's
    ("blocks.", "encoder.layers."), (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.projection."))
BLIP_MED_CONFIG: dict[str, Any] = {  # ImageReward's med_config.json: BERT-base with cross-attention
    "vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "pad_token_id": 0,
}


# --------------------------------------------------------------------------- shared pieces


class RewardMLP(nn.Module):
    """The linear head of the aesthetic predictor and of ImageReward: five ``Linear`` layers, no activation.

    Layer indices match the reference ``nn.Sequential`` (dropouts at 1, 3, 5), so its state dict loads
    unchanged; dropout is inactive in eval mode.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def clip_preprocess(size: int) -> Callable[[Image], torch.Tensor]:
    """OpenAI CLIP's ``preprocess`` (also ImageReward's ``_transform``): resize, centre crop, RGB, normalise."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda image: image.convert("RGB"), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])


def hps_preprocess(image: Image, size: int = 224) -> torch.Tensor:
    """HPSv2's ``preprocess_val``: RGB, ``ToTensor``, ``ResizeMaxSize(size)`` (fill 0), OpenAI mean / std.

    The longest side becomes ``size`` (``round`` of each side times the scale, bicubic on the tensor), and
    the other is padded with zeros, ``pad // 2`` before and the rest after. The reference skips resizing
    *and* padding when the longest side already equals ``size``; padding is then only needed for
    non-square images, which the reference cannot score at all, so it is always applied here.
    """
    from torchvision.transforms import InterpolationMode, functional

    tensor = functional.to_tensor(image.convert("RGB"))
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        tensor = functional.resize(tensor, [round(height * scale), round(width * scale)], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - tensor.shape[1], size - tensor.shape[2]
    tensor = functional.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return functional.normalize(tensor, OPENAI_MEAN, OPENAI_STD)


def _file_error(scorer: str, metric: str, source: Any, problem: str, expected: str, repo: str, filename: str,
                folder: str, extra: Sequence[str] = ()) -> ScorerWeightsError:
    lines = [
        f"{scorer}: cannot load the checkpoint from {str(source)!r}: {problem}", "",
        f"Expected: {expected}", "",
        "Fetch it once on a machine with internet access:",
        download_help(repo, folder, "--include", (filename,)),
        *extra, "",
        (f"then point hgdpo at it: model={folder + '/' + filename!r} "
         f"(trainer/evaluate.py: --metric-model {metric}={folder}/{filename})."),
    ]
    return ScorerWeightsError("\n".join(lines))


def resolve_weights_file(source: str | Path | None, filenames: Sequence[str], default_repo: str,
                         error: Callable[[Any, str], ScorerWeightsError]) -> Path:
    """The checkpoint file named by ``source``: that file, one of ``filenames`` in that folder, or from a hub repo.

    ``None`` means ``default_repo``. A hub id is fetched with ``hf_hub_download`` (the first of
    ``filenames`` that the repo has); offline or unknown, ``error(source, reason)`` is raised.
    """
    source = default_repo if source is None else source
    if is_local(source):
        path = Path(source).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            for name in filenames:
                if (path / name).is_file():
                    return path / name
            raise error(source, f"the folder has none of {', '.join(filenames)}")
        raise error(source, "no such file or folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    reason = "not found"
    for name in filenames:
        try:
            return Path(hf_hub_download(str(source), name))
        except (OSError, ValueError, EntryNotFoundError) as failure:  # offline, unknown repo or file, bad id
            reason = (str(failure).splitlines() or [type(failure).__name__])[0]
    raise error(source, reason)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``torch.load(weights_only=True)``), unwrapped from ``state_dict`` / ``module.``."""
    import pickle

    try:
        checkpoint = load_pickle(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as failure:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({failure}).") from failure
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict, found a {type(checkpoint).__name__}.")  # noqa: TRY004
    return {key.removeprefix("module."): value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def _load_exactly(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, source: Any) -> None:
    """Load ``state_dict`` into ``module`` (assigning meta parameters), or say which keys do not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "") if keys else "none"

        raise ValueError(
            f"{source}: not a {what} checkpoint. Missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
            f"wrong shapes: {show([f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}' for k in wrong])}."
        )
    module.load_state_dict(state_dict, strict=True, assign=True)


def _batches(prompts: Sequence[str], images: Sequence[Image], batch_size: int):
    check_pairs(prompts, images)
    for start in range(0, len(images), batch_size):
        yield start, list(prompts[start:start + batch_size]), list(images[start:start + batch_size])


# --------------------------------------------------------------------------- HPS v2


def _hps_error(version: str) -> Callable[[Any, str], ScorerWeightsError]:
    filename = HPS_FILES[version]
    expected = (f"the HPS {version} checkpoint {filename} (HPS v2.0: {HPS_FILES['v2.0']}, v2.1: "
                f"{HPS_FILES['v2.1']}), as a file path, a folder holding it, or the hub id {HPS_REPO}. The open_clip "
                "ViT-H-14 weights are inside it: nothing else is needed.")
    return lambda source, problem: _file_error("HPS v2", "hpsv2", source, problem, expected, HPS_REPO, filename,
                                               "models/hpsv2")


class HPSv2Scorer:
    """Human Preference Score v2 / v2.1: ``cos(image, text)`` of open_clip ViT-H-14 with the HPS checkpoint.

    Args:
        model: the checkpoint file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``), a folder holding
            it, or a hub id (default ``xswu/HPSv2``).
        version: ``"v2.0"`` (what ``hpsv2.score`` uses by default) or ``"v2.1"``: which file to look for in a
            folder or hub repo.
        architecture: open_clip model name, or a config dict ``{"embed_dim", "vision_cfg", "text_cfg"}``
            (tests use a tiny one); HPS is ``ViT-H-14``.
        device, dtype, batch_size: where and in which precision the model runs; pairs per batch.
    """

    name = "hpsv2"

    def __init__(self, model: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16, version: str = "v2.0",
                 architecture: str | Mapping[str, Any] = HPS_ARCHITECTURE):
        import open_clip
        from accelerate import init_empty_weights

        if version not in HPS_FILES:
            raise ValueError(f"HPS version {version!r}: use one of {sorted(HPS_FILES)}.")
        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), dtype
        config = open_clip.get_model_config(architecture) if isinstance(architecture, str) else dict(architecture)
        if config is None:
            raise ValueError(f"Unknown open_clip architecture {architecture!r}.")
        path = resolve_weights_file(model, (HPS_FILES[version],), HPS_REPO, _hps_error(version))
        with init_empty_weights():  # parameters on meta: no random init of ~1B weights before loading them
            clip = open_clip.model.CLIP(**config)
        name = architecture if isinstance(architecture, str) else "custom"
        _load_exactly(clip, _load_state_dict(path), f"HPS ({name})", path)
        self.model = clip.to(self.device, dtype).requires_grad_(False).eval()
        self.image_size = int(config["vision_cfg"].get("image_size", 224))
        context_length = config["text_cfg"].get("context_length", 77)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """HPS of each (prompt, image) pair: float32 CPU tensor ``[N]``."""
        result = torch.empty(len(images), dtype=torch.float32)
        for start, batch_prompts, batch_images in _batches(prompts, images, self.batch_size):
            pixels = torch.stack([hps_preprocess(image, self.image_size) for image in batch_images])
            image_features = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)
            text_features = self.model.encode_text(self.tokenizer(batch_prompts).to(self.device), normalize=True)
            result[start:start + len(batch_images)] = (image_features.float() * text_features.float()).sum(-1).cpu()
        return result


# --------------------------------------------------------------------------- LAION aesthetic predictor


def _aesthetic_error(source: Any, problem: str) -> ScorerWeightsError:
    expected = (f"the aesthetic predictor MLP {AESTHETIC_FILES[0]} (TRL's copy on the hub: {AESTHETIC_REPO}/"
                f"{AESTHETIC_FILES[1]}), as a file path, a folder holding it, or a hub id.")
    return _file_error("LAION aesthetic", "aesthetic", source, problem, expected, AESTHETIC_REPO, AESTHETIC_FILES[1],
                       "models/aesthetic", extra=(f"    or: wget -P models/aesthetic {AESTHETIC_URL}",))


class AestheticScorer(CLIPEmbedder):
    """LAION aesthetic predictor v2: the MLP on the L2-normalised CLIP ViT-L/14 image embedding (the prompt is unused).

    Args:
        model: the MLP checkpoint (``sac+logos+ava1-l14-linearMSE.pth``), a folder holding it, or a hub id
            (default ``trl-lib/ddpo-aesthetic-predictor``).
        processor: the CLIP whose image embedding the MLP reads: a transformers CLIPModel folder or hub id
            (default ``openai/clip-vit-large-patch14``, the OpenAI ViT-L/14 of the reference; the same folder
            as the ``clip`` scorer's).
        device, dtype, batch_size: as for :class:`HPSv2Scorer`; the MLP runs in float32.
    """

    name = "aesthetic"

    def __init__(self, model: str | Path | None = None, processor: str | Path = DEFAULT_CLIP_MODEL,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16):
        check_batch_size(batch_size)
        path = resolve_weights_file(model, AESTHETIC_FILES, AESTHETIC_REPO, _aesthetic_error)
        state_dict = _load_state_dict(path)
        spec = WeightsSpec("LAION aesthetic (CLIP ViT-L/14)", DEFAULT_CLIP_MODEL, "models/clip/clip-vit-large-patch14",
                            DEFAULT_CLIP_MODEL, "models/clip/clip-vit-large-patch14",
                            model_filter=("--exclude", ("*.h5", "*.msgpack")))
        clip_model, clip_processor = load_clip(processor, processor, dtype, spec)
        super().__init__(clip_model, clip_processor, device, dtype, batch_size)
        width = int(clip_model.config.projection_dim)
        self.mlp = RewardMLP(width)
        _load_exactly(self.mlp, state_dict, f"aesthetic MLP (CLIP embedding width {width})", path)
        self.mlp = self.mlp.to(self.device, torch.float32).requires_grad_(False).eval()
        self.preprocess = clip_preprocess(int(clip_model.config.vision_config.image_size))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``[n, 768]`` after OpenAI CLIP's own ``preprocess``."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        features = projected(self.model.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """Aesthetic score of each image (its prompt is ignored): float32 CPU tensor ``[N]``."""
        result = torch.empty(len(images), dtype=torch.float32)
        for start, _, batch_images in _batches(prompts, images, self.batch_size):
            result[start:start + len(batch_images)] = self.mlp(self.embed_images(batch_images))[:, 0].cpu()
        return result


# --------------------------------------------------------------------------- ImageReward


def imagereward_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split and rename an ``ImageReward.pt`` state dict for transformers' BLIP: ``{"vision", "text", "mlp"}``.

    BLIP's ViT keys (``blip.visual_encoder.blocks.N.attn.qkv`` ...) become ``BlipVisionModel`` keys
    (``encoder.layers.N.self_attn.qkv`` ...), as transformers' own BLIP conversion script renames them;
    the text encoder's keys (``blip.text_encoder.*``, BLIP's ``med.py`` BERT) are already transformers'
    ``BlipTextModel`` names. ``blip.vision_proj`` / ``blip.text_proj`` (unused by the score) and the
    ``position_ids`` buffer are dropped.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name.startswith("blocks."):
                for old, new in BLIP_LAYER_NAMES:
                    name = name.replace(old, new, 1)
            else:
                name = next((new + name[len(old):] for old, new in BLIP_VISION_NAMES if name.startswith(old)), name)
            parts["vision"][name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["mlp"][key.removeprefix("mlp.")] = value
    return parts


def _imagereward_error(source: Any, problem: str) -> ScorerWeightsError:
    expected = (f"{IMAGEREWARD_FILE} (and optionally med_config.json beside it) as a file path, a folder holding "
                f"it, or the hub id {IMAGEREWARD_REPO}; plus a bert-base-uncased tokenizer (processor=).")
    return _file_error("ImageReward", "imagereward", source, problem, expected, IMAGEREWARD_REPO, IMAGEREWARD_FILE,
                       "models/imagereward")


def _bert_tokenizer(source: str | Path):
    """BLIP's ``init_tokenizer``: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``.

    Raises :class:`ScorerWeightsError` when the tokenizer cannot be loaded.
    """
    from transformers import BertTokenizer

    folder = "models/bert-base-uncased"
    help_text = "\n".join([
        f"ImageReward: cannot load the bert-base-uncased tokenizer from {str(source)!r}.", "",
        "Expected: a folder with tokenizer.json or vocab.txt (+ tokenizer_config.json), or a hub id.",
        "Fetch it once on a machine with internet access:",
        download_help(IMAGEREWARD_TOKENIZER, folder, "--include", ("*.json", "*.txt")), "",
        f"then point hgdpo at it: processor={folder!r} (trainer/evaluate.py: --metric-processor imagereward={folder}).",
    ])
    if is_local(source) and not Path(source).expanduser().is_dir():
        raise ScorerWeightsError(help_text)
    try:
        tokenizer = BertTokenizer.from_pretrained(str(Path(source).expanduser()) if is_local(source) else str(source))
    except (OSError, ValueError) as failure:
        raise ScorerWeightsError(help_text) from failure
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer:
    """ImageReward v1.0: BLIP image-text cross-attention, ``[CLS]`` feature, linear MLP, fixed standardisation.

    Args:
        model: ``ImageReward.pt`` (a file, a folder holding it and optionally ``med_config.json``, or a hub id;
            default ``THUDM/ImageReward``).
        processor: the ``bert-base-uncased`` tokenizer (folder or hub id; default ``google-bert/bert-base-uncased``).
        vision_config: BLIP ViT settings (default: ViT-L/16 at 224 px, as ImageReward; tests pass a tiny one).
        device, dtype, batch_size: as for :class:`HPSv2Scorer`; the MLP runs in float32.
    """

    name = "imagereward"

    def __init__(self, model: str | Path | None = None, processor: str | Path = IMAGEREWARD_TOKENIZER,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16,
                 vision_config: Mapping[str, Any] | None = None):
        from accelerate import init_empty_weights
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), dtype
        path = resolve_weights_file(model, (IMAGEREWARD_FILE,), IMAGEREWARD_REPO, _imagereward_error)
        self.tokenizer = _bert_tokenizer(processor)
        vision = BlipVisionConfig(**{**BLIP_VIT_LARGE, **(vision_config or {})})
        med = dict(BLIP_MED_CONFIG)
        if (path.parent / "med_config.json").is_file():
            given = json.loads((path.parent / "med_config.json").read_text())
            med.update({key: value for key, value in given.items() if key in BLIP_MED_CONFIG})
        text = BlipTextConfig(**med, encoder_hidden_size=vision.hidden_size, is_decoder=True,
                              bos_token_id=None, sep_token_id=None)
        parts = imagereward_state_dict(_load_state_dict(path))
        with init_empty_weights():
            self.vision = BlipVisionModel(vision)
            self.text = BlipTextModel(text, add_pooling_layer=False)
            self.mlp = RewardMLP(text.hidden_size)
        for what, module in (("vision", self.vision), ("text", self.text), ("mlp", self.mlp)):
            _load_exactly(module, parts[what], f"ImageReward ({what} part)", path)
        self.vision = self.vision.to(self.device, dtype).requires_grad_(False).eval()
        self.text = self.text.to(self.device, dtype).requires_grad_(False).eval()
        self.mlp = self.mlp.to(self.device, torch.float32).requires_grad_(False).eval()
        self.preprocess = clip_preprocess(vision.image_size)

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        """ImageReward of each (prompt, image) pair: float32 CPU tensor ``[N]``."""
        result = torch.empty(len(images), dtype=torch.float32)
        for start, batch_prompts, batch_images in _batches(prompts, images, self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in batch_images]).to(self.device, self.dtype)
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state
            tokens = self.tokenizer(batch_prompts, padding="max_length", truncation=True,
                                    max_length=IMAGEREWARD_TEXT_LENGTH, return_tensors="pt").to(self.device)
            hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               encoder_hidden_states=image_embeds,
                               encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long,
                                                                 device=self.device)).last_hidden_state
            rewards = (self.mlp(hidden[:, 0, :].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
            result[start:start + len(batch_images)] = rewards[:, 0].cpu()
        return result
