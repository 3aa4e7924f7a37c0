"""Node-level tests of the ComfyUI pack with a real ComfyUI imported in this process.

Run with the python that has ComfyUI's requirements and ``HGDPO_COMFYUI_DIR`` set (see
``tests/test_comfyui_support.py``); skipped otherwise. The model is a random-weight SD1.5 that ComfyUI
detects as SD15 (full CLIP-L and VAE, a two-level UNet), saved as a single file; the LoRA is written by
hgdpo's kohya writer with random weights. Everything runs on the CPU at 64x64 pixels.

The SDXL tests (``test_sdxl_*``) need a full-size SDXL single file (``HGDPO_SDXL_CHECKPOINT``; see
``tests/test_comfyui_support.py``) and are skipped without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.util
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from tests import test_comfyui_support as support

SAMPLERS = [("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "karras"),
            ("ddim", "normal"), ("heun", "normal")]
COMFY_REQUIREMENTS = ("torchsde", "einops", "aiohttp", "yaml", "scipy", "av")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_clip_dirs):
    """ComfyUI (CPU) with the pack loaded by its own custom-node loader, a slim SD1.5 checkpoint and a LoRA."""
    path = support.comfy_dir()
    missing = [name for name in COMFY_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"This python lacks ComfyUI's requirements ({', '.join(missing)}): run these tests with "
                    f"${support.PYTHON_VARIABLE} -m pytest.")
    torch.manual_seed(0)
    assets = tmp_path_factory.mktemp("comfy-assets")
    checkpoint, lora = support.write_checkpoint(assets, support.slim_sd15_configs())
    base = support.comfy_base(tmp_path_factory.mktemp("comfy-base"), checkpoint, lora, tiny_clip_dirs)
    support.save_sdxl_lora(base / "models/loras/sdxl_lora.safetensors")
    support.save_sd2_shaped_lora(base / "models/loras/sd2_lora.safetensors")
    support.save_unknown_module_lora(base / "models/loras/unknown_module_lora.safetensors")
    support.save_slim_sd2_unet(base / "models/diffusion_models/sd2_unet.safetensors")

    sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base)
    import folder_paths

    import nodes

    folder_paths.set_output_directory(str(base / "output"))
    assert asyncio.run(nodes.load_custom_node(str(base / "custom_nodes" / support.PACK_NAME)))
    import comfy.model_management
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from comfy_extras import nodes_custom_sampler

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(support.CHECKPOINT)[:3]
    positive = nodes.CLIPTextEncode().encode(clip, "a woman singing on the stage")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "lowres, bad anatomy")[0]
    node = nodes.NODE_CLASS_MAPPINGS
    dpo = node["HGDPOLoraLoader"].execute(model=model, lora_name=support.LORA, strength=0.5).args[0]
    return SimpleNamespace(
        path=path, base=base, checkpoint=checkpoint, lora=lora, nodes=nodes, node=node, folder_paths=folder_paths,
        samplers=comfy.samplers, sd=comfy.sd, utils=comfy.utils, mm=comfy.model_management,
        custom=nodes_custom_sampler, model=model, clip=clip, vae=vae, positive=positive, negative=negative, dpo=dpo,
        latent=nodes.EmptyLatentImage().generate(64, 64, 2)[0], clip_dirs=tiny_clip_dirs,
    )


def pack_internals(comfy):
    """The pack's ``nodes/comfy_internals.py`` as ComfyUI's loader imported it."""
    package = comfy.node["HGDPOLANKSampler"].__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.comfy_internals"]


def lan_ksampler(comfy, model=None, sft_model=None, sampler="dpmpp_2m", scheduler="karras", steps=4, seed=3,
                 latent=None, denoise=1.0, strength=1.0):
    result = comfy.node["HGDPOLANKSampler"].execute(
        model=comfy.dpo if model is None else model, sft_model=comfy.model if sft_model is None else sft_model,
        seed=seed, steps=steps, cfg=5.0, sampler_name=sampler, scheduler=scheduler, positive=comfy.positive,
        negative=comfy.negative, latent_image=comfy.latent if latent is None else latent, denoise=denoise,
        lan_strength=strength)
    return result.args[0]["samples"], result.args[1]["samples"]


def ksampler(comfy, model, sampler="dpmpp_2m", scheduler="karras", steps=4, seed=3, latent=None, denoise=1.0):
    return comfy.nodes.KSampler().sample(model, seed, steps, 5.0, sampler, scheduler, comfy.positive, comfy.negative,
                                         comfy.latent if latent is None else latent, denoise=denoise)[0]["samples"]


def assert_same_statistics(dpo, sft):
    """Per-sample, per-channel mean and std over (H, W) agree (LAN's Eq. 7 target)."""
    scale = sft.float().std(dim=(2, 3)).max().item()
    dims = tuple(range(2, dpo.dim()))
    torch.testing.assert_close(dpo.float().mean(dims), sft.float().mean(dims), atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(dpo.float().std(dims), sft.float().std(dims), atol=1e-4 * scale, rtol=1e-5)


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- registration, checkpoint, LoRA


def test_pack_registers_its_v3_nodes(comfy):
    for node_id in support.NODE_IDS:
        assert node_id in comfy.node, node_id
        assert comfy.node[node_id].RELATIVE_PYTHON_MODULE == f"custom_nodes.{support.PACK_NAME}"
    info = {node_id: comfy.node[node_id].GET_NODE_INFO_V1() for node_id in support.NODE_IDS}
    strength = info["HGDPOLoraLoader"]["input"]["required"]["strength"][1]
    assert strength["default"] == 0.5 and strength["display"] == "slider"
    assert info["HGDPOLoraLoader"]["input"]["required"]["lora_name"][1]["options"] == sorted(
        comfy.folder_paths.get_filename_list("loras"))
    sampler_names = info["HGDPOLANKSampler"]["input"]["required"]["sampler_name"][1]["options"]
    assert {"euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim"} <= set(sampler_names)
    assert "uni_pc" not in sampler_names
    assert {"normal", "karras"} <= set(info["HGDPOLANKSampler"]["input"]["required"]["scheduler"][1]["options"])
    assert info["HGDPOLANKSampler"]["output_name"] == ["LATENT", "sft_latent"]
    assert info["HGDPOLANGuider"]["output"] == ["GUIDER"]
    assert info["HGDPOPickScoreBestOfN"]["output_is_list"] == [False, False, True]
    assert comfy.folder_paths.get_folder_paths("pickscore")[0] == str(comfy.base / "models" / "pickscore")


def test_checkpoint_has_no_nan_and_comfyui_loads_its_text_encoder(comfy):
    """The pitfall: a CLIP saved without ``text_model.`` stays uninitialised in ComfyUI (NaN, black images)."""
    from safetensors import safe_open

    support.assert_finite_file(comfy.checkpoint)
    loaded = comfy.clip.cond_stage_model.state_dict()
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    with safe_open(str(comfy.checkpoint), framework="pt") as handle:
        saved = handle.get_tensor("cond_stage_model.transformer." + key)
    torch.testing.assert_close(loaded["clip_l.transformer." + key].float(), saved.float())
    assert torch.isfinite(comfy.positive[0][0]).all() and comfy.positive[0][0].std() > 0.1


def test_lora_node_patches_every_module_through_comfyui(comfy, caplog):
    from hgdpo.models.lora_runtime import read_lora

    modules = read_lora(comfy.lora).unet
    with caplog.at_level(logging.WARNING):
        dpo = comfy.node["HGDPOLoraLoader"].execute(model=comfy.model, lora_name=support.LORA, strength=0.5).args[0]
        stacked = comfy.node["HGDPOLoraLoader"].execute(model=dpo, lora_name=support.LORA, strength=0.25).args[0]
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(dpo.patches) == len(modules) and not comfy.model.patches  # a clone; the input stays as it was
    assert {patch[0] for patches in dpo.patches.values() for patch in patches} == {0.5}
    assert all(len(patches) == 2 for patches in stacked.patches.values())  # composes like LoraLoader
    same, clip = comfy.node["HGDPOLoraLoader"].execute(model=comfy.model, lora_name=support.LORA, strength=0.0,
                                                       clip=comfy.clip).args
    assert same is comfy.model and clip is comfy.clip
    assert relative(ksampler(comfy, dpo, steps=2), ksampler(comfy, comfy.model, steps=2)) > 1e-2


def test_lora_node_refuses_loras_of_other_architectures(comfy):
    from hgdpo.models.lora_runtime import LoRAArchitectureError

    loader = comfy.node["HGDPOLoraLoader"]
    with pytest.raises(LoRAArchitectureError, match="is an SDXL LoRA, but the model is an SD1.5 model"):
        loader.execute(model=comfy.model, lora_name="sdxl_lora.safetensors", strength=0.5)
    with pytest.raises(LoRAArchitectureError, match="made for SD2.x"):  # by its 1024-wide cross-attention
        loader.execute(model=comfy.model, lora_name="sd2_lora.safetensors", strength=0.5)
    with pytest.raises(ValueError, match="does not fit this SD15 model: 1 of 1 UNet modules are unknown to it"):
        loader.execute(model=comfy.model, lora_name="unknown_module_lora.safetensors", strength=0.5)


# --------------------------------------------------------------------------- LAN


def recording_sampler(comfy, name, states):
    """ComfyUI's sampler ``name``, recording the latent of every model evaluation (after LAN touched it)."""
    inner = comfy.samplers.sampler_object(name)
    function = inner.sampler_function

    class Recorder:
        def __init__(self, model):
            self.model = model

        def __call__(self, x, sigma, **kwargs):
            out = self.model(x, sigma, **kwargs)
            states.append(x.detach().clone())
            return out

        def __getattr__(self, item):
            return getattr(self.model, item)

    @functools.wraps(function)
    def recording(model, x, sigmas, *args, **kwargs):
        return function(Recorder(model), x, sigmas, *args, **kwargs)

    return comfy.samplers.KSAMPLER(recording, inner.extra_options, inner.inpaint_options)


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLERS)
def test_lan_guider_matches_statistics_after_every_step(comfy, sampler, scheduler):
    """SamplerCustomAdvanced + LAN Guider: at every evaluation the DPO half has the SFT half's channel statistics,
    the SFT half is exactly the stock sampler's result (same noise draws), and the DPO result differs."""
    steps, batch = 4, comfy.latent["samples"].shape[0]
    guider = comfy.node["HGDPOLANGuider"].execute(model=comfy.dpo, sft_model=comfy.model, positive=comfy.positive,
                                                  negative=comfy.negative, cfg=5.0, lan_strength=1.0).args[0]
    states = []
    sigmas = comfy.custom.BasicScheduler().get_sigmas(comfy.model, scheduler, steps, 1.0)[0]
    noise = comfy.custom.RandomNoise().get_noise(3)[0]
    output, denoised = comfy.custom.SamplerCustomAdvanced().sample(
        noise, guider, recording_sampler(comfy, sampler, states), sigmas, comfy.latent)
    evaluations_per_step = 2 if sampler == "heun" else 1
    assert len(states) >= steps * evaluations_per_step - 1 and all(s.shape[0] == 2 * batch for s in states)
    for state in states:
        assert_same_statistics(state[batch:], state[:batch])
    dpo, sft = output["samples"], guider.sft_samples
    assert dpo.shape == comfy.latent["samples"].shape and denoised["samples"].shape == dpo.shape
    assert_same_statistics(dpo, sft)
    stock = comfy.custom.SamplerCustomAdvanced().sample(
        noise, comfy.custom.CFGGuider().get_guider(comfy.model, comfy.positive, comfy.negative, 5.0)[0],
        comfy.samplers.sampler_object(sampler), sigmas, comfy.latent)[0]["samples"]
    assert relative(sft, stock) < 1e-4
    assert relative(dpo, sft) > 1e-2


def test_lan_ksampler_equals_the_guider_path_and_keeps_the_sft_chain(comfy):
    dpo, sft = lan_ksampler(comfy, sampler="euler_ancestral", scheduler="normal")
    guider = comfy.node["HGDPOLANGuider"].execute(model=comfy.dpo, sft_model=comfy.model, positive=comfy.positive,
                                                  negative=comfy.negative, cfg=5.0, lan_strength=1.0).args[0]
    sigmas = comfy.custom.BasicScheduler().get_sigmas(comfy.model, "normal", 4, 1.0)[0]
    output = comfy.custom.SamplerCustomAdvanced().sample(comfy.custom.RandomNoise().get_noise(3)[0], guider,
                                                          comfy.samplers.sampler_object("euler_ancestral"), sigmas,
                                                          comfy.latent)[0]["samples"]
    torch.testing.assert_close(dpo, output)
    torch.testing.assert_close(sft, ksampler(comfy, comfy.model, "euler_ancestral", "normal"), rtol=1e-4, atol=1e-3)
    plain = ksampler(comfy, comfy.dpo, "euler_ancestral", "normal")
    assert relative(dpo, plain) > 1e-3  # LAN changed the DPO result


def test_lan_with_the_sft_model_as_dpo_model_is_plain_sampling(comfy):
    dpo, sft = lan_ksampler(comfy, model=comfy.model, sampler="dpmpp_2m_sde")
    torch.testing.assert_close(dpo, sft, rtol=0, atol=1e-5)
    torch.testing.assert_close(sft, ksampler(comfy, comfy.model, "dpmpp_2m_sde"), rtol=1e-4, atol=1e-3)
    weak, _ = lan_ksampler(comfy, sampler="dpmpp_2m_sde", strength=0.0)  # strength 0: the DPO model's own result
    torch.testing.assert_close(weak, ksampler(comfy, comfy.dpo, "dpmpp_2m_sde"), rtol=1e-4, atol=1e-3)


def test_shared_weights_path_loads_one_copy_patches_nothing_and_equals_two_checkpoints(comfy, monkeypatch):
    """DPO = SFT + LoRA from one loader: one UNet in memory, no weight (re)patching while sampling, and the same
    result as the DPO loaded from its own checkpoint (weights merged by ComfyUI, two models in lockstep)."""
    from comfy.model_patcher import ModelPatcher

    lan_ksampler(comfy, steps=1)  # load the SFT variant once
    patched = []
    original = ModelPatcher.patch_weight_to_device

    def counting(self, key, *args, **kwargs):
        patched.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(ModelPatcher, "patch_weight_to_device", counting)
    shared, shared_sft = lan_ksampler(comfy)
    assert patched == []
    unets = [loaded for loaded in comfy.mm.current_loaded_models if loaded.model.model is comfy.model.model]
    assert len(unets) == 1 and not unets[0].model.patches  # the SFT variant, no LoRA merged in
    monkeypatch.undo()
    for hooks in (module._forward_hooks for module in comfy.model.model.modules()):
        assert not hooks  # the functional LoRA is gone after sampling

    second = comfy.sd.load_checkpoint_guess_config(str(comfy.checkpoint), output_vae=False, output_clip=False)[0]
    dpo_checkpoint = comfy.node["HGDPOLoraLoader"].execute(model=second, lora_name=support.LORA,
                                                           strength=0.5).args[0]
    separate, separate_sft = lan_ksampler(comfy, model=dpo_checkpoint)
    torch.testing.assert_close(separate_sft, shared_sft)
    assert relative(separate, shared) < 1e-4


def test_img2img_and_masks(comfy):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = comfy.nodes.VAEEncode().encode(comfy.vae, image)[0]
    dpo, sft = lan_ksampler(comfy, latent=latent, denoise=0.6, sampler="euler", scheduler="normal", steps=5)
    assert_same_statistics(dpo, sft)
    torch.testing.assert_close(sft, ksampler(comfy, comfy.model, "euler", "normal", steps=5, latent=latent,
                                             denoise=0.6), rtol=1e-4, atol=1e-3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0
    masked = comfy.nodes.SetLatentNoiseMask().set_mask(latent, mask)[0]
    dpo, sft = lan_ksampler(comfy, latent=masked, denoise=0.8, sampler="ddim", scheduler="normal")
    torch.testing.assert_close(sft, ksampler(comfy, comfy.model, "ddim", "normal", latent=masked, denoise=0.8),
                               rtol=1e-4, atol=1e-3)
    assert torch.isfinite(dpo).all()


def test_previews_progress_and_interrupt(comfy):
    """The callback (previews, progress bar) sees the DPO half; an interrupt stops sampling and leaves no hook."""
    guider = comfy.node["HGDPOLANGuider"].execute(model=comfy.dpo, sft_model=comfy.model, positive=comfy.positive,
                                                  negative=comfy.negative, cfg=5.0, lan_strength=1.0).args[0]
    sigmas = comfy.custom.BasicScheduler().get_sigmas(comfy.model, "karras", 4, 1.0)[0]
    noise = comfy.custom.RandomNoise().get_noise(3)[0].generate_noise(comfy.latent)
    seen = []
    guider.sample(noise, comfy.latent["samples"], comfy.samplers.sampler_object("euler"), sigmas,
                  callback=lambda step, x0, x, total: seen.append((step, x0.shape[0], x.shape[0], total)))
    assert seen == [(step, 2, 2, 4) for step in range(4)]

    progress = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        progress.append(value)
        if value == 2:
            comfy.mm.interrupt_current_processing(True)
        comfy.mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            lan_ksampler(comfy, steps=6)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.mm.interrupt_current_processing(False)
    assert progress == [1, 2]
    assert not any(module._forward_hooks for module in comfy.model.model.modules())
    lan_ksampler(comfy, steps=1)  # and the next run works


def test_lan_refuses_models_of_another_family_and_unsupported_samplers(comfy):
    sd2 = comfy.nodes.UNETLoader().load_unet("sd2_unet.safetensors", "default")[0]
    assert type(sd2.model.model_config).__name__ == "SD20"
    with pytest.raises(ValueError, match="DPO model .* is SD15 with 4 latent channels, the SFT model .* is SD20"):
        lan_ksampler(comfy, sft_model=sd2)
    with pytest.raises(ValueError, match="SFT model has weight patches the DPO model lacks"):
        lan_ksampler(comfy, model=comfy.model, sft_model=comfy.dpo)  # the two inputs swapped
    guider = comfy.node["HGDPOLANGuider"].execute(model=comfy.dpo, sft_model=comfy.model, positive=comfy.positive,
                                                  negative=comfy.negative, cfg=5.0, lan_strength=1.0).args[0]
    sigmas = comfy.custom.BasicScheduler().get_sigmas(comfy.model, "karras", 2, 1.0)[0]
    with pytest.raises(ValueError, match="sample_unipc is not supported by LAN"):
        comfy.custom.SamplerCustomAdvanced().sample(comfy.custom.RandomNoise().get_noise(0)[0], guider,
                                                    comfy.samplers.sampler_object("uni_pc"), sigmas, comfy.latent)


def test_the_pack_finds_every_comfyui_internal_it_uses(comfy):
    internals = pack_internals(comfy)
    assert internals.comfyui_version() == support.comfy_version(comfy.path) != "unknown"
    assert internals.missing_internals() == []
    assert {"euler", "dpmpp_2m", "ddim"} <= set(internals.lan_sampler_names())
    assert not {"uni_pc", "uni_pc_bh2"} & set(internals.lan_sampler_names())  # detected: they rescale the latent


def test_a_missing_internal_fails_before_sampling_and_names_the_version(comfy, monkeypatch):
    """An older or newer ComfyUI without an internal: one clear message, before any model is loaded or sampled."""
    internals = pack_internals(comfy)
    version = internals.comfyui_version()
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, *rest, **kwargs: progress.append(value))
    monkeypatch.delattr(comfy.samplers.CFGGuider, "inner_sample")
    try:
        with pytest.raises(internals.ComfyUIVersionError) as raised:
            lan_ksampler(comfy, steps=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    message = str(raised.value)
    assert f"HG-DPO LAN cannot run on ComfyUI {version}: it lacks comfy.samplers.CFGGuider.inner_sample." in message
    assert "Update ComfyUI" in message and "\n" not in message and progress == []
    monkeypatch.undo()

    def old_load_torch_file(ckpt, safe_load=False, device=None):  # a loader without return_metadata
        raise AssertionError("must not be called")

    monkeypatch.setattr(comfy.utils, "load_torch_file", old_load_torch_file)
    with pytest.raises(internals.ComfyUIVersionError, match=r"LoRA cannot run .* comfy\.utils\.load_torch_file\("
                                                            r"return_metadata=\)"):
        comfy.node["HGDPOLoraLoader"].execute(model=comfy.model, lora_name=support.LORA, strength=0.5)
    monkeypatch.undo()
    lan_ksampler(comfy, steps=1)  # and with everything back, it runs


def test_lan_refuses_bad_strengths_samplers_and_patches_with_the_input_named(comfy):
    from comfy.weight_adapter.loha import LoHaAdapter

    guider = comfy.node["HGDPOLANGuider"]
    with pytest.raises(ValueError, match=r"LAN strength must lie in \[0, 1\], got 1.5"):
        guider.execute(model=comfy.dpo, sft_model=comfy.model, positive=comfy.positive, negative=comfy.negative,
                       cfg=5.0, lan_strength=1.5)

    class OwnSampler:  # a SAMPLER that is not one of ComfyUI's k-diffusion KSAMPLERs
        def sample(self, *args, **kwargs):
            raise AssertionError("must not be called")

    lan = guider.execute(model=comfy.dpo, sft_model=comfy.model, positive=comfy.positive, negative=comfy.negative,
                         cfg=5.0, lan_strength=1.0).args[0]
    sigmas = comfy.custom.BasicScheduler().get_sigmas(comfy.model, "karras", 2, 1.0)[0]
    with pytest.raises(ValueError, match="runs ComfyUI's k-diffusion samplers .* got a OwnSampler"):
        comfy.custom.SamplerCustomAdvanced().sample(comfy.custom.RandomNoise().get_noise(0)[0], lan, OwnSampler(),
                                                    sigmas, comfy.latent)
    loha = comfy.model.clone()
    key = next(iter(comfy.dpo.patches))
    loha.add_patches({key: LoHaAdapter(set(), (None,) * 8)}, 1.0)
    with pytest.raises(ValueError, match=f"plain LoRA patches only; the DPO model has a 'loha' patch on {key}"):
        lan_ksampler(comfy, model=loha)


# --------------------------------------------------------------------------- PickScore


def images(count=4, size=48):
    generator = torch.Generator().manual_seed(1)
    return torch.rand(count, size, size, 3, generator=generator)


def test_pickscore_best_of_n_ranks_by_the_reference_scores(comfy):
    from PIL import Image

    from hgdpo.feedback.scorers import PickScoreScorer

    loader = comfy.node["HGDPOPickScoreLoader"]
    options = loader.GET_NODE_INFO_V1()["input"]["required"]["model"][1]["options"]
    assert options[0] == "yuvalkirstain/PickScore_v1" and support.PICKSCORE_MODEL in options
    pickscore = loader.execute(model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                               precision="auto").args[0]  # the hub ids resolve to models/pickscore/<name>
    batch = images()
    prompt = "a woman singing on the stage"
    result = comfy.node["HGDPOPickScoreBestOfN"].execute(pickscore=pickscore, images=batch, prompt=prompt)
    best, ranked, scores = result.args
    reference = PickScoreScorer(model=comfy.clip_dirs["model"], processor=comfy.clip_dirs["processor"])
    pixels = [Image.fromarray((frame * 255).round().to(torch.uint8).numpy()) for frame in batch]
    expected = reference.score([prompt] * len(pixels), pixels)
    order = torch.argsort(expected, descending=True, stable=True)
    assert scores == pytest.approx(expected[order].tolist(), rel=1e-5)  # raw values, not softmaxed
    torch.testing.assert_close(ranked, batch[order])
    torch.testing.assert_close(best, batch[order[:1]])
    assert result.ui is not None
    assert any(loaded.model is pickscore.patcher for loaded in comfy.mm.current_loaded_models)
    comfy.mm.unload_all_models()  # ComfyUI offloads it under memory pressure; it loads again to score
    again = comfy.node["HGDPOPickScoreBestOfN"].execute(pickscore=pickscore, images=batch, prompt=prompt).args[2]
    assert again == pytest.approx(scores, rel=1e-5)


def test_missing_pickscore_weights_name_the_folder_and_the_download_command(comfy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loader = comfy.node["HGDPOPickScoreLoader"]
    folder = str(comfy.base / "models" / "pickscore")
    from hgdpo.feedback.scorers import ScorerWeightsError

    with pytest.raises(ScorerWeightsError) as raised:
        loader.execute(model="yuvalkirstain/PickScore_v1", processor="laion/not-downloaded-processor",
                       precision="fp32")
    message = str(raised.value)
    assert folder in message and "huggingface-cli download yuvalkirstain/PickScore_v1" in message
    assert f"--local-dir {folder}/PickScore_v1" in message and "hf download" in message
    empty = comfy.base / "models" / "pickscore" / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ScorerWeightsError, match="config.json is missing"):
        loader.execute(model="empty", processor=support.PICKSCORE_PROCESSOR, precision="fp32")


def test_best_of_n_refuses_an_empty_batch(comfy):
    pickscore = comfy.node["HGDPOPickScoreLoader"].execute(
        model=support.PICKSCORE_MODEL, processor=support.PICKSCORE_PROCESSOR, precision="fp32").args[0]
    with pytest.raises(ValueError, match="empty batch"):
        comfy.node["HGDPOPickScoreBestOfN"].execute(pickscore=pickscore, images=torch.zeros(0, 48, 48, 3), prompt="x")


# --------------------------------------------------------------------------- SDXL (full-size random checkpoint)

SDXL_SAMPLERS = [("dpmpp_2m", "karras"), ("euler_ancestral", "normal")]


@contextlib.contextmanager
def fp16_unet():
    """ComfyUI's ``--fp16-unet`` while a checkpoint loads: the UNet is stored in fp16 (computed in fp32 on the
    CPU, ComfyUI's manual cast), half the RAM of ComfyUI's CPU default (fp32)."""
    from comfy.cli_args import args

    previous, args.fp16_unet = args.fp16_unet, True
    try:
        yield
    finally:
        args.fp16_unet = previous


def load_sdxl_unet(comfy, path):
    """A second copy of an SDXL checkpoint's UNet (its own weights), as a second checkpoint loader gives."""
    with fp16_unet():
        return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


def free(comfy) -> None:
    """Unload the models and collect the ones no longer referenced (RAM: a full SDXL UNet is 5 GB in fp16)."""
    comfy.mm.unload_all_models()
    gc.collect()


@pytest.fixture(scope="module")
def sdxl(comfy):
    """The full-size random SDXL base (``HGDPO_SDXL_CHECKPOINT``) through CheckpointLoaderSimple (fp16 UNet), its
    conditioning, the two SDXL LoRAs of :func:`support.write_sdxl_loras` and the HG-DPO LoRA node's DPO model;
    the same attributes as ``comfy``, so the helpers above run on it. Sampled at 64x64 pixels (8x8 latents)."""
    checkpoint = support.sdxl_checkpoint()
    link = comfy.base / "models" / "checkpoints" / support.SDXL_CHECKPOINT
    if not link.exists():
        link.symlink_to(checkpoint)
    support.write_sdxl_loras(comfy.base / "models" / "loras")
    with fp16_unet():
        model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(support.SDXL_CHECKPOINT)[:3]
    encode = comfy.nodes.CLIPTextEncode().encode
    dpo = comfy.node["HGDPOLoraLoader"].execute(model=model, lora_name=support.SDXL_LORA, strength=0.5).args[0]
    env = SimpleNamespace(**{**vars(comfy), "model": model, "clip": clip, "vae": vae, "dpo": dpo,
                             "positive": encode(clip, "a woman singing on the stage, photo")[0],
                             "negative": encode(clip, "lowres, bad anatomy")[0],
                             "latent": comfy.nodes.EmptyLatentImage().generate(64, 64, 1)[0], "checkpoint": checkpoint})
    yield env
    del env, model, clip, vae, dpo
    free(comfy)


def lora_modules(path) -> set[str]:
    """The module names of a kohya LoRA file (``lora_unet_input_blocks_4_1_..._to_q``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in handle.keys()}  # noqa: SIM118


def assert_no_lora_key_warnings(text: str) -> None:
    assert "lora key not loaded" not in text and "NOT LOADED" not in text, text[-3000:]


def test_sdxl_checkpoint_loads_as_sdxl_with_pooled_and_size_conditioning(sdxl, comfy):
    internals = pack_internals(comfy)
    from hgdpo.models.families import SD15, SDXL

    assert internals.model_family(sdxl.model) == ("SDXL", 4)
    assert internals.core_family(sdxl.model) is SDXL and internals.core_family(comfy.model) is SD15
    assert sdxl.model.model.model_type.name == "EPS"
    assert internals.compute_dtype(sdxl.model) == torch.float32  # fp16 weights, computed in fp32 on the CPU
    context, extra = sdxl.positive[0]
    assert context.shape[-1] == 2048 and extra["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(context).all() and context.std() > 0.1


@pytest.mark.parametrize("lora_name", [support.SDXL_LORA, support.SDXL_TE_LORA])
def test_sdxl_loras_written_by_hgdpo_load_in_comfyui_with_zero_unmatched_keys(sdxl, comfy, caplog, lora_name):
    """ComfyUI's own key maps know every module of the SDXL LoRAs hgdpo writes (UNet: kohya's SGM names;
    text encoders: lora_te1_/lora_te2_), and the HG-DPO LoRA node patches each one, with no warning."""
    import comfy.lora as comfy_lora
    import comfy.lora_convert as comfy_lora_convert

    path = comfy.base / "models" / "loras" / lora_name
    modules = lora_modules(path)
    unet_modules = {name for name in modules if name.startswith("lora_unet_")}
    key_map = comfy_lora.model_lora_keys_unet(sdxl.model.model, {})
    comfy_lora.model_lora_keys_clip(sdxl.clip.cond_stage_model, key_map)
    assert modules - set(key_map) == set()
    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(comfy_lora_convert.convert_lora(state_dict), key_map)
        dpo, dpo_clip = comfy.node["HGDPOLoraLoader"].execute(model=sdxl.model, lora_name=lora_name, strength=0.5,
                                                              clip=sdxl.clip).args
        unet_only = comfy.node["HGDPOLoraLoader"].execute(model=sdxl.model, lora_name=lora_name,
                                                          strength=0.5).args[0]
    assert_no_lora_key_warnings(caplog.text)
    assert len(patches) == len(modules)
    assert len(dpo.patches) == len(unet_modules) == len(unet_only.patches) == 70 * 2 * 4
    assert len(dpo_clip.patcher.patches) == len(modules) - len(unet_modules)
    if lora_name == support.SDXL_TE_LORA:  # both text encoders: CLIP-L's 12 and bigG's 32 layers, 4 linears each
        assert len(dpo_clip.patcher.patches) == (12 + 32) * 4
        prefixes = {key.split(".")[0] for key in dpo_clip.patcher.patches}
        assert prefixes == {"clip_l", "clip_g"}
    print(f"{lora_name}: {len(modules)} modules, {len(modules - set(key_map))} unmatched")


def test_sdxl_lora_node_refuses_a_lora_of_the_other_family_before_sampling(sdxl, comfy):
    from hgdpo.models.lora_runtime import LoRAArchitectureError

    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, *rest, **kwargs: progress.append(value))
    loader = comfy.node["HGDPOLoraLoader"]
    try:
        with pytest.raises(LoRAArchitectureError, match="is an SD1.5 LoRA, but the model is an SDXL model"):
            loader.execute(model=sdxl.model, lora_name=support.LORA, strength=0.5)
        with pytest.raises(LoRAArchitectureError, match="is an SDXL LoRA, but the model is an SD1.5 model"):
            loader.execute(model=comfy.model, lora_name=support.SDXL_LORA, strength=0.5, clip=comfy.clip)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert progress == [] and not sdxl.model.patches and not comfy.model.patches


@pytest.mark.parametrize(("sampler", "scheduler"), SDXL_SAMPLERS)
def test_sdxl_lan_guider_matches_statistics_after_every_step_and_keeps_the_stock_sft_chain(sdxl, sampler, scheduler):
    """SDXL conditioning (cross-attention context, pooled ``y`` with the size conditioning) through both
    lockstep halves: the DPO half takes the SFT half's channel statistics at every evaluation, the SFT half is
    the stock SDXL sampler's result, and the LoRA changes the DPO result."""
    steps, batch = 3, sdxl.latent["samples"].shape[0]
    guider = sdxl.node["HGDPOLANGuider"].execute(model=sdxl.dpo, sft_model=sdxl.model, positive=sdxl.positive,
                                                 negative=sdxl.negative, cfg=6.0, lan_strength=1.0).args[0]
    states = []
    sigmas = sdxl.custom.BasicScheduler().get_sigmas(sdxl.model, scheduler, steps, 1.0)[0]
    noise = sdxl.custom.RandomNoise().get_noise(3)[0]
    output = sdxl.custom.SamplerCustomAdvanced().sample(noise, guider, recording_sampler(sdxl, sampler, states),
                                                        sigmas, sdxl.latent)[0]
    assert len(states) >= steps - 1 and all(state.shape[0] == 2 * batch for state in states)
    for state in states:
        assert_same_statistics(state[batch:], state[:batch])
    dpo, sft = output["samples"], guider.sft_samples
    assert dpo.shape == sdxl.latent["samples"].shape == (1, 4, 8, 8)
    assert_same_statistics(dpo, sft)
    stock = sdxl.custom.SamplerCustomAdvanced().sample(
        noise, sdxl.custom.CFGGuider().get_guider(sdxl.model, sdxl.positive, sdxl.negative, 6.0)[0],
        sdxl.samplers.sampler_object(sampler), sigmas, sdxl.latent)[0]["samples"]
    assert relative(sft, stock) < 1e-4
    assert relative(dpo, sft) > 1e-2


def test_sdxl_lan_refuses_mixing_an_sd15_and_an_sdxl_model_before_sampling(sdxl, comfy):
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, *rest, **kwargs: progress.append(value))
    try:
        with pytest.raises(ValueError, match=r"DPO model \('model'\) is SDXL with 4 latent channels, the SFT model "
                                             r"\('sft_model'\) is SD15 with 4"):
            lan_ksampler(sdxl, sft_model=comfy.model, steps=2)
        with pytest.raises(ValueError, match=r"DPO model \('model'\) is SD15 .* SFT model \('sft_model'\) is SDXL"):
            comfy.node["HGDPOLANGuider"].execute(model=comfy.dpo, sft_model=sdxl.model, positive=comfy.positive,
                                                 negative=comfy.negative, cfg=5.0, lan_strength=1.0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert progress == []


def test_sdxl_shared_weights_path_equals_two_checkpoints_and_its_sft_half_is_stock_sampling(sdxl, comfy):
    """LAN KSampler on SDXL: DPO = SFT + HG-DPO LoRA from one loader (one UNet, the LoRA per row) gives the
    result of the DPO loaded as its own checkpoint (the LoRA merged by ComfyUI into fp16 weights, two UNets in
    lockstep, each given its rows of ``y`` and the context); the SFT half is the stock KSampler's."""
    shared, shared_sft = lan_ksampler(sdxl, steps=3)
    assert_same_statistics(shared, shared_sft)
    torch.testing.assert_close(shared_sft, ksampler(sdxl, sdxl.model, steps=3), rtol=1e-4, atol=1e-3)
    second = load_sdxl_unet(sdxl, sdxl.checkpoint)
    dpo = sdxl.node["HGDPOLoraLoader"].execute(model=second, lora_name=support.SDXL_LORA, strength=0.5).args[0]
    separate, separate_sft = lan_ksampler(sdxl, model=dpo, steps=3)
    del second, dpo
    free(comfy)
    # the SFT half of two checkpoints is the stock KSampler's (2 rows per call) bit for bit; the shared path runs
    # SFT and DPO rows in one call, which rounds differently (ComfyUI 0.3.64, CPU: 1.6e-3 of values up to 549)
    torch.testing.assert_close(separate_sft, shared_sft, rtol=1e-4, atol=1e-3)
    # the merged weights are rounded to fp16 (the shared path adds the LoRA in fp32): agreement to ~1e-3
    assert relative(separate, shared) < 5e-3
    assert relative(shared, shared_sft) > 5e-2


def test_sdxl_v_prediction_checkpoint_samples_with_lan(sdxl, comfy):
    """A NoobAI-style v-prediction SDXL (``v_pred`` and ``ztsnr`` markers): ComfyUI samples it as V_PREDICTION
    with zero terminal SNR, the HG-DPO LoRA loads on it and LAN keeps the stock SFT chain."""
    path = support.sdxl_checkpoint(support.SDXL_VPRED_VARIABLE)
    vpred = load_sdxl_unet(sdxl, path)
    prediction = vpred.model.model_type.name, vpred.model.model_config.sampling_settings.get("zsnr")
    dpo = sdxl.node["HGDPOLoraLoader"].execute(model=vpred, lora_name=support.SDXL_LORA, strength=0.5).args[0]
    lan, sft = lan_ksampler(sdxl, model=dpo, sft_model=vpred, sampler="euler", scheduler="normal", steps=3)
    stock = ksampler(sdxl, vpred, "euler", "normal", steps=3)
    del vpred, dpo
    free(comfy)
    assert prediction == ("V_PREDICTION", True)
    assert torch.isfinite(lan).all()
    assert_same_statistics(lan, sft)
    torch.testing.assert_close(sft, stock, rtol=1e-4, atol=1e-3)
    assert relative(lan, sft) > 1e-2
