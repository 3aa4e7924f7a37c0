"""Loading SD1.5- and SDXL-family models the way users have them.

One entry point, :func:`load_model` (and :func:`load_sd15` for SD1.5 only), accepts

* a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` ...),
* a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (needs network access once),
* a single-file checkpoint (``.safetensors``, or ``.ckpt`` read with ``weights_only=True``) as shared
  on Civitai, loaded fully offline: each family's component configs ship in ``hgdpo/models/configs``
  (:mod:`hgdpo.models.families`) and the CLIP tokenizers are built from the BPE vocabulary that ships
  inside ``open_clip``.

The family (and, for single files, the prediction type) is read from the model itself; other families
(SDXL refiner, SD2.x, SD3, Flux, inpainting, a LoRA passed as a model ...) are refused with an error
that names what was found.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch

from hgdpo.fileio import atomic_write_text, cache_root
from hgdpo.models.families import (  # noqa: F401  (ModelFamilyError, detect_checkpoint_family: public here too)
    CLIP_PAD,
    PREDICTION_HINT,
    SD15,
    SDXL,
    UNET_PREFIX,
    VAE_PREFIX,
    Conditioning,
    ModelFamily,
    ModelFamilyError,
    Prediction,
    TextEncoderSlot,
    detect_checkpoint_family,
    detect_prediction,
    family_of_checkpoint,
    family_of_unet_config,
    get_family,
)
from hgdpo.options import option
from hgdpo.safe_load import load_pickle

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # precision names of every frontend
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_HELP = "Model precision (auto: fp16 on CUDA, fp32 elsewhere)."
DEVICE_HELP = "Device, e.g. cuda:0 or cpu (default: the accelerator)."
CONFIG_DIR_HELP = "Diffusers-layout config folder for a single-file --model (default: the bundled configs of its family)."


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere; otherwise the named precision."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]

SD15_CONFIG_DIR = SD15.config_dir
SDXL_CONFIG_DIR = SDXL.config_dir
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TEXT_ENCODER_PREFIX = SD15.text_encoders[0].ldm_prefix


@dataclass
class SD15Components:
    """The parts of an SD1.5 model that training and sampling need."""

    unet: "UNet2DConditionModel"  # noqa: F821
    vae: "AutoencoderKL"  # noqa: F821
    text_encoder: "CLIPTextModel"  # noqa: F821
    tokenizer: "CLIPTokenizer"  # noqa: F821
    noise_scheduler: "DDPMScheduler"  # noqa: F821
    source: str
    family = SD15

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer,)

    @property
    def text_encoder_modules(self) -> tuple:
        return (self.text_encoder,)

    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The prompts as UNet conditioning (:meth:`hgdpo.models.families.ModelFamily.encode_prompts`)."""
        if any(next(module.parameters()).is_meta for module in self.text_encoder_modules):
            raise RuntimeError("The text encoders were released (release_text_encoders); load the model again.")
        return self.family.encode_prompts(prompts, self.tokenizers, self.text_encoder_modules, size)

    def release_text_encoders(self) -> None:
        """Free the text encoders' weights (SDXL: 3.3 GB in float32) once every prompt is encoded; afterwards
        :meth:`encode_prompts` refuses with one line."""
        for module in self.text_encoder_modules:
            module.to("meta")

    def pipeline(self, scheduler=None):
        """A diffusers ``StableDiffusionPipeline`` sharing these modules (DPM-Solver++ by default)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self._sampling_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def _sampling_scheduler(self, scheduler):
        from diffusers import DPMSolverMultistepScheduler

        return scheduler if scheduler is not None else DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)


@dataclass
class SDXLComponents(SD15Components):
    """An SDXL base model: SD1.5's parts plus the second text encoder (OpenCLIP bigG) and its tokenizer."""

    text_encoder_2: "CLIPTextModelWithProjection" = None  # noqa: F821
    tokenizer_2: "CLIPTokenizer" = None  # noqa: F821
    family = SDXL

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoder_modules(self) -> tuple:
        return (self.text_encoder, self.text_encoder_2)

    def pipeline(self, scheduler=None):
        """A diffusers ``StableDiffusionXLPipeline`` sharing these modules (DPM-Solver++ by default)."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=self._sampling_scheduler(scheduler),
        )


_COMPONENTS = {SD15.name: SD15Components, SDXL.name: SDXLComponents}


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


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = CLIP_PAD):
    """The CLIP ViT-L/14 tokenizer of SD1.5, built offline from open_clip's BPE file.

    The vocabulary is the one of ``openai/clip-vit-large-patch14``: 256 byte tokens, their ``</w>``
    variants, 48,894 merges and the two special tokens (49,408 entries). SDXL's second tokenizer (for
    OpenCLIP bigG) is the same BPE padding with ``"!"`` (id 0) instead of ``<|endoftext|>``.
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
        str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77
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


def read_metadata(path: str | Path) -> dict[str, str]:
    """A ``.safetensors`` file's header metadata (empty for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _text_encoder_from_state_dict(state_dict: dict[str, torch.Tensor], slot: TextEncoderSlot, config_dir: Path):
    """One text encoder of a single file, loaded strictly (a missing or stray key is an error)."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    model_class = getattr(transformers, slot.model_class)
    model = model_class(transformers.CLIPTextConfig.from_pretrained(config_dir / slot.subfolder))
    if slot.layout == "open_clip":
        weights = convert_open_clip_checkpoint(model, state_dict, prefix=slot.ldm_prefix)
    else:
        weights = {key[len(slot.ldm_prefix):]: value for key, value in state_dict.items()
                   if key.startswith(slot.ldm_prefix)}
    # checkpoints say text_model.*, except very old ones; transformers 5 names CLIPTextModel's keys without it
    weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    weights = {key: value for key, value in weights.items() if not key.endswith("position_ids")}
    own = model.state_dict()
    weights = {(f"text_model.{key}" if f"text_model.{key}" in own else key): value for key, value in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelFamilyError(
            f"The checkpoint's text encoder at '{slot.ldm_prefix}' does not match {slot.model_class} "
            f"({config_dir / slot.subfolder}): missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    return model


def _load_single_file(state_dict: dict[str, torch.Tensor], path: Path, family: ModelFamily, config_dir: Path,
                      unet_dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not any(key.startswith(VAE_PREFIX) for key in state_dict):
        raise ModelFamilyError(f"{path} holds no VAE weights ('{VAE_PREFIX}*'); bake a VAE in first.")
    config = str(config_dir)
    try:
        unet = UNet2DConditionModel.from_single_file(
            state_dict, config=config, subfolder="unet", local_files_only=True, torch_dtype=unet_dtype
        )
        vae = AutoencoderKL.from_single_file(state_dict, config=config, subfolder="vae", local_files_only=True)
    except (KeyError, RuntimeError, ValueError) as error:  # a key the family has is missing, or a shape differs
        raise ModelFamilyError(
            f"{path} has the keys of an {family.label} checkpoint, but its UNet/VAE weights do not fit the "
            f"{family.label} configs in {config_dir} ({type(error).__name__}: {error}). The file is incomplete or "
            "not a base model; for a differently sized model pass its configs with --model-config-dir."
        ) from error
    modules = {"unet": unet, "vae": vae}
    for slot in family.text_encoders:
        modules[slot.subfolder] = _text_encoder_from_state_dict(state_dict, slot, config_dir)
    return modules


def _file_prediction(state_dict: dict[str, torch.Tensor], path: Path) -> Prediction | None:
    """The file's declared prediction type; None (the config's scheduler decides) when undeclared."""
    declared = detect_prediction(state_dict, read_metadata(path))
    if declared is None:
        logger.info("%s declares no prediction type: using the config's scheduler. %s", path, PREDICTION_HINT)
    return declared


# --------------------------------------------------------------------------- folders and hub ids


def _load_pretrained(source: str, wanted: ModelFamily | None, options: dict,
                     unet_dtype: torch.dtype) -> tuple[ModelFamily, dict]:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **options)
    family = family_of_unet_config(unet_config, source, wanted)
    modules = {}
    for slot in family.text_encoders:
        model_class = getattr(transformers, slot.model_class)
        modules[slot.subfolder] = model_class.from_pretrained(source, subfolder=slot.subfolder, **options)
        if modules[slot.subfolder].config.model_type != "clip_text_model":
            raise ModelFamilyError(
                f"{source}: {slot.subfolder} is {modules[slot.subfolder].config.model_type}, not {family.label}'s CLIP."
            )
    context_dim = sum(modules[slot.subfolder].config.hidden_size for slot in family.text_encoders)
    if unet_config.get("cross_attention_dim") != context_dim:
        raise ModelFamilyError(
            f"{source}: UNet with cross_attention_dim={unet_config.get('cross_attention_dim')} does not fit its "
            f"text encoders ({context_dim} channels together): not an {family.label}-family model."
        )
    modules["unet"] = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=unet_dtype,
                                                           **options)
    modules["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", **options)
    return family, modules


def _tokenizer_for(source: str, slot: TextEncoderSlot, local_files_only: bool | None):
    """The model's own tokenizer when it ships one, else the offline-built CLIP tokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(source) / slot.tokenizer_subfolder
    if folder.is_dir():
        return CLIPTokenizer.from_pretrained(folder)
    if not Path(source).exists() and not local_files_only:
        try:
            return CLIPTokenizer.from_pretrained(source, subfolder=slot.tokenizer_subfolder)
        except OSError:
            logger.info("No %s found for %s; using the built-in CLIP tokenizer.", slot.tokenizer_subfolder, source)
    return clip_tokenizer(slot.pad_token)


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name``: one slash, not a path, no checkpoint file suffix."""
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and not source.endswith(SINGLE_FILE_SUFFIXES)
    )


def load_model(
    source: str | Path,
    *,
    family: str | ModelFamily | None = None,
    config_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
    unet_dtype: torch.dtype = torch.float32,
) -> SD15Components:
    """Load an SD1.5- or SDXL-family model (eval mode, on the CPU) from a file, a folder or a hub id.

    Returns :class:`SD15Components` or :class:`SDXLComponents` (``.family`` says which).

    Args:
        source: single-file checkpoint, diffusers folder, or hub id.
        family: ``"sd15"``/``"sdxl"`` to accept only that family (default: whichever the model is).
        config_dir: diffusers-layout folder of component configs used for single files
            (default: the bundled configs of the detected family).
        local_files_only: passed to diffusers/transformers for folders and hub ids.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``, overriding what the model declares (a
            single file's ``v_pred`` marker or ``modelspec.prediction_type``, a folder's scheduler config).
        zero_terminal_snr: force zero-terminal-SNR betas on or off (default: as declared).
        unet_dtype: the UNet's weights are built in this dtype (the VAE and text encoders in float32). The
            trainer loads its frozen UNet in the training dtype so, with no float32 UNet to cast (with the text
            encoders released after encoding: 2.7 GiB less peak RSS on SDXL, see bench/README.md).
    """
    from diffusers import DDPMScheduler

    wanted = get_family(family) if family is not None else None
    source = str(source)
    path = Path(source).expanduser()
    options = {"local_files_only": local_files_only} if local_files_only is not None else {}
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path}: expected a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint file.")
        state_dict = read_state_dict(path)
        found = family_of_checkpoint(detect_checkpoint_family(state_dict), path, wanted)
        folder = Path(config_dir) if config_dir is not None else found.config_dir
        modules = _load_single_file(state_dict, path, found, folder, unet_dtype)
        tokenizers = {slot.tokenizer_subfolder: clip_tokenizer(slot.pad_token) for slot in found.text_encoders}
        prediction = _file_prediction(state_dict, path)
        scheduler_source, scheduler_options = folder, {}
    elif path.is_dir() or _looks_like_hub_id(source):
        if path.is_dir() and not (path / "unet").is_dir():
            raise ValueError(
                f"{path} is a folder but not a diffusers model folder (no unet/ inside). Pass a "
                "diffusers folder, a single-file checkpoint or a hub id."
            )
        name = str(path) if path.is_dir() else source
        try:
            found, modules = _load_pretrained(name, wanted, options, unet_dtype)
        except OSError as error:  # hub id not found, offline, or an incomplete folder
            raise FileNotFoundError(
                f"Could not load {source!r}: {error}. Check the hub id and the network (downloads need to be "
                "online once), or pass a local single-file checkpoint or diffusers folder."
            ) from error
        tokenizers = {slot.tokenizer_subfolder: _tokenizer_for(name, slot, local_files_only)
                      for slot in found.text_encoders}
        prediction, scheduler_source, scheduler_options = None, name, options
    else:
        raise FileNotFoundError(
            f"Model {source!r} not found: give a .safetensors/.ckpt file, a diffusers folder, or a "
            "hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    overrides = prediction.scheduler_overrides() if prediction is not None else {}
    if prediction_type is not None:
        overrides["prediction_type"] = Prediction(prediction_type).type
    if zero_terminal_snr is not None:
        overrides["rescale_betas_zero_snr"] = zero_terminal_snr
    scheduler = DDPMScheduler.from_pretrained(scheduler_source, subfolder="scheduler", **scheduler_options, **overrides)
    for module in modules.values():
        module.requires_grad_(False).eval()
    return _COMPONENTS[found.name](noise_scheduler=scheduler, source=source, **tokenizers, **modules)


def load_sd15(
    source: str | Path,
    *,
    config_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> SD15Components:
    """Load an SD1.5-family model (fp32, eval mode, on the CPU) from a file, a folder or a hub id.

    Other families, SDXL included, are refused (:func:`load_model` loads SDXL too).

    Args:
        source: single-file checkpoint, diffusers folder, or hub id.
        config_dir: diffusers-layout folder of component configs used for single files
            (default: the bundled SD1.5 configs).
        local_files_only: passed to diffusers/transformers for folders and hub ids.
    """
    return load_model(source, family=SD15, config_dir=config_dir, local_files_only=local_files_only)


# --------------------------------------------------------------------------- the model options of every command


def peek_family(source: str | Path) -> ModelFamily | None:
    """A model's family read cheaply, before any weights load: a ``.safetensors`` file's header or a diffusers
    folder's ``unet/config.json`` (None for hub ids and pickles). Refused kinds raise :class:`ModelFamilyError`."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                first_conv = UNET_PREFIX + "input_blocks.0.0.weight"
                header = {key: None for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
                if first_conv in header:
                    header[first_conv] = SimpleNamespace(shape=handle.get_slice(first_conv).get_shape())
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable .safetensors file ({error}).") from error
        return family_of_checkpoint(detect_checkpoint_family(header), path)
    config = path / "unet" / "config.json"
    if path.is_dir() and config.is_file():
        return family_of_unet_config(json.loads(config.read_text()), path)
    return None


TRISTATE = {"auto": None, "on": True, "off": False}


@dataclass
class ModelOptions:
    """How to read the model: the prediction type and the resolution check, shared by every command."""

    prediction_type: str = option(
        "auto", "What the UNet predicts: auto (as the model declares; single files without a marker: epsilon), "
                "epsilon, or v_prediction (force it for a v-pred file without its marker, e.g. some NoobAI-XL "
                "V-Pred merges).", ("auto", "epsilon", "v_prediction"))
    zero_terminal_snr: str = option(
        "auto", "Zero-terminal-SNR noise schedule: auto (as declared), on (v-pred ZTSNR models such as NoobAI-XL "
                "V-Pred) or off.", tuple(TRISTATE))
    any_resolution: bool = option(
        False, "Allow a resolution far from the model family's buckets (SDXL: about 1024x1024 pixels).")

    def check_size(self, family: ModelFamily, size: tuple[int, int] | None) -> None:
        """Refuse a (width, height) that does not suit ``family`` (unless ``any_resolution``)."""
        problem = family.resolution_problem(*size) if size is not None else None
        if problem and not (self.any_resolution and size[0] % 8 == 0 and size[1] % 8 == 0):
            raise ValueError(f"{problem} Pass --resolution (or --width/--height) of a bucket, or --any-resolution "
                             "to use this size anyway.")

    def check_source(self, source: str | Path, size: tuple[int, int] | None) -> None:
        """Refuse a model of a refused kind, or a size that does not suit its family, from the file's header
        alone (nothing loads; hub ids and pickles are checked once loaded)."""
        family = peek_family(source)
        if family is not None:
            self.check_size(family, size)

    def load(self, source: str | Path, config_dir: str | Path | None = None, size: tuple[int, int] | None = None,
             unet_dtype: torch.dtype = torch.float32) -> SD15Components:
        """:func:`load_model` with these options; ``size`` is checked against the family before and after loading."""
        self.check_source(source, size)
        components = load_model(
            source, config_dir=config_dir,
            prediction_type=None if self.prediction_type == "auto" else self.prediction_type,
            zero_terminal_snr=TRISTATE[self.zero_terminal_snr], unet_dtype=unet_dtype,
        )
        self.check_size(components.family, size)
        return components


def family_size(resolution: tuple[int, int] | None, family: ModelFamily) -> tuple[int, int]:
    """``resolution`` (width, height), or the family's default square when it is None ("auto")."""
    return resolution if resolution is not None else (family.default_resolution, family.default_resolution)


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
