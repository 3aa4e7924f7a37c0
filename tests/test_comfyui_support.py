"""Shared setup of the ComfyUI tests (``test_comfyui_nodes.py``, ``test_comfyui_server.py``); holds no tests.

A real ComfyUI cannot be downloaded in CI, so these tests run against a ComfyUI checkout named by an
environment variable and are skipped, with that reason, without it::

    HGDPO_COMFYUI_DIR=/path/to/ComfyUI HGDPO_COMFYUI_PYTHON=/path/to/comfy-venv/bin/python \\
        /path/to/comfy-venv/bin/python -m pytest tests/test_comfyui_nodes.py tests/test_comfyui_server.py

* ``HGDPO_COMFYUI_DIR``: the ComfyUI folder (``main.py``, ``comfy/``); tested with ComfyUI 0.3.64 and 0.33.0.
* ``HGDPO_COMFYUI_PYTHON``: the interpreter with ComfyUI's requirements (and hgdpo's) that runs the server
  (default: the one running pytest). The node-level tests import ComfyUI into the test process, so run
  pytest itself with that interpreter.
* ``HGDPO_SDXL_CHECKPOINT`` (optional): a full-size SDXL base single file with random weights, for the SDXL
  tests (skipped without it). ComfyUI detects SDXL from the real shapes, so a tiny SDXL does not load; make
  it once (about 7 GB, 80 s, 7 GB of RAM) with ``python -c "from tests.sdxl_factory import
  save_full_size_single_file as s; s('sdxl-full-random.safetensors')"``. ``HGDPO_SDXL_VPRED_CHECKPOINT``
  (optional): the same with NoobAI's v-prediction markers (``prediction=Prediction('v_prediction', True)``).
  The SDXL tests load the UNet in fp16 (``--fp16-unet``; ComfyUI computes in fp32 on the CPU), at most two
  at a time: about 14 GB of RAM.

Nothing here writes into the ComfyUI folder: every test gets its own ``--base-directory`` (models,
custom_nodes with this repository linked in, input, output, user).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "example_workflows"
COMFY_DIR_VARIABLE = "HGDPO_COMFYUI_DIR"
PYTHON_VARIABLE = "HGDPO_COMFYUI_PYTHON"
PACK_NAME = "hgdpo"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
LORA = "hgdpo_lora.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_LORA = "hgdpo_sdxl_lora.safetensors"
SDXL_TE_LORA = "hgdpo_sdxl_te_lora.safetensors"
SDXL_VARIABLE = "HGDPO_SDXL_CHECKPOINT"
SDXL_VPRED_VARIABLE = "HGDPO_SDXL_VPRED_CHECKPOINT"
PICKSCORE_MODEL = "PickScore_v1"
PICKSCORE_PROCESSOR = "CLIP-ViT-H-14-laion2B-s32B-b79K"
NODE_IDS = ("HGDPOLoraLoader", "HGDPOLANGuider", "HGDPOLANKSampler", "HGDPOPickScoreLoader", "HGDPOPickScoreBestOfN")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def comfy_dir() -> Path:
    """The ComfyUI checkout of ``HGDPO_COMFYUI_DIR``, or a pytest skip that says how to run these tests."""
    value = os.environ.get(COMFY_DIR_VARIABLE)
    if not value:
        pytest.skip(f"ComfyUI tests need a ComfyUI checkout: set {COMFY_DIR_VARIABLE} (and {PYTHON_VARIABLE}, the "
                    "python with ComfyUI's requirements); see tests/test_comfyui_support.py.")
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        pytest.skip(f"{COMFY_DIR_VARIABLE}={value} is not a ComfyUI folder (no main.py / comfy/).")
    return path


def comfy_python() -> str:
    return os.environ.get(PYTHON_VARIABLE) or sys.executable


def comfy_version(path: Path) -> str:
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def sdxl_checkpoint(variable: str = SDXL_VARIABLE) -> Path:
    """The full-size SDXL file an environment variable names, or a pytest skip that says how to make one."""
    value = os.environ.get(variable)
    if not value or not Path(value).is_file():
        pytest.skip(f"SDXL host tests need a full-size SDXL single file: set {variable} (see "
                    "tests/test_comfyui_support.py; tests.sdxl_factory.save_full_size_single_file writes one).")
    return Path(value).resolve()


def is_sdxl_workflow(prompt: dict) -> bool:
    """An API prompt that loads the SDXL checkpoint (it runs only where an SDXL file is given)."""
    return any(node["inputs"].get("ckpt_name") == SDXL_CHECKPOINT for node in prompt.values())


# --------------------------------------------------------------------------- models


def slim_sd15_configs() -> dict:
    """SD1.5 that ComfyUI detects as SD15 (320 channels, 768-wide cross-attention, the full CLIP-L and VAE),
    with a two-level UNet of one layer per block: the node tests' fast stand-in for the full architecture."""
    from hgdpo.models.tiny import sd15_configs

    configs = sd15_configs()
    configs["unet"].update(block_out_channels=[320, 640], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1)
    return configs


def write_checkpoint(folder: Path, configs: dict, seed: int = 0, lora_std: float = 0.05) -> tuple[Path, Path]:
    """A random-weight single-file checkpoint (fp16, LDM keys) and an HG-DPO LoRA for it (written by hgdpo's
    kohya writer, with random up weights so that it has an effect)."""
    from hgdpo.models.tiny import build_models
    from tests.sd15_factory import save_random_lora, save_single_file

    folder.mkdir(parents=True, exist_ok=True)
    models = build_models(configs, seed=seed)
    checkpoint = save_single_file(models, folder / CHECKPOINT, dtype=torch.float16)
    lora = save_random_lora(models["unet"], folder / LORA, std=lora_std, seed=seed + 1)
    del models
    return checkpoint, lora


def assert_finite_file(path: Path) -> None:
    """No NaN/inf in any tensor of a safetensors file (a NaN text encoder makes black images)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path.name}: {key} holds NaN/inf"


def save_slim_sd2_unet(path: Path) -> Path:
    """A UNet of another family (SD2.x: 1024-wide cross-attention, linear proj_in) in LDM keys, for UNETLoader."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from hgdpo.models.tiny import randomize_parameters
    from tests.sd15_factory import unet_to_ldm

    config = {key: value for key, value in slim_sd15_configs()["unet"].items() if not key.startswith("_")}
    config.update(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=[5, 10])
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    randomize_parameters(unet, torch.Generator().manual_seed(7))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.to(torch.float16).contiguous() for key, value in unet_to_ldm(unet).items()}, str(path))
    return path


def write_sdxl_loras(loras: Path, seed: int = 1) -> tuple[Path, Path]:
    """Two random SDXL LoRAs for the full-size architecture, written by hgdpo's kohya writer with SDXL's names:
    UNet only (``SDXL_LORA``, what the trainer writes) and UNet + ``lora_te1_``/``lora_te2_`` (``SDXL_TE_LORA``)."""
    from tests import sdxl_factory

    meta = sdxl_factory.meta_models(("unet", "text_encoder", "text_encoder_2"))
    unet_only = sdxl_factory.save_random_lora(meta["unet"], loras / SDXL_LORA, std=0.05, seed=seed)
    with_text = sdxl_factory.save_random_lora(meta["unet"], loras / SDXL_TE_LORA, std=0.05, seed=seed + 1,
                                              text_encoders=(meta["text_encoder"], meta["text_encoder_2"]))
    return unet_only, with_text


def save_sdxl_lora(path: Path) -> Path:
    """A kohya LoRA of SDXL (two text encoders: ``lora_te1_`` / ``lora_te2_``)."""
    from safetensors.torch import save_file

    rank = 4
    state = {}
    for name, (out_features, in_features) in {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                                              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
                                              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
                                                  (640, 2048)}.items():
        state[f"{name}.lora_down.weight"] = torch.zeros(rank, in_features)
        state[f"{name}.lora_up.weight"] = torch.zeros(out_features, rank)
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def save_sd2_shaped_lora(path: Path) -> Path:
    """An SD1-named kohya LoRA whose cross-attention is 1024 wide (an SD2.x LoRA without metadata)."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


def save_unknown_module_lora(path: Path) -> Path:
    """An SD1-named kohya LoRA of the full SD1.5 UNet's third level, which the two-level slim UNet lacks."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(1280, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


def comfy_base(root: Path, checkpoint: Path | None = None, lora: Path | None = None,
               clip_dirs: dict | None = None) -> Path:
    """A ComfyUI ``--base-directory``: models (linked), custom_nodes/hgdpo (this repository), input, output."""
    for folder in ("models/checkpoints", "models/loras", "models/diffusion_models", "models/pickscore",
                   "custom_nodes", "input", "output", "user", "temp"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    pack = root / "custom_nodes" / PACK_NAME
    if not pack.exists():
        pack.symlink_to(ROOT, target_is_directory=True)
    if checkpoint is not None:
        (root / "models/checkpoints" / CHECKPOINT).symlink_to(checkpoint)
    if lora is not None:
        (root / "models/loras" / LORA).symlink_to(lora)
    if clip_dirs is not None:
        (root / "models/pickscore" / PICKSCORE_MODEL).symlink_to(clip_dirs["model"], target_is_directory=True)
        (root / "models/pickscore" / PICKSCORE_PROCESSOR).symlink_to(clip_dirs["processor"], target_is_directory=True)
    return root


# --------------------------------------------------------------------------- workflows


def ui_workflows() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(WORKFLOWS.glob("*.json"))}


def api_workflows() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((WORKFLOWS / "api").glob("*.json"))}


def ui_to_api(graph: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format graph, as the frontend builds it from ``/object_info``.

    Widget values are read in the node's input order (a seed's ``control_after_generate`` adds one value);
    links become ``[origin id, origin slot]``; UI-only nodes (notes) are left out.
    """
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                value = values.pop(0)
                if options.get("control_after_generate"):
                    values.pop(0)
                inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        assert not values, f"{node['type']} (node {node['id']}): {len(values)} widget values left over"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def small(prompt: dict, size: int = 64, steps: int = 3) -> dict:
    """A copy of an API prompt at ``size`` pixels and ``steps`` steps (the tests' CPU budget)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        for key, value in (("width", size), ("height", size), ("steps", steps)):
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
    return prompt
