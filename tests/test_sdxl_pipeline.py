"""HG-DPO end to end on an SDXL single file: the builder, the trainer and LAN sampling, as a user runs them.

The model is a tiny SDXL-structured random-weight checkpoint in the SGM single-file layout of Civitai downloads
(:mod:`tests.sdxl_factory`), so the family seam is exercised for real: two text encoders, the pooled embedding
and size conditioning, SDXL's kohya LoRA names, v-prediction.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hgdpo.data.readers import open_preference_dataset
from hgdpo.inference.lan import channel_statistics
from hgdpo.inference.sampling import ImageGenerator, SamplingConfig
from hgdpo.models.families import SD15, SDXL, ModelFamilyError
from hgdpo.models.loading import ModelOptions, load_model
from hgdpo.models.lora_runtime import LoRAArchitectureError, read_lora
from tests import sd15_factory, sdxl_factory

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--resolution", "64", "--any-resolution")  # a tiny random model: far below SDXL's buckets on purpose


def run(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "trainer" / script), *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT, timeout=900)
    if check and result.returncode:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(single file, config folder) of a tiny SDXL model."""
    configs = sdxl_factory.tiny_sdxl_configs(layers_per_block=1)
    root = tmp_path_factory.mktemp("xl")
    path = sdxl_factory.save_single_file(sdxl_factory.build_models(configs, seed=0), root / "tiny-xl.safetensors")
    return path, sdxl_factory.save_config_folder(configs, root / "configs")


@pytest.fixture(scope="module")
def built(xl, tmp_path_factory):
    """A dataset built from the SDXL model with a negative prompt and CFG."""
    model, configs = xl
    root = tmp_path_factory.mktemp("xl-build")
    prompts = root / "prompts.txt"
    prompts.write_text("a woman dancing\na man reading a book\n")
    out = root / "dataset"
    run("build_dataset.py", "--model", model, "--model-config-dir", configs, "--prompts", prompts,
        "--output-dir", out, "--pool-size", 3, "--steps", 2, "--cfg", 4, "--negative-prompt", "blurry",
        "--batch-size", 3, "--scorer", "tests.test_builder:warmth_scorer", *TINY)
    return out


@pytest.fixture(scope="module")
def trained(xl, built, tmp_path_factory):
    """(output folder, LoRA path) of a 2-step HG-DPO run with checkpoints and validation images."""
    model, configs = xl
    out = tmp_path_factory.mktemp("xl-train")
    run("train.py", "--model", model, "--model-config-dir", configs, "--dataset", built, "--output-dir", out,
        "--max-steps", 2, "--batch-size", 1, "--effective-batch-size", 2, "--optimizer", "adamw",
        "--learning-rate", "1e-3", "--checkpointing-steps", 1, "--validation-steps", 2,
        "--validation-inference-steps", 2, "--validation-seeds", 0, "--cache-dir", out / "cache", *TINY)
    return out, out / "hgdpo_lora.safetensors"


def test_builder_refuses_a_size_off_the_buckets_before_loading(xl, tmp_path):
    model, configs = xl
    prompts = tmp_path / "p.txt"
    prompts.write_text("a person\n")
    result = run("build_dataset.py", "--model", model, "--model-config-dir", configs, "--prompts", prompts,
                 "--output-dir", tmp_path / "out", "--resolution", "512", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "512x512 is far from the SDXL buckets" in result.stderr and "1024x1024" in result.stderr
    assert "--any-resolution" in result.stderr and not (tmp_path / "out" / "records").exists()


def test_sdxl_dataset_has_pairs_at_the_given_size(built):
    dataset = open_preference_dataset(built)
    assert len(dataset) == 2 and dataset.info.pool_size == 3
    win, lose = dataset.load_pair(0)
    assert win.size == lose.size == (64, 64)


def test_trainer_writes_an_sdxl_kohya_lora_and_resumes(xl, built, trained):
    out, lora_path = trained
    with safe_open(str(lora_path), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["modelspec.architecture"] == SDXL.modelspec_architecture
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["modelspec.prediction_type"] == "epsilon"
    assert keys and all(key.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                        "lora_unet_output_blocks_")) for key in keys)
    lora = read_lora(lora_path, family=SDXL)
    assert any(module.up.abs().max() > 0 for module in lora.unet.values())  # it trained (up starts at zero)
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-00000002.png"]
    model, configs = xl
    resumed = run("train.py", "--model", model, "--model-config-dir", configs, "--dataset", built,
                  "--output-dir", out, "--max-steps", 3, "--batch-size", 1, "--effective-batch-size", 2,
                  "--optimizer", "adamw", "--learning-rate", "1e-3", "--checkpointing-steps", 1,
                  "--validation-steps", 0, "--resume", "latest", "--cache-dir", out / "cache", *TINY)
    assert "Resumed from" in resumed.stderr and "step 2" in resumed.stderr


def test_v_prediction_forced_on_the_command_line(xl, built, tmp_path):
    model, configs = xl
    forced = ModelOptions(prediction_type="v_prediction", zero_terminal_snr="on").load(model, configs)
    assert forced.noise_scheduler.config.prediction_type == "v_prediction"
    assert forced.noise_scheduler.config.rescale_betas_zero_snr
    run("train.py", "--model", model, "--model-config-dir", configs, "--dataset", built, "--output-dir", tmp_path,
        "--max-steps", 1, "--batch-size", 1, "--effective-batch-size", 1, "--optimizer", "adamw",
        "--validation-steps", 0, "--prediction-type", "v_prediction", "--zero-terminal-snr", "on",
        "--cache-dir", tmp_path / "cache", *TINY)
    with safe_open(str(tmp_path / "hgdpo_lora.safetensors"), framework="pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"


def test_sample_cli_with_the_lora_and_lan(xl, trained, tmp_path):
    model, configs = xl
    run("sample.py", "--model", model, "--model-config-dir", configs, "--lora", trained[1], "--lan",
        "--save-sft", "--steps", 2, "--width", 64, "--height", 64, "--any-resolution", "--prompt", "a person",
        "--output-dir", tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-0-sft.png", "00000-0.png"]


@pytest.fixture(scope="module")
def xl_components(xl):
    return load_model(xl[0], config_dir=xl[1])


@pytest.fixture(scope="module")
def random_xl_lora(xl_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("xl-lora") / "random-xl.safetensors"
    return sd15_factory.save_random_lora(xl_components.unet, path, rank=4, std=0.3, family=SDXL)


def _lan_sampling(generator: ImageGenerator, **options):
    config = SamplingConfig(steps=3, guidance_scale=4.0, width=64, height=64, negative_prompt="blurry",
                            lora_weight=1.0, **options)
    steps = []
    output = generator.generate(["a person", "a dancer"], [1, 2], config,
                                callback=lambda i, t, dpo, sft: steps.append((dpo.clone(), sft.clone())))
    return output, steps


def test_lan_on_sdxl_matches_channel_statistics_and_the_fast_path(xl_components, random_xl_lora):
    generator = ImageGenerator(xl_components, lora=random_xl_lora, device="cpu")
    output, steps = _lan_sampling(generator, lan_strength=1.0)
    for dpo, sft in steps:  # Eq. 7 after every step: the DPO latent has the SFT latent's per-channel statistics
        for got, want in zip(channel_statistics(dpo), channel_statistics(sft)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(output.latents, output.sft_latents)  # the LoRA acts: the chains differ
    two_calls = generator.generate(["a person", "a dancer"], [1, 2], SamplingConfig(
        steps=3, guidance_scale=4.0, width=64, height=64, negative_prompt="blurry", lora_weight=1.0,
        lan_strength=1.0), shared_forward=False)
    torch.testing.assert_close(two_calls.latents, output.latents, atol=1e-4, rtol=1e-4)
    alone = generator.generate(["a person", "a dancer"], [1, 2], SamplingConfig(
        steps=3, guidance_scale=4.0, width=64, height=64, negative_prompt="blurry", lora_weight=0.0))
    torch.testing.assert_close(output.sft_latents, alone.latents, atol=1e-4, rtol=1e-4)  # SFT chain = plain SFT


def test_size_conditioning_follows_the_image_size(xl_components):
    conditioning = xl_components.encode_prompts(["a person"], (64, 96))
    assert conditioning.added["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    assert conditioning.added["text_embeds"].shape == (1, 48) and conditioning.context.shape[-1] == 80


def test_family_mismatches_are_refused_with_one_message(xl_components, tiny_components, random_xl_lora, tiny_lora):
    with pytest.raises(LoRAArchitectureError, match="is an SD1.5 LoRA, but the model is an SDXL model"):
        ImageGenerator(xl_components, lora=tiny_lora, device="cpu")
    with pytest.raises(LoRAArchitectureError, match="is an SDXL LoRA, but the model is an SD1.5 model"):
        ImageGenerator(tiny_components, lora=random_xl_lora, device="cpu")
    with pytest.raises(ModelFamilyError, match="SFT model is SD1.5 and the DPO model SDXL"):
        ImageGenerator(tiny_components, dpo_components=xl_components, device="cpu")


@pytest.mark.parametrize(("size", "fits"), [((1024, 1024), True), ((832, 1216), True), ((768, 1024), True),
                                            ((512, 512), False), ((2048, 2048), False)])
def test_sdxl_resolutions_against_the_buckets(size, fits):
    assert (SDXL.resolution_problem(*size) is None) is fits
    assert SD15.resolution_problem(*size) is None  # SD1.5 fine-tunes run at many sizes
    if not fits:
        with pytest.raises(ValueError, match="--any-resolution"):
            ModelOptions().check_size(SDXL, size)
        ModelOptions(any_resolution=True).check_size(SDXL, size)
