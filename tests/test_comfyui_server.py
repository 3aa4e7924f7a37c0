"""End-to-end tests: a real ComfyUI server (``main.py --cpu``, bound to 127.0.0.1) with this pack installed.

The server gets its own base directory: ``custom_nodes/hgdpo`` links to this repository, ``models/`` holds
a random-weight SD1.5 single-file checkpoint of the full architecture, an HG-DPO LoRA written by hgdpo's
kohya writer, and a tiny random CLIP laid out as the PickScore folders. The API twins of the example
workflows are posted at 64x64 pixels and 3 steps. Skipped without ``HGDPO_COMFYUI_DIR`` (see
``tests/test_comfyui_support.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from tests import test_comfyui_support as support

START_TIMEOUT = 300
RUN_TIMEOUT = 600
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    def __init__(self, url: str, log: Path, base: Path, process: subprocess.Popen):
        self.url, self.log, self.base, self.process = url, log, base, process

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: dict | None = None):
        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")
        return 200, (json.loads(body) if body else {})

    def queue(self, prompt: dict) -> str:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        assert status == 200, f"prompt refused: {json.dumps(answer)[:2000]}"
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict) -> dict:
        return self.wait(self.queue(prompt))

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


def saved_images(client: Client, entry: dict) -> list[Path]:
    files = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            if image.get("type") == "output":
                files.append(client.base / "output" / image["subfolder"] / image["filename"])
    return files


def load_latent(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


@contextlib.contextmanager
def running_server(base: Path, *extra_args: str):
    """A ComfyUI server (``main.py --cpu``, 127.0.0.1, a free port) on ``base``, stopped afterwards."""
    path, python = support.comfy_dir(), support.comfy_python()
    port = _free_port()
    log = base / "comfyui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [python, str(path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
               "--preview-method", "latent2rgb", *extra_args]
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=base, stdout=handle, stderr=subprocess.STDOUT, env=env)
    client = Client(f"http://127.0.0.1:{port}", log, base, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"ComfyUI did not start:\n{client.log_tail()}"
            try:
                client.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"ComfyUI did not answer in {START_TIMEOUT}s:\n{client.log_tail()}"
                time.sleep(1)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip_dirs):
    from hgdpo.models.tiny import sd15_configs

    support.comfy_dir()  # skips here, before building anything, without a ComfyUI
    assets = tmp_path_factory.mktemp("comfy-e2e-assets")
    checkpoint, lora = support.write_checkpoint(assets, sd15_configs())
    support.assert_finite_file(checkpoint)
    base = support.comfy_base(tmp_path_factory.mktemp("comfy-e2e-base"), checkpoint, lora, tiny_clip_dirs)
    support.save_sdxl_lora(base / "models/loras/sdxl_lora.safetensors")
    support.save_slim_sd2_unet(base / "models/diffusion_models/sd2_unet.safetensors")
    with running_server(base) as client:
        yield client


@pytest.fixture(scope="module")
def sdxl_server(server, tmp_path_factory):
    """A second server for the SDXL workflows: the full-size random SDXL (``HGDPO_SDXL_CHECKPOINT``) as
    ``sd_xl_base_1.0.safetensors``, hgdpo-written SDXL LoRAs and the SD1.5 one, ``--fp16-unet`` (half the RAM of
    ComfyUI's fp32 default on the CPU). The SD1.5 server gives back its models first (``/free``)."""
    checkpoint = support.sdxl_checkpoint()
    server.post("/free", {"unload_models": True, "free_memory": True})
    base = support.comfy_base(tmp_path_factory.mktemp("comfy-e2e-sdxl-base"))
    (base / "models/checkpoints" / support.SDXL_CHECKPOINT).symlink_to(checkpoint)
    (base / "models/loras" / support.LORA).symlink_to(server.base / "models/loras" / support.LORA)
    support.write_sdxl_loras(base / "models/loras")
    with running_server(base, "--fp16-unet") as client:
        yield client


def test_server_loads_the_pack_and_serves_the_example_workflows(server):
    stats = server.get("/system_stats")
    print(f"ComfyUI {stats['system'].get('comfyui_version')} (HGDPO_COMFYUI_DIR)")
    info = server.get("/object_info")
    for node_id in support.NODE_IDS:
        assert info[node_id]["python_module"] == f"custom_nodes.{support.PACK_NAME}"
    assert info["HGDPOLoraLoader"]["input"]["required"]["strength"][1]["default"] == 0.5
    templates = server.get("/workflow_templates")
    assert sorted(templates[support.PACK_NAME]) == sorted(support.ui_workflows())  # the template browser's list
    graph = server.get(f"/api/workflow_templates/{support.PACK_NAME}/lan_sampling.json")
    assert graph["nodes"] and graph["links"]
    assert "Traceback" not in server.log_tail(100_000).split("Import times for custom nodes")[-1]


def test_ui_workflows_and_their_api_twins_are_the_same_graphs(server):
    info = server.get("/object_info")
    ui, api = support.ui_workflows(), support.api_workflows()
    assert sorted(ui) == sorted(api)
    for name, graph in ui.items():
        twin = {key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in api[name].items()}
        assert support.ui_to_api(graph, info) == twin, name


def test_comfyui_frontend_loads_the_ui_workflows_into_their_api_twins(server):
    """ComfyUI's own frontend (in headless Chromium) loads each UI graph and builds exactly its API twin."""
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium) and playwright (pip install "
                    "playwright) in the python running the tests")
    from playwright.sync_api import sync_playwright

    api = support.api_workflows()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady !== false",
                                   timeout=180_000)
            for name, graph in support.ui_workflows().items():
                output = page.evaluate(
                    "async (graph) => { await window.app.loadGraphData(graph); "
                    "return (await window.app.graphToPrompt()).output; }", graph)
                twin = {
                    key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in api[name].items()
                }
                built = {
                    key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in output.items()
                }
                assert built == twin, name
        finally:
            browser.close()


def run_example(client: Client, name: str) -> None:
    """Post the example workflow ``name`` at 64x64 and 3 steps; check its images, and for LAN both chains' latents."""
    prompt = support.small(support.api_workflows()[name])
    lan = [key for key, node in prompt.items() if node["class_type"] == "HGDPOLANKSampler"]
    for key in lan:  # also keep both chains' latents, to check LAN's statistics
        prompt[f"{key}01"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [key, 0], "filename_prefix": f"latents/{name}_dpo"},
        }
        prompt[f"{key}02"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [key, 1], "filename_prefix": f"latents/{name}_sft"},
        }
    entry = client.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + client.log_tail()
    images = saved_images(client, entry)
    assert images and all(path.is_file() for path in images)
    import numpy as np
    from PIL import Image

    for path in images:
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
        assert pixels.std() > 1.0, f"{path.name} is flat (NaN latents decode to black)"
    batch = max(node["inputs"].get("batch_size", 1) for node in prompt.values())
    if any(node["class_type"] == "HGDPOPickScoreBestOfN" for node in prompt.values()):
        assert len(images) == 1  # the best of the batch is saved; the ranked batch is previewed
        scores = [output for output in entry["outputs"].values() if "text" in output]
        assert scores and len(scores[0]["text"][0].splitlines()) == batch
    for key in lan:
        (dpo_file,) = (client.base / "output" / "latents").glob(f"{name}_dpo_*.latent")
        (sft_file,) = (client.base / "output" / "latents").glob(f"{name}_sft_*.latent")
        dpo, sft = load_latent(dpo_file), load_latent(sft_file)
        scale = sft.std(dim=(2, 3)).max().item()
        torch.testing.assert_close(dpo.mean(dim=(2, 3)), sft.mean(dim=(2, 3)), atol=1e-4 * scale, rtol=0)
        torch.testing.assert_close(dpo.std(dim=(2, 3)), sft.std(dim=(2, 3)), atol=1e-4 * scale, rtol=1e-5)
        assert (dpo - sft).abs().max() > 1e-3 * sft.abs().max()  # the LoRA changed the structure
    log = client.log_tail(10_000_000)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log and "clip missing" not in log


SD15_WORKFLOWS = sorted(name for name, prompt in support.api_workflows().items() if not support.is_sdxl_workflow(prompt))
SDXL_WORKFLOWS = sorted(name for name, prompt in support.api_workflows().items() if support.is_sdxl_workflow(prompt))


@pytest.mark.parametrize("name", SD15_WORKFLOWS)
def test_example_workflows_run(server, name):
    run_example(server, name)


def test_bad_inputs_are_reported_and_the_server_keeps_running(server):
    api = support.api_workflows()
    prompt = support.small(api["hgdpo_lora"])
    prompt["2"]["inputs"]["lora_name"] = "sdxl_lora.safetensors"
    error = error_of(server.run(prompt))
    assert error["node_type"] == "HGDPOLoraLoader" and "SDXL" in error["exception_message"]

    prompt = support.small(api["lan_sampling"])
    prompt["90"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "sd2_unet.safetensors", "weight_dtype": "default"},
    }
    prompt["6"]["inputs"]["sft_model"] = ["90", 0]
    error = error_of(server.run(prompt))
    assert error["node_type"] == "HGDPOLANKSampler"
    assert "SD15 with 4 latent channels" in error["exception_message"] and "SD20" in error["exception_message"]

    pickscore = server.base / "models" / "pickscore" / support.PICKSCORE_MODEL
    hidden = pickscore.with_name("hidden")
    pickscore.rename(hidden)
    try:
        prompt = support.small(api["pickscore_best_of_n"])
        prompt["9"]["inputs"]["precision"] = "bf16"  # not cached by an earlier run
        error = error_of(server.run(prompt))
    finally:
        hidden.rename(pickscore)
    folder = str(server.base / "models" / "pickscore")
    assert error["node_type"] == "HGDPOPickScoreLoader"
    assert folder in error["exception_message"]
    assert "huggingface-cli download yuvalkirstain/PickScore_v1" in error["exception_message"]

    entry = server.run(support.small(api["hgdpo_lora"], steps=2))  # still serving
    assert entry["status"]["status_str"] == "success"


def test_interrupt_stops_lan_sampling(server):
    prompt = support.small(support.api_workflows()["lan_sampling"], steps=200)
    prompt["6"]["inputs"]["seed"] = 7  # not cached
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + RUN_TIMEOUT
    while "/200 [" not in server.log_tail(3000) and time.monotonic() < deadline:  # the sampler's progress bar
        time.sleep(0.5)
    assert server.post("/interrupt")[0] == 200
    entry = server.wait(prompt_id)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert (
        server.run(support.small(support.api_workflows()["hgdpo_lora"], steps=2))["status"]["status_str"] == "success"
    )


# --------------------------------------------------------------------------- SDXL (full-size random checkpoint)


@pytest.mark.parametrize("name", SDXL_WORKFLOWS)
def test_sdxl_example_workflows_run(sdxl_server, name):
    """The SDXL template (checkpoint -> HG-DPO LoRA 0.5 -> LAN KSampler) on SDXL, at 64x64 and 3 steps."""
    run_example(sdxl_server, name)
    log = sdxl_server.log_tail(10_000_000)
    assert "model_type EPS" in log and "SDXL" in log  # ComfyUI loaded it as SDXL


def test_sdxl_bad_inputs_are_reported_and_the_server_keeps_running(sdxl_server):
    (name,) = SDXL_WORKFLOWS
    prompt = support.small(support.api_workflows()[name], steps=2)
    prompt["2"]["inputs"]["lora_name"] = support.LORA  # an SD1.5 HG-DPO LoRA on the SDXL checkpoint
    error = error_of(sdxl_server.run(prompt))
    assert error["node_type"] == "HGDPOLoraLoader"
    assert "is an SD1.5 LoRA, but the model is an SDXL model" in error["exception_message"]
    prompt["2"]["inputs"]["lora_name"] = support.SDXL_TE_LORA  # UNet + both text encoders, through CLIP
    prompt["2"]["inputs"]["strength"] = 0.45  # not cached
    entry = sdxl_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    log = sdxl_server.log_tail(10_000_000)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
