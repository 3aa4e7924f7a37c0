"""The extension in a real WebUI (AUTOMATIC1111 1.10, Forge or Forge Neo), headless on the CPU, through its HTTP API.

Skipped unless a WebUI is configured (CI cannot fetch one): set ``HGDPO_WEBUI_DIR`` (the WebUI's source
tree), ``HGDPO_WEBUI_PYTHON`` (its Python) and ``HGDPO_WEBUI_CKPT`` (an SD1.5-architecture checkpoint;
random weights are fine): see extension/webui_harness.py. The WebUI runs from a private ``--data-dir``
with this repository linked as ``extensions/hgdpo`` and test LoRAs written here. Images are 64x64 with 3
steps: the checks are exact comparisons, not looks.

The strongest check, for every LAN sampler: with LAN strength 0 the DPO chain is the DPO model alone, so
"<sampler> (HG-DPO LAN)" at weight w must give the image the plain sampler gives with ``<lora:name:w>``
in the prompt (the WebUI's own Lora extension merging the weights). That proves the LDM name map, the
per-call LoRA toggle, the shared noise of the stochastic samplers and, with a prompt-editing prompt,
that the denoiser's step counter advances once per step.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from extension import settings as hs
from extension.webui_harness import ENV_SDXL_CKPT, WebUI, config_from_environment, host_flags, prepare_data_dir
from hgdpo.inference.infotext import BEST_OF_KEY, LAN_KEY, LORA_HASH_KEY, LORA_KEY, SCORE_KEY, WEIGHT_KEY, parse_parameters

CONFIG, SKIP_REASON = config_from_environment()
pytestmark = pytest.mark.skipif(CONFIG is None, reason=SKIP_REASON)

LORA = "hgdpo_people"
TE_LORA = "hgdpo_with_te"
PROMPT = "[a woman:a man:1] singing on the stage"  # prompt editing: switches after step 1
BASE = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 7,
        "cfg_scale": 5.0}
LAN_SAMPLERS = [hs.lan_sampler_name(name) for name in hs.LAN_BASE_SAMPLERS]
FORGE_API_FIELDS = ({"hr_additional_modules": ["Use same choices"], "styles": []}
                    if CONFIG is not None and CONFIG.is_forge else {})
"""Forge's API leaves ``hr_additional_modules`` unset (its hires pass then fails on ``in None``), and its
``infotext`` reader fails on list-typed fields (``isinstance(value, list[str])``): Forge bugs, sidestepped by
setting these fields."""
SAME = 1
"""Two runs of the same generation differ by at most one 8-bit level: on the CPU the WebUI's kernels do not
always round alike from call to call (seen once in a few runs, for plain sampling too)."""
CHANGED = 4
"""Two generations differ in substance when some pixel differs by more than this (well above :data:`SAME`).
How much LAN or a LoRA moves a random-weight model's 64x64 image varies: 10 levels was seen at the least."""

TINY_PICKSCORE = r"""
import sys, torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
root = sys.argv[1]
tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
config = CLIPConfig(text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
                    vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
torch.manual_seed(0)
CLIPModel(config).save_pretrained(root + "/PickScore_v1", safe_serialization=True)
tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")  # the WebUI's own offline CLIP tokenizer
processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                          crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
processor.save_pretrained(root + "/CLIP-ViT-H-14-laion2B-s32B-b79K")
"""


# --------------------------------------------------------------------------- fixtures


def _write_loras(folder):
    """SD1.5-shaped random kohya LoRAs (attention layers; one also with text-encoder layers), and an SDXL one."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hgdpo.models.tiny import sd15_configs
    from tests.sd15_factory import save_random_lora

    configs = sd15_configs()
    with torch.device("meta"):  # shapes only: the LoRA writer reads in/out features
        unet = UNet2DConditionModel(**{k: v for k, v in configs["unet"].items() if not k.startswith("_")})
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                                       if not k.startswith("_")}))
    save_random_lora(unet, folder / f"{LORA}.safetensors", rank=4, seed=1)
    save_random_lora(unet, folder / f"{TE_LORA}.safetensors", rank=4, seed=2)
    _add_text_encoder_layers(folder / f"{TE_LORA}.safetensors", text_encoder)
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)},
              str(folder / "sdxl_style.safetensors"))


def _add_text_encoder_layers(path, text_encoder, rank=4, std=0.05):
    """kohya's text-encoder keys (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), whatever the
    transformers version's module paths (transformers 5 dropped the ``text_model.`` level)."""
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(3)
    with safe_open(str(path), "pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            name = name if name.startswith("text_model.") else "text_model." + name
            key = "lora_te_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * std
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata)


def make_data_dir(tmp_path_factory, checkpoint=None):
    """A WebUI data dir with this extension, the checkpoint (default: the SD1.5 one), the test LoRAs and a tiny
    PickScore."""
    root = prepare_data_dir(tmp_path_factory.mktemp("webui-data"), checkpoint or CONFIG.checkpoint)
    _write_loras(root / "models" / "Lora")
    subprocess.run([str(CONFIG.python), "-c", TINY_PICKSCORE, str(root / "models" / "pickscore")], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    (root / "models" / "empty").mkdir()
    _write_foreign_files(root)
    return root


SECRET_TENSOR = "private_embedding_of_another_app"
"""A tensor name in a file outside the Lora folder: no API answer may ever contain it."""


def _write_foreign_files(root):
    """Files outside the folders the extension may read: a valid SD1.5 LoRA, a safetensors file that is no LoRA,
    and a working PickScore (a copy of the tiny one)."""
    foreign = root / "foreign"
    foreign.mkdir()
    shutil.copy(root / "models" / "Lora" / f"{LORA}.safetensors", foreign / "valid_lora.safetensors")
    save_file({SECRET_TENSOR: torch.zeros(2, 2)}, str(foreign / "secret.safetensors"))
    shutil.copytree(root / "models" / "pickscore", foreign / "pickscore")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def webui(data_dir):
    with WebUI(CONFIG, data_dir) as running:
        yield running


def webui_lora(webui, body):
    """The WebUI's own Lora extension, in its functional mode where it has one, for a ``<lora:...>`` prompt: the
    reference.

    (A1111's default mode backs up every UNet and text-encoder weight at the first ``<lora>``: +3.7 GB here.
    Forge Neo has no such option and refuses unknown settings.)"""
    if "<lora:" in body.get("prompt", "") and "lora_functional" in webui_options(webui):
        body["override_settings"] = {**body.get("override_settings", {}), "lora_functional": True}
    return body


_OPTIONS: dict[str, dict] = {}


def webui_options(webui) -> dict:
    """The WebUI's settings (``/sdapi/v1/options``), read once per WebUI."""
    if webui.url not in _OPTIONS:
        _OPTIONS[webui.url] = webui.get("/sdapi/v1/options")
    return _OPTIONS[webui.url]


def txt2img(webui, sampler, args=None, expect=200, **overrides):
    body = webui_lora(webui, {**BASE, "sampler_name": sampler, **overrides})
    if args is not None:
        body["alwayson_scripts"] = {hs.SCRIPT_TITLE: {"args": args}}
    status, payload = webui.post("/sdapi/v1/txt2img", body)
    assert status == expect, f"HTTP {status}: {str(payload)[:2000]}\n{webui.log_tail(30)}"
    return payload


def images(payload):
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(np.int16)
            for data in payload["images"]]


def infotexts(payload):
    return json.loads(payload["info"])["infotexts"]


def params(infotext):
    return parse_parameters(infotext)[2]


def error_text(payload):
    """The error message of a failed API call (A1111 names the field "errors", Forge "message")."""
    return payload.get("errors") or payload.get("message") or str(payload)


def max_diff(a, b):
    return int(np.abs(a - b).max())


def loaded_status(webui):
    """``/hgdpo/v1/status`` with the checkpoint loaded (AUTOMATIC1111 loads it when first asked for, which takes
    minutes for SDXL on a CPU; Forge at the first job: one 1-step image first)."""
    status = webui.get("/hgdpo/v1/status", timeout=1800)
    if status["model_family"] is None and status["model_problem"] is None:
        txt2img(webui, "Euler", steps=1)
        status = webui.get("/hgdpo/v1/status", timeout=1800)
    return status


# --------------------------------------------------------------------------- SDXL (first: one WebUI at a time)

SDXL_CONFIG = None if CONFIG is None or CONFIG.sdxl_checkpoint is None else dataclasses.replace(
    CONFIG, checkpoint=CONFIG.sdxl_checkpoint,
    extra_args=[*CONFIG.extra_args, *(["--loglevel", "DEBUG"] if "--loglevel" in host_flags(CONFIG.webui_dir) else [])])
"""The WebUI with an SDXL checkpoint; AUTOMATIC1111 logs at DEBUG, where its Lora extension names the keys it
could not match (Forge logs them at INFO)."""
XL_LORA, XL_TE_LORA, XL_CONTROL = "hgdpo_xl", "hgdpo_xl_te", "hgdpo_xl_control"
XL_UNKNOWN_KEY = "lora_unet_input_blocks_99_1_proj_in"
"""A module no SDXL UNet has: the control LoRA carries it, so the unmatched-key check is seen to fire."""


def _write_sdxl_loras(folder):
    """SDXL LoRAs as hgdpo's trainer writes them: peft's LoRA on the attention layers of the full-size SDXL UNet
    (built on the meta device for its names and shapes, filled with random weights), saved by
    :func:`hgdpo.models.lora.save_kohya_lora` with the family's kohya names (SGM paths); one with te1 (CLIP-L)
    and te2 (OpenCLIP bigG) layers added under kohya's names (q/k/v/out, fc1/fc2), and a control copy holding one
    module no SDXL model has. Returns the number of UNet modules."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from hgdpo.models.families import SDXL
    from hgdpo.models.lora import add_lora, kohya_metadata, lora_state_dict, save_kohya_lora

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((SDXL.config_dir / "unet" / "config.json").read_text()))
        encoders = (CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL.config_dir / "text_encoder")),
                    CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL.config_dir / "text_encoder_2")))
    add_lora(unet, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(11)
    state = {key: torch.randn(value.shape, generator=generator) * 0.05 for key, value in lora_state_dict(unet).items()}
    metadata = kohya_metadata(rank=4, alpha=4.0, title=XL_LORA, resolution=(64, 64), base_model="random",
                              base_model_hash=None, training={}, hgdpo={"loss": "hgdpo"}, family=SDXL)
    path = save_kohya_lora(folder / f"{XL_LORA}.safetensors", state, 4.0, metadata, dtype=torch.float32,
                           names=SDXL.kohya_unet_names(unet))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp_fc1", "mlp_fc2")
    with_te = dict(tensors)
    for name, module in SDXL.kohya_text_encoder_layers(encoders).items():
        if name.endswith(targets):
            with_te[f"{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.05
            with_te[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.05
            with_te[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(with_te, str(folder / f"{XL_TE_LORA}.safetensors"), metadata)
    control = {**tensors, f"{XL_UNKNOWN_KEY}.lora_down.weight": torch.zeros(4, 8),
               f"{XL_UNKNOWN_KEY}.lora_up.weight": torch.zeros(8, 4), f"{XL_UNKNOWN_KEY}.alpha": torch.tensor(4.0)}
    save_file(control, str(folder / f"{XL_CONTROL}.safetensors"), metadata)
    return len({key.split(".")[0] for key in tensors})


def _unmatched_key_reports(log: str, name: str) -> list[str]:
    """The lines in which the WebUI's own Lora extension reports keys of LoRA ``name`` it could not match
    (AUTOMATIC1111 at DEBUG: ``Network <file> didn't match keys: {...}``; Forge: ``[LORA] Loading <file> for <model>
    with N unmatched keys`` and ``... (skipped N keys)`` with N > 0)."""
    file = re.escape(f"{name}.safetensors")
    patterns = (rf"Network \S*{file} didn't match keys", rf"\[LORA\] Loading {file} for .* with \d+ unmatched keys",
                rf"\[LORA\] \w+ {file} for .*(skipped [1-9]\d* keys|keys mismatched)")
    return [line for line in log.splitlines() if any(re.search(pattern, line) for pattern in patterns)]


@pytest.mark.skipif(SDXL_CONFIG is None, reason=f"no SDXL checkpoint: set {ENV_SDXL_CKPT} to a full-size SDXL base "
                                                 "architecture .safetensors file (random weights are fine)")
@pytest.mark.timeout(3600)  # a LAN image of SDXL on a shared 2-core CPU took up to 5 minutes
class TestSDXL:
    """The LAN samplers, the HG-DPO LoRA, refusals and best-of-N on an SDXL checkpoint (one WebUI for the class).

    Against the WebUI's own Lora extension (``<lora:...>``) at LAN strength 0, as for SD1.5: the SGM UNet names,
    SDXL's dict conditioning (``crossattn`` + ``vector``) in the one-call path and in the two-call path (AND),
    and te1/te2. The WebUI's Lora extension must match every key of the trainer's SDXL LoRA file."""

    @pytest.fixture(scope="class")
    def xl(self, tmp_path_factory):
        root = make_data_dir(tmp_path_factory, SDXL_CONFIG.checkpoint)
        modules = _write_sdxl_loras(root / "models" / "Lora")
        # AUTOMATIC1111's live preview would download its SDXL approximation network (it ships SD1.5's only)
        (root / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}))
        with WebUI(SDXL_CONFIG, root, startup_timeout=1800) as running:
            running.unet_modules = modules
            running.generated = {}
            yield running

    @staticmethod
    def image(xl, sampler, args=None, **overrides):
        """One 64x64 image in 2 steps (SDXL on a CPU is slow), generated once per class and kept."""
        key = json.dumps([sampler, args, overrides], sort_keys=True)
        if key not in xl.generated:
            xl.generated[key] = images(txt2img(xl, sampler, args, **{"steps": 2, **overrides}))[0]
        return xl.generated[key]

    def test_status_and_a_lora_of_the_other_family(self, xl):
        status = loaded_status(xl)
        loras = {item["name"]: item for item in status["loras"]}
        assert status["model_family"] == "SDXL" and status["model_problem"] is None
        assert loras[XL_LORA]["problem"] is None and loras[XL_LORA]["family"] == "SDXL"
        assert loras[XL_TE_LORA]["problem"] is None
        assert "is an SD1.5 LoRA, but the model is an SDXL model" in loras[LORA]["problem"]
        payload = txt2img(xl, "Euler (HG-DPO LAN)", [LORA, 0.5], expect=500)
        assert payload["error"] == "HGDPOError"
        assert "is an SD1.5 LoRA, but the model is an SDXL model" in error_text(payload)

    def test_lan_off_equals_the_webui_lora_in_one_call_and_weight_zero_is_plain(self, xl):
        reference = self.image(xl, "Euler a", prompt=f"{PROMPT} <lora:{XL_LORA}:0.8>")
        lan_off = self.image(xl, "Euler a (HG-DPO LAN)", [XL_LORA, 0.8, 0.0])
        assert max_diff(lan_off, reference) <= 2
        assert max_diff(self.image(xl, "Euler a (HG-DPO LAN)", [XL_LORA, 0.8, 1.0]), lan_off) > CHANGED
        assert max_diff(self.image(xl, "Euler a (HG-DPO LAN)", [XL_LORA, 0.0, 1.0]), self.image(xl, "Euler a")) <= SAME

    def test_and_prompts_take_the_two_call_path(self, xl):
        prompt = "a woman singing AND a crowd :0.6"
        reference = self.image(xl, "DPM++ 2M", prompt=f"{prompt} <lora:{XL_LORA}:0.8>")
        assert max_diff(self.image(xl, "DPM++ 2M (HG-DPO LAN)", [XL_LORA, 0.8, 0.0], prompt=prompt), reference) <= 2

    def test_te1_and_te2_go_into_the_dpo_conditioning(self, xl):
        with_te = self.image(xl, "Euler a", prompt=f"{PROMPT} <lora:{XL_TE_LORA}:0.8>")
        assert max_diff(with_te, self.image(xl, "Euler a", prompt=f"{PROMPT} <lora:{XL_LORA}:0.8>")) > CHANGED
        assert max_diff(self.image(xl, "Euler a (HG-DPO LAN)", [XL_TE_LORA, 0.8, 0.0]), with_te) <= 2
        plain = self.image(xl, "Euler a")
        again = images(txt2img(xl, "Euler a", steps=2))[0]
        assert max_diff(again, plain) <= SAME  # every hook and weight put back

    def test_the_webuis_lora_extension_matches_every_key_of_the_trainers_file(self, xl):
        for name in (XL_LORA, XL_TE_LORA, XL_CONTROL):
            self.image(xl, "Euler", steps=1, prompt=f"{PROMPT} <lora:{name}:0.5>")
        log = xl.log_path.read_text(errors="replace")
        assert _unmatched_key_reports(log, XL_CONTROL), "the control LoRA's unknown key was not reported"
        assert _unmatched_key_reports(log, XL_LORA) == [] and _unmatched_key_reports(log, XL_TE_LORA) == []
        forge_counts = re.findall(rf"\[LORA\] Loaded {XL_LORA}\.safetensors for \S+-UNet with (\d+) keys", log)
        assert all(int(count) == xl.unet_modules for count in forge_counts), forge_counts

    def test_best_of_n_with_a_lan_sampler(self, xl):
        every = txt2img(xl, "Euler a (HG-DPO LAN)", [XL_LORA, 0.5, 1.0, 2, "", True], steps=2)
        texts = infotexts(every)
        scores = [float(params(text)[SCORE_KEY]) for text in texts]
        seeds = [int(params(text)["Seed"]) for text in texts]
        assert len(images(every)) == 2 and scores == sorted(scores, reverse=True) and sorted(seeds) == [7, 8]
        alone = txt2img(xl, "Euler a (HG-DPO LAN)", [XL_LORA, 0.5, 1.0, 1], steps=2, seed=seeds[0])
        assert max_diff(images(alone)[0], images(every)[0]) <= SAME
        assert params(infotexts(alone)[0])[LORA_KEY] == XL_LORA


# --------------------------------------------------------------------------- registration


def test_lan_samplers_are_listed_with_their_base_options(webui):
    samplers = {item["name"]: item for item in webui.get("/sdapi/v1/samplers")}
    for name in LAN_SAMPLERS:
        assert name in samplers, sorted(samplers)
        base = samplers[hs.base_sampler_name(name)]
        assert samplers[name]["options"].get("scheduler") == base["options"].get("scheduler")
    status = loaded_status(webui)
    assert status["lan_samplers"] == LAN_SAMPLERS
    loras = {item["name"]: item for item in status["loras"]}
    assert loras[LORA]["problem"] is None and len(loras[LORA]["hash"]) == 12
    assert "is an SDXL LoRA, but the model is an SD1.5 model" in loras["sdxl_style"]["problem"]
    assert loras[LORA]["family"] == "SD1.5" and status["model_family"] == "SD1.5"
    assert status["scorer_ready"] and status["model_problem"] is None
    assert "[HG-DPO] LoRA weight" in status["xyz_axes"]["txt2img"]


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", LAN_SAMPLERS)
def test_lan_off_equals_the_webui_lora_and_lan_on_changes_the_image(webui, sampler):
    plain = hs.base_sampler_name(sampler)
    reference = images(txt2img(webui, plain, prompt=f"{PROMPT} <lora:{LORA}:0.8>"))[0]
    lan_off = images(txt2img(webui, sampler, [LORA, 0.8, 0.0]))[0]
    assert max_diff(lan_off, reference) <= 2  # merged (WebUI) vs hooked (ours) float rounding
    lan_on = images(txt2img(webui, sampler, [LORA, 0.8, 1.0]))[0]
    assert max_diff(lan_on, lan_off) > CHANGED


def test_and_prompts_take_the_two_call_path(webui):
    """AND repeats conditioning rows per image, so each chain gets its own CFG call: still the WebUI's LoRA."""
    prompt = "a woman singing AND a crowd :0.6"
    reference = images(txt2img(webui, "DPM++ 2M", prompt=f"{prompt} <lora:{LORA}:0.8>"))[0]
    lan_off = images(txt2img(webui, "DPM++ 2M (HG-DPO LAN)", [LORA, 0.8, 0.0], prompt=prompt))[0]
    assert max_diff(lan_off, reference) <= 2
    assert (
        max_diff(images(txt2img(webui, "DPM++ 2M (HG-DPO LAN)", [LORA, 0.8, 1.0], prompt=prompt))[0], lan_off) > CHANGED
    )


def test_weight_zero_is_the_plain_sampler(webui):
    plain = images(txt2img(webui, "Euler a"))[0]
    lan = images(txt2img(webui, "Euler a (HG-DPO LAN)", [LORA, 0.0, 1.0]))[0]
    assert max_diff(plain, lan) <= SAME


def test_infotext_png_info_and_progress(webui):
    polled = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            progress = webui.get("/sdapi/v1/progress?skip_current_image=true")
            polled.append((progress["state"]["sampling_step"], progress["state"]["sampling_steps"]))
            time.sleep(0.2)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        payload = txt2img(webui, "DPM++ 2M (HG-DPO LAN)", [LORA, 0.3, 0.8], steps=6)
    finally:
        done.set()
        thread.join()
    values = params(infotexts(payload)[0])
    assert values["Sampler"] == "DPM++ 2M (HG-DPO LAN)"
    assert values[LORA_KEY] == LORA and values[WEIGHT_KEY] == "0.3" and values[LAN_KEY] == "0.8"
    assert len(values[LORA_HASH_KEY]) == 12
    # the WebUI's step counter sees one step per sampler step (not two evaluations)
    # (polls before the job starts still show the previous job's 3 steps)
    assert max(total for _, total in polled) == 6
    assert max(step for step, _ in polled) <= 6
    # PNG Info reads the settings back
    info = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + payload["images"][0]})[1]
    read_back = info.get("parameters") or params(info["info"])
    assert hs.from_infotext(read_back) == {"lora": LORA, "lora_hash": values[LORA_HASH_KEY], "weight": 0.3,
                                           "lan_strength": 0.8}


def test_text_encoder_lora_goes_into_the_dpo_conditioning(webui):
    reference = images(txt2img(webui, "DPM++ 2M", prompt=f"{PROMPT} <lora:{TE_LORA}:0.7>"))[0]
    unet_only = images(txt2img(webui, "DPM++ 2M", prompt=f"{PROMPT} <lora:{LORA}:0.7>"))[0]
    assert max_diff(reference, unet_only) > CHANGED  # (the TE part does matter)
    plain_before = images(txt2img(webui, "DPM++ 2M"))[0]
    lan_off = images(txt2img(webui, "DPM++ 2M (HG-DPO LAN)", [TE_LORA, 0.7, 0.0]))[0]
    assert max_diff(lan_off, reference) <= 2
    # the text-encoder and UNet hooks are gone afterwards: plain sampling is unchanged
    assert max_diff(images(txt2img(webui, "DPM++ 2M"))[0], plain_before) <= SAME


def test_img2img_and_hires_fix(webui):
    init = base64.b64encode(_png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))).decode()
    body = {**BASE, "init_images": [init], "denoising_strength": 0.6, "steps": 4}
    reference_body = webui_lora(webui, {**body, "sampler_name": "Euler", "prompt": f"{PROMPT} <lora:{LORA}:0.8>"})
    for _ in range(2):  # Forge's first LoRA img2img after start differs (by ~50 levels) from every later one
        status, reference = webui.post("/sdapi/v1/img2img", reference_body)
        assert status == 200, reference
    status, lan_off = webui.post("/sdapi/v1/img2img", {**body, "sampler_name": "Euler (HG-DPO LAN)",
                                                        "alwayson_scripts": {"HG-DPO": {"args": [LORA, 0.8, 0.0]}}})
    assert status == 200, lan_off
    assert max_diff(images(lan_off)[0], images(reference)[0]) <= 2
    hires = txt2img(webui, "DPM++ 2M SDE (HG-DPO LAN)", [LORA, 0.5], enable_hr=True, hr_upscaler="Latent", hr_scale=1.5,
                    hr_second_pass_steps=2, denoising_strength=0.6, **FORGE_API_FIELDS)
    assert images(hires)[0].shape == (96, 96, 3)
    assert params(infotexts(hires)[0])[WEIGHT_KEY] == "0.5"


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_best_of_n_keeps_the_highest_pickscore(webui):
    every = txt2img(webui, "Euler a (HG-DPO LAN)", [LORA, 0.5, 1.0, 3, "", True])
    texts = infotexts(every)
    assert len(images(every)) == 3
    scores = [float(params(text)[SCORE_KEY]) for text in texts]
    seeds = [int(params(text)["Seed"]) for text in texts]
    assert scores == sorted(scores, reverse=True) and sorted(seeds) == [7, 8, 9]
    assert all(params(text)[BEST_OF_KEY] == "3" for text in texts)
    best = txt2img(webui, "Euler a (HG-DPO LAN)", [LORA, 0.5, 1.0, 3])
    assert len(images(best)) == 1
    assert max_diff(images(best)[0], images(every)[0]) <= SAME
    assert params(infotexts(best)[0])["Seed"] == str(seeds[0])
    # the recorded seed regenerates the kept image on its own
    alone = txt2img(webui, "Euler a (HG-DPO LAN)", [LORA, 0.5, 1.0, 1], seed=seeds[0])
    assert max_diff(images(alone)[0], images(best)[0]) <= SAME
    # best-of-N with a plain sampler
    plain = txt2img(webui, "Euler", [hs.NO_LORA, 0.5, 1.0, 2])
    assert len(images(plain)) == 1 and SCORE_KEY in params(infotexts(plain)[0])


def test_xyz_plot_over_samplers_and_the_weight(webui):
    status = webui.get("/hgdpo/v1/status")
    axes = status["xyz_axes"]["txt2img"]
    # the X/Y/Z script's arguments by name, in its own order (Forge Neo has one more than A1111 and Forge)
    named = {"x_type": axes["Sampler"], "x_values": "", "x_values_dropdown": ["Euler", "Euler (HG-DPO LAN)"],
             "y_type": axes["[HG-DPO] LoRA weight"], "y_values": "0.2, 0.9", "y_values_dropdown": None,
             "z_type": 0, "z_values": "", "z_values_dropdown": None, "draw_legend": True,
             "include_lone_images": True, "row_count": 0, "margin_size": 0}
    body = {**BASE, "sampler_name": "Euler", "script_name": "x/y/z plot",
            "alwayson_scripts": {"HG-DPO": {"args": [LORA]}},
            "script_args": [named.get(name, False) for name in status["xyz_arguments"]]}
    status, payload = webui.post("/sdapi/v1/txt2img", body)
    assert status == 200, f"{payload}\n{webui.log_tail(40)}"
    cells = [params(text) for text in infotexts(payload)[1:]]  # [0] is the grid
    assert [(cell["Sampler"], cell.get(WEIGHT_KEY)) for cell in cells] == [
        ("Euler", None), ("Euler (HG-DPO LAN)", "0.2"), ("Euler", None), ("Euler (HG-DPO LAN)", "0.9")]
    pixels = images(payload)[1:]
    assert max_diff(pixels[0], pixels[2]) <= SAME and max_diff(pixels[1], pixels[3]) > CHANGED


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "No HG-DPO LoRA chosen"),
        (["missing_lora", 0.5], "'missing_lora' not found in .*Lora"),
        (["sdxl_style", 0.5], "is an SDXL LoRA, but the model is an SD1.5 model"),
        ([LORA, 7.0], r"weight must lie in \[0.0, 2.0\]"),
    ],
)
def test_bad_lan_settings_stop_with_a_clear_message(webui, args, message):
    payload = txt2img(webui, "Euler (HG-DPO LAN)", args, expect=500)
    assert payload["error"] == "HGDPOError" and re.search(message, error_text(payload)), payload


def test_missing_pickscore_weights_name_the_folder_and_the_download(webui, data_dir):
    payload = txt2img(webui, "Euler", [hs.NO_LORA, 0.5, 1.0, 2, str(data_dir / "models" / "empty")], expect=500)
    assert str(data_dir / "models" / "empty" / "PickScore_v1") in error_text(payload)
    assert "huggingface-cli download yuvalkirstain/PickScore_v1" in error_text(payload)


def test_lora_in_the_prompt_as_well_is_refused(webui):
    payload = txt2img(webui, "Euler (HG-DPO LAN)", [LORA, 0.5], expect=500, prompt=f"{PROMPT} <lora:{LORA}:1>")
    assert "Remove <lora:hgdpo_people" in error_text(payload)


def test_other_samplers_are_unaffected_by_bad_accordion_values(webui):
    reference = images(txt2img(webui, "DPM++ 2M"))[0]
    for args in (["missing_lora", 0.5], [LORA, 7.0], ["sdxl_style"]):
        assert max_diff(images(txt2img(webui, "DPM++ 2M", args))[0], reference) <= SAME


# --------------------------------------------------------------------------- the API cannot reach other files


@pytest.mark.parametrize("name", ["{foreign}/valid_lora.safetensors", "{foreign}/secret.safetensors",
                                  "../../foreign/valid_lora", "../../foreign/secret", "~/../../etc/hostname"])
def test_lora_paths_outside_the_lora_folder_are_refused(webui, data_dir, name):
    """A LoRA is a name from the Lora folder: a path (absolute, or escaping it with ..) is refused before
    the file is opened, and nothing of the file comes back (its tensor names included)."""
    lora = name.format(foreign=data_dir / "foreign")
    payload = txt2img(webui, "Euler (HG-DPO LAN)", [lora, 0.5, 1.0], expect=500)
    assert payload["error"] == "HGDPOError" and "is a path; give the name of a file in" in error_text(payload)
    assert SECRET_TENSOR not in json.dumps(payload)
    status = webui.get("/hgdpo/v1/status")
    assert {item["name"] for item in status["loras"]} == {LORA, TE_LORA, "sdxl_style"}


@pytest.mark.parametrize("folder", ["{root}/foreign/pickscore", "models/../foreign/pickscore", "/"])
def test_scorer_folder_outside_the_models_folder_is_refused(webui, data_dir, folder):
    """A working PickScore outside the models folder is not loaded; the same files inside it are."""
    payload = txt2img(webui, "Euler", [hs.NO_LORA, 0.5, 1.0, 2, folder.format(root=data_dir)], expect=500)
    assert "is outside the folders the WebUI allows for it" in error_text(payload), payload
    assert "PickScore_v1" not in error_text(payload)  # says nothing of what the folder holds
    inside = txt2img(webui, "Euler", [hs.NO_LORA, 0.5, 1.0, 2, "models/pickscore"])
    assert SCORE_KEY in params(infotexts(inside)[0])
