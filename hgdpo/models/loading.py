"""Loading an SD1.5-family model the way users have it.

One entry point, :func:`load_sd15`, accepts

* a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` ...),
* a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (needs network access once),
* a single-file checkpoint (``.safetensors``, or ``.ckpt`` read with ``weights_only=True``) as shared
  on Civitai, loaded fully offline: the SD1.5 component configs ship in ``hgdpo/configs/sd15`` and the
  CLIP tokenizer is built from the BPE vocabulary that ships inside ``open_clip``.

Checkpoints of other families (SDXL, SD2.x, inpainting, a LoRA passed as a model ...) are refused with
an error that names what was found.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from hgdpo.fileio import atomic_write_text, cache_root
from hgdpo.safe_load import load_pickle

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # precision names of every frontend
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_HELP = "Model precision (auto: fp16 on CUDA, fp32 elsewhere)."
DEVICE_HELP = "Device, e.g. cuda:0 or cpu (default: the accelerator)."
CONFIG_DIR_HELP = "Diffusers-layout config folder for a single-file --model (default: the bundled SD1.5 configs)."


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere; otherwise the named precision."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]

SD15_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."


class ModelFamilyError(ValueError):
    """The given model is not an SD1.5-family text-to-image model."""


@dataclass
class SD15Components:
    """The parts of an SD1.5 model that training and sampling need."""

    unet: "UNet2DConditionModel"  # noqa: F821
    vae: "AutoencoderKL"  # noqa: F821
    text_encoder: "CLIPTextModel"  # noqa: F821
    tokenizer: "CLIPTokenizer"  # noqa: F821
    noise_scheduler: "DDPMScheduler"  # noqa: F821
    source: str

    def pipeline(self, scheduler=None):
        """A diffusers ``StableDiffusionPipeline`` sharing these modules (DPM-Solver++ by default)."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        if scheduler is None:
            scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table used by the BPE vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP ViT-L/14 tokenizer of SD1.5, built offline from open_clip's BPE file.

    The vocabulary is the one of ``openai/clip-vit-large-patch14``: 256 byte tokens, their ``</w>``
    variants, 48,894 merges and the two special tokens (49,408 entries).
    """
    from transformers import CLIPTokenizer

    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    target = cache_root() / "clip-vit-large-patch14-tokenizer"
    vocab_file, merges_file = target / "vocab.json", target / "merges.txt"
    if not (vocab_file.exists() and merges_file.exists()):
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        byte_tokens = list(_bytes_to_unicode().values())
        vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
        vocab += ["".join(merge.split()) for merge in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(vocab_file, json.dumps({token: i for i, token in enumerate(vocab)}))
        atomic_write_text(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77
    )


# --------------------------------------------------------------------------- single files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: safetensors directly, pickles only with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable .safetensors file ({error}).") from error
    try:
        state = load_pickle(path, mmap=True)
    except ValueError:  # refused by load_pickle: its message says why
        raise
    except Exception as error:
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True): {error}. Pickled "
            "checkpoints that need arbitrary code are refused for safety; convert it to .safetensors."
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return state


def detect_checkpoint_family(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the model family of a single-file checkpoint from its keys and shapes.

    Returns one of ``sd1``, ``sd1-inpainting``, ``sd1-instruct-pix2pix``, ``sd2``, ``sdxl``,
    ``sdxl-refiner``, ``lora``, ``unet-only``, ``unknown``.
    """
    keys = state_dict.keys()
    if any(key.startswith(("lora_unet_", "lora_te", "lora_unet.")) for key in keys) or any(
        ".lora_down." in key or ".lora_A." in key for key in keys
    ):
        return "lora"
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        return "sdxl-refiner"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    first_conv = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first_conv is None:
        return "unknown"
    if not any(key.startswith(TEXT_ENCODER_PREFIX) for key in keys):
        return "unet-only"
    in_channels = first_conv.shape[1]
    return {4: "sd1", 9: "sd1-inpainting", 8: "sd1-instruct-pix2pix"}.get(in_channels, "unknown")


_FAMILY_ADVICE = {
    "sdxl": "an SDXL checkpoint",
    "sdxl-refiner": "an SDXL refiner checkpoint",
    "sd2": "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)",
    "sd1-inpainting": "an SD1.x inpainting checkpoint (9 UNet input channels)",
    "sd1-instruct-pix2pix": "an InstructPix2Pix checkpoint (8 UNet input channels)",
    "lora": "a LoRA file, not a base model (pass the base checkpoint as the model, the LoRA elsewhere)",
    "unet-only": "a UNet-only file without text encoder and VAE",
    "unknown": "a file whose keys match no Stable Diffusion checkpoint layout",
}


def _refuse_family(family: str, source: str | Path) -> None:
    if family != "sd1":
        raise ModelFamilyError(
            f"{source} is {_FAMILY_ADVICE[family]}. HG-DPO here trains SD1.5-family text-to-image "
            "models: pass an SD1.5 (or SD1.5 fine-tune) checkpoint, diffusers folder or hub id."
        )


def _text_encoder_from_state_dict(state_dict: dict[str, torch.Tensor], config_dir: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = {
        key[len(TEXT_ENCODER_PREFIX) :]: value
        for key, value in state_dict.items()
        if key.startswith(TEXT_ENCODER_PREFIX)
    }
    # checkpoints say text_model.*, except very old ones; transformers 5 names its keys without it
    weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    weights.pop("embeddings.position_ids", None)
    config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder")
    model = CLIPTextModel(config)
    if any(key.startswith("text_model.") for key in model.state_dict()):  # transformers 4 layout
        weights = {f"text_model.{key}": value for key, value in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelFamilyError(
            f"The checkpoint's text encoder does not match the SD1.5 CLIP text model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    return model


def _load_single_file(path: Path, config_dir: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    state_dict = read_state_dict(path)
    _refuse_family(detect_checkpoint_family(state_dict), path)
    if not any(key.startswith(VAE_PREFIX) for key in state_dict):
        raise ModelFamilyError(f"{path} holds no VAE weights ('{VAE_PREFIX}*'); bake a VAE in first.")
    config = str(config_dir)
    unet = UNet2DConditionModel.from_single_file(
        state_dict, config=config, subfolder="unet", local_files_only=True
    )
    vae = AutoencoderKL.from_single_file(state_dict, config=config, subfolder="vae", local_files_only=True)
    return {"unet": unet, "vae": vae, "text_encoder": _text_encoder_from_state_dict(state_dict, config_dir)}


# --------------------------------------------------------------------------- folders and hub ids


def _check_diffusers_configs(source: str, unet_config: dict, text_config) -> None:
    """Refuse SDXL, SD2.x and inpainting folders; accept SD1.x-structured models of any width."""
    if text_config.model_type != "clip_text_model":
        raise ModelFamilyError(f"{source}: text encoder is {text_config.model_type}, not SD1.5's CLIP.")
    context_dim = unet_config.get("cross_attention_dim")
    if unet_config.get("addition_embed_type") == "text_time":
        _refuse_family("sdxl", source)
    if context_dim == 1024:
        _refuse_family("sd2", source)
    in_channels = unet_config.get("in_channels")
    if in_channels in (8, 9):
        _refuse_family({9: "sd1-inpainting", 8: "sd1-instruct-pix2pix"}[in_channels], source)
    if context_dim != text_config.hidden_size or in_channels != 4:
        raise ModelFamilyError(
            f"{source}: UNet with cross_attention_dim={context_dim}, in_channels={in_channels} and a "
            f"{text_config.hidden_size}-wide text encoder is not an SD1.5-family model."
        )


def _load_pretrained(source: str, local_files_only: bool | None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    options = {"local_files_only": local_files_only} if local_files_only is not None else {}
    if Path(source).is_dir() and (Path(source) / "text_encoder_2").exists():
        _refuse_family("sdxl", source)
    unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **options)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **options)
    _check_diffusers_configs(source, unet_config, text_encoder.config)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **options)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **options)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def _tokenizer_for(source: str, local_files_only: bool | None):
    """The model's own tokenizer when it ships one, else the offline-built CLIP tokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(source) / "tokenizer"
    if folder.is_dir():
        return CLIPTokenizer.from_pretrained(folder)
    if not Path(source).exists() and not local_files_only:
        try:
            return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        except OSError:
            logger.info("No tokenizer found for %s; using the built-in CLIP tokenizer.", source)
    return clip_tokenizer()


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name``: one slash, not a path, no checkpoint file suffix."""
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and not source.endswith(SINGLE_FILE_SUFFIXES)
    )


def load_sd15(
    source: str | Path,
    *,
    config_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> SD15Components:
    """Load an SD1.5-family model (fp32, eval mode, on the CPU) from a file, a folder or a hub id.

    Args:
        source: single-file checkpoint, diffusers folder, or hub id.
        config_dir: diffusers-layout folder of component configs used for single files
            (default: the bundled SD1.5 configs).
        local_files_only: passed to diffusers/transformers for folders and hub ids.
    """
    from diffusers import DDPMScheduler

    source = str(source)
    path = Path(source).expanduser()
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path}: expected a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint file.")
        modules = _load_single_file(path, config_dir)
        tokenizer = clip_tokenizer()
        scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler")
    elif path.is_dir() or _looks_like_hub_id(source):
        if path.is_dir() and not (path / "unet").is_dir():
            raise ValueError(
                f"{path} is a folder but not a diffusers model folder (no unet/ inside). Pass a "
                "diffusers folder, a single-file checkpoint or a hub id."
            )
        try:
            modules = _load_pretrained(str(path) if path.is_dir() else source, local_files_only)
        except OSError as error:  # hub id not found, offline, or an incomplete folder
            raise FileNotFoundError(
                f"Could not load {source!r}: {error}. Check the hub id and the network (downloads need to be "
                "online once), or pass a local single-file checkpoint or diffusers folder."
            ) from error
        tokenizer = _tokenizer_for(str(path) if path.is_dir() else source, local_files_only)
        scheduler_source = str(path) if path.is_dir() else source
        options = {"local_files_only": local_files_only} if local_files_only is not None else {}
        scheduler = DDPMScheduler.from_pretrained(scheduler_source, subfolder="scheduler", **options)
    else:
        raise FileNotFoundError(
            f"Model {source!r} not found: give a .safetensors/.ckpt file, a diffusers folder, or a "
            "hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    for module in modules.values():
        module.requires_grad_(False).eval()
    return SD15Components(tokenizer=tokenizer, noise_scheduler=scheduler, source=source, **modules)


# --------------------------------------------------------------------------- identity


def model_fingerprint(source: str | Path) -> str:
    """Cheap identity of a model source for cache keys: path, size and mtime of its weight files."""
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    digest = hashlib.sha256(str(source).encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: str | Path, chunk_size: int = 1 << 24) -> str:
    """Full SHA-256 of a file (its first 10 hex digits are the WebUI/Civitai "AutoV2" hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
