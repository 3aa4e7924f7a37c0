"""Smoke run on the real SD1.5 architecture (random weights, tiny resolution), from a single file."""

import gc

import pytest
import torch
from safetensors import safe_open

from hgdpo.training.config import TrainConfig
from hgdpo.inference.infotext import parse_parameters, read_png_parameters
from hgdpo.models.tiny import build_models, sd15_configs
from hgdpo.training.loop import train
from tests.sd15_factory import save_random_lora, save_single_file
from tests.test_sampling import run_sample


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    """A random-weight SD1.5 single file (fp16, LDM keys, as Civitai ships them) and a LoRA shaped for it."""
    root = tmp_path_factory.mktemp("sd15")
    models = build_models(sd15_configs(), seed=0)
    checkpoint = save_single_file(models, root / "sd15_random.safetensors", dtype=torch.float16)
    lora = save_random_lora(models["unet"], root / "hgdpo.safetensors", std=0.02)
    del models
    gc.collect()
    return checkpoint, lora


def test_sd15_single_file_trains_a_full_size_lora(tmp_path, triplet_dataset, sd15_files):
    checkpoint, _ = sd15_files

    config = TrainConfig(
        model=str(checkpoint), dataset=str(triplet_dataset), output_dir=str(tmp_path / "run"), resolution="64",
        max_steps=1, effective_batch_size=1, validation_steps=0, validation_inference_steps=1,
        validation_prompts=["a portrait of a woman"], validation_seeds=[0], validation_lora_weights=[0.5],
        gradient_checkpointing=True, learning_rate=1e-3,
    )
    lora = train(config)
    with safe_open(str(lora), framework="pt") as handle:
        keys = list(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    modules = {key.split(".")[0] for key in keys}
    assert len(modules) == 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert shapes["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (8, 768)
    assert shapes["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight"] == (1280, 8)
    assert shapes["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.lora_down.weight"] == (8, 320)


def test_sample_with_lora_lan_and_best_of_on_a_full_size_checkpoint(tmp_path, sd15_files, tiny_clip_dirs):
    """The issue's acceptance command on the real SD1.5 architecture (random weights, 64x64, 2 steps)."""
    checkpoint, lora = sd15_files
    out = tmp_path / "out"
    run_sample("--model", checkpoint, "--lora", lora, "--lan", "--best-of", 4, "--steps", 2, "--width", 64,
               "--height", 64, "--scorer-model", tiny_clip_dirs["model"], "--scorer-processor",
               tiny_clip_dirs["processor"], "--output-dir", out, "a woman singing on the stage")
    (image,) = out.glob("*.png")
    fields = parse_parameters(read_png_parameters(image))[2]
    assert fields["HG-DPO LAN"] == "1.0" and fields["HG-DPO best-of"] == "4" and fields["HG-DPO LoRA"] == "hgdpo"
