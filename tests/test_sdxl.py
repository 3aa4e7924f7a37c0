"""SDXL family: single files (SGM keys) and folders loaded offline, detection, refusals, kohya LoRA names."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hgdpo.models.families import SD15, SDXL, detect_checkpoint_family, detect_prediction, micro_conditioning
from hgdpo.models.loading import ModelFamilyError, SDXLComponents, clip_tokenizer, load_model, load_sd15
from hgdpo.models.lora import add_lora, kohya_metadata, lora_parameters, lora_state_dict, save_kohya_lora
from tests import sd15_factory, sdxl_factory


@pytest.fixture(scope="module")
def xl_models():
    configs = sdxl_factory.tiny_sdxl_configs()
    return configs, sdxl_factory.build_models(configs, seed=0)


@pytest.fixture(scope="module")
def xl_config_dir(xl_models, tmp_path_factory):
    return sdxl_factory.save_config_folder(xl_models[0], tmp_path_factory.mktemp("xl-configs"))


@pytest.fixture(scope="module")
def xl_file(xl_models, tmp_path_factory):
    return sdxl_factory.save_single_file(xl_models[1], tmp_path_factory.mktemp("xl-file") / "xl.safetensors")


@pytest.fixture(scope="module")
def xl_loaded(xl_file, xl_config_dir):
    return load_model(xl_file, config_dir=xl_config_dir)


def _added(batch: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"text_embeds": torch.randn(batch, 48, generator=generator), "time_ids": micro_conditioning((64, 64), (0, 0), (64, 64), batch)}


def _unet_output(unet, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context, added_cond_kwargs=_added(), **kwargs).sample


def test_sgm_single_file_loads_offline_and_matches_the_original(xl_models, xl_loaded):
    _, models = xl_models
    assert isinstance(xl_loaded, SDXLComponents) and xl_loaded.family is SDXL
    torch.testing.assert_close(_unet_output(xl_loaded.unet), _unet_output(models["unet"]))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(xl_loaded.vae.encode(image).latent_dist.mean, models["vae"].encode(image).latent_dist.mean)
        ours = xl_loaded.encode_prompts(["a portrait of a woman", "two kids"], size=(64, 96))
        reference = SDXL.encode_prompts(["a portrait of a woman", "two kids"], xl_loaded.tokenizers,
                                        (models["text_encoder"], models["text_encoder_2"]), (64, 96))
    torch.testing.assert_close(ours.context, reference.context)
    torch.testing.assert_close(ours.added["text_embeds"], reference.added["text_embeds"])
    assert ours.context.shape == (2, 77, 32 + 48) and ours.added["text_embeds"].shape == (2, 48)
    assert ours.added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    assert xl_loaded.noise_scheduler.config.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in xl_loaded.text_encoder_2.parameters())


def test_sdxl_conditioning_is_penultimate_layers_concatenated(xl_loaded):
    ids = clip_tokenizer()(["a cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        cond = xl_loaded.encode_prompts(["a cat"])
        clip_l = xl_loaded.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cond.context[..., :32], clip_l)
    assert cond.added["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]]  # the family's default size


def test_second_tokenizer_pads_with_exclamation_mark(xl_loaded):
    first = xl_loaded.tokenizer(["a cat"], padding="max_length").input_ids[0]
    second = xl_loaded.tokenizer_2(["a cat"], padding="max_length").input_ids[0]
    length = first.index(49407) + 1
    assert first[:length] == second[:length]
    assert set(first[length:]) == {49407} and set(second[length:]) == {0}


def test_diffusers_folder_loads_and_sd15_loader_refuses_it(xl_models, tmp_path):
    configs, models = xl_models
    folder = sdxl_factory.save_diffusers_folder(models, configs, tmp_path / "xl")
    loaded = load_model(folder)
    assert loaded.family is SDXL and loaded.tokenizer_2.pad_token == "!"
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(models["unet"]))
    with pytest.raises(ModelFamilyError, match="SDXL model, but an SD1.5"):
        load_sd15(folder)


def test_sd15_still_loads_through_the_seam(tiny_single_file, tiny_model_dir):
    loaded = load_model(tiny_single_file, config_dir=tiny_model_dir)
    assert loaded.family is SD15 and not isinstance(loaded, SDXLComponents)
    cond = loaded.encode_prompts(["a cat"])
    assert cond.added is None and cond.context.shape == (1, 77, 32)


def test_family_detection_of_sdxl_pony_and_sd15_files(tmp_path, xl_file, tiny_single_file):
    assert detect_checkpoint_family(load_file(xl_file)) == "sdxl"
    # Pony/Illustrious/NoobAI are SDXL base fine-tunes: the same keys at SDXL's real widths
    pony = sd15_factory.save_fake_sdxl_checkpoint(tmp_path / "ponyDiffusionV6XL.safetensors")
    assert detect_checkpoint_family(load_file(pony)) == "sdxl"
    assert detect_checkpoint_family(load_file(tiny_single_file)) == "sd1"


def test_v_prediction_marker_sets_the_scheduler(xl_models, xl_config_dir, tmp_path):
    marker = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    path = sdxl_factory.save_single_file(xl_models[1], tmp_path / "noobai-vpred.safetensors", extra=marker)
    assert detect_checkpoint_family(load_file(path)) == "sdxl"
    scheduler = load_model(path, config_dir=xl_config_dir).noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR: the last step is pure noise


def test_prediction_type_from_metadata_and_forced(xl_file, xl_config_dir):
    assert detect_prediction({}, {"modelspec.prediction_type": "v"}).type == "v_prediction"
    assert detect_prediction({}, {"modelspec.prediction_type": "epsilon"}).type == "epsilon"
    assert detect_prediction({}, {}) is None
    forced = load_model(xl_file, config_dir=xl_config_dir, prediction_type="v_prediction", zero_terminal_snr=True)
    assert forced.noise_scheduler.config.prediction_type == "v_prediction"
    assert forced.noise_scheduler.config.rescale_betas_zero_snr
    with pytest.raises(ValueError, match="prediction type"):
        load_model(xl_file, config_dir=xl_config_dir, prediction_type="flow")


def _save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda models, tmp: _save(sdxl_factory.refiner_state_dict(models), tmp / "refiner.safetensors"), "refiner"),
        (lambda models, tmp: _save(sdxl_factory.inpainting_state_dict(models), tmp / "inpaint.safetensors"), "SDXL inpainting"),
        (lambda models, tmp: sd15_factory.save_fake_sd2_checkpoint(tmp / "sd2.safetensors"), "Stable Diffusion 2"),
        (lambda models, tmp: sdxl_factory.save_fake("sd3", tmp / "sd3.safetensors"), "Stable Diffusion 3"),
        (lambda models, tmp: sdxl_factory.save_fake("flux", tmp / "flux.safetensors"), "Flux"),
    ],
)
def test_unsupported_kinds_are_refused_by_name(xl_models, tmp_path, make, expected):
    path = make(xl_models[1], tmp_path)
    with pytest.raises(ModelFamilyError, match=expected):
        load_model(path)


def test_sd15_loader_refuses_an_sdxl_file(xl_file):
    with pytest.raises(ModelFamilyError, match="SDXL"):
        load_sd15(xl_file)


def test_family_constants():
    assert (SD15.latent_scale, SD15.default_resolution) == (0.18215, 512)
    assert (SDXL.latent_scale, SDXL.default_resolution) == (0.13025, 1024)
    assert all(w % 64 == 0 and h % 64 == 0 and abs(w * h - 1024**2) <= 0.1 * 1024**2 for w, h in SDXL.buckets)
    assert [slot.lora_prefix for slot in SDXL.text_encoders] == ["lora_te1_", "lora_te2_"]
    assert SD15.text_encoders[0].lora_prefix == "lora_te_"


def _pipeline(models):
    """A diffusers ``StableDiffusionXLPipeline`` of the models (as users load LoRAs with diffusers)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"), unet=models["unet"],
        scheduler=EulerDiscreteScheduler.from_pretrained(SDXL.config_dir, subfolder="scheduler"),
    )


def test_kohya_sdxl_lora_loads_into_diffusers_with_every_key_matched(xl_models, tmp_path):
    configs, _ = xl_models
    trained = sdxl_factory.build_models(configs, seed=0)["unet"]
    add_lora(trained, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in lora_parameters(trained):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    metadata = kohya_metadata(rank=4, alpha=4.0, title="xl", resolution=(64, 64), base_model="tiny",
                              base_model_hash=None, training={}, hgdpo={}, family=SDXL)
    path = save_kohya_lora(tmp_path / "xl-lora.safetensors", lora_state_dict(trained), 4.0, metadata,
                           dtype=torch.float32, names=SDXL.kohya_unet_names(trained))
    keys = load_file(path).keys()
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for m in modules)
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in modules

    pipe = _pipeline(sdxl_factory.build_models(configs, seed=0))
    pipe.load_lora_weights(str(path))
    loaded_adapters = [name for name, _ in pipe.unet.named_modules() if name.endswith("lora_A")]
    assert len(loaded_adapters) == len(modules)  # every kohya module found its UNet layer
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(trained))
    with torch.no_grad():
        trained.disable_adapters()
    assert not torch.allclose(_unet_output(trained), _unet_output(pipe.unet))  # the LoRA does act
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_bundled_sdxl_configs_build_the_real_architecture_and_kohya_names():
    """SDXL base 1.0 at full size (on the meta device): parameter counts and kohya's SGM LoRA names."""
    import json

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((SDXL.config_dir / "unet" / "config.json").read_text()))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL.config_dir / "text_encoder_2"))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 2567
    assert round(sum(p.numel() for p in bigg.parameters()) / 1e6) == 695
    names = SDXL.kohya_unet_names(unet)
    attention = {path: name for path, name in names.items() if path.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert len(attention) == 70 * 2 * 4  # 70 transformer blocks, self- and cross-attention
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
                     "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
                     "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v"):
        assert expected in attention.values()
    assert names["down_blocks.0.downsamplers.0.conv"] == "lora_unet_input_blocks_3_0_op"
    assert names["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"
    assert names["down_blocks.1.resnets.0.conv1"] == "lora_unet_input_blocks_4_0_in_layers_2"
    assert len(set(names.values())) == len(names)


def test_kohya_sdxl_text_encoder_lora_names_load_into_diffusers(xl_models, tmp_path):
    configs, _ = xl_models
    models = sdxl_factory.build_models(configs, seed=0)
    layers = SDXL.kohya_text_encoder_layers((models["text_encoder"], models["text_encoder_2"]))
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp_fc1", "mlp_fc2")  # what kohya trains
    chosen = {name: module for name, module in layers.items() if name.endswith(targets)}
    assert {name.split("_text_model_")[0] for name in chosen} == {"lora_te1", "lora_te2"}
    generator = torch.Generator().manual_seed(2)
    tensors = {}
    for name, module in chosen.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "te-lora.safetensors"
    save_file(tensors, str(path))
    pipe = _pipeline(models)
    pipe.load_lora_weights(str(path))
    adapted = [name for encoder in (pipe.text_encoder, pipe.text_encoder_2)
               for name, _ in encoder.named_modules() if name.endswith("lora_A")]
    assert len(adapted) == len(chosen)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in SD15.kohya_text_encoder_layers((models["text_encoder"],))
