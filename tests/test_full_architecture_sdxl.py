"""Smoke run on the real SDXL base architecture (random weights, 64x64), from a Civitai-style fp16 single file:
the builder, LAN sampling with an SDXL LoRA, and one training step, computed in bfloat16.

It needs about 16 GiB of free memory (the loader builds the 2.6 B-parameter UNet in float32 before the cast);
with less it is skipped, and the skip says so.
"""

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hgdpo.data.builder import BuildConfig, build_dataset
from hgdpo.data.readers import open_preference_dataset
from hgdpo.feedback.scorers import FunctionScorer
from hgdpo.inference.sampling import ImageGenerator, SamplingConfig
from hgdpo.models.families import SDXL
from hgdpo.models.loading import ModelOptions, load_model
from hgdpo.training.config import TrainConfig
from hgdpo.training.loop import train
from tests import sd15_factory, sdxl_factory
from tests.test_builder import warmth_scorer

NEEDED_GIB = 16
ANY_SIZE = ModelOptions(any_resolution=True)


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


pytestmark = pytest.mark.skipif(
    not Path("/proc/meminfo").exists() or _available_gib() < NEEDED_GIB,
    reason=f"the full-size SDXL smoke run needs {NEEDED_GIB} GiB of free memory",
)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """``HGDPO_SDXL_CHECKPOINT`` (the host tests' random full-size file) when set, else one written here (7 GB)."""
    given = os.environ.get("HGDPO_SDXL_CHECKPOINT")
    if given:
        return Path(given)
    return sdxl_factory.save_full_size_single_file(tmp_path_factory.mktemp("sdxl") / "sdxl_random.safetensors")


def test_full_size_sdxl_builds_samples_with_lan_and_trains(sdxl_file, tmp_path):
    components = load_model(sdxl_file)
    assert components.family is SDXL and components.unet.config.cross_attention_dim == 2048
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a woman dancing\n")
    build = BuildConfig(model=str(sdxl_file), prompts=str(prompts), output_dir=str(tmp_path / "data"),
                        pool_size=2, steps=1, guidance_scale=5.0, negative_prompt="blurry", resolution="64",
                        batch_size=2, dtype="bf16", model_options=ANY_SIZE)
    build_dataset(build, FunctionScorer(warmth_scorer, name="warmth"), components=components, show_progress=False)
    assert len(open_preference_dataset(tmp_path / "data")) == 1

    lora = sd15_factory.save_random_lora(components.unet, tmp_path / "xl.safetensors", rank=4, std=0.02, family=SDXL)
    generator = ImageGenerator(components, lora=lora, device="cpu", dtype=torch.bfloat16)
    assert len(generator.unet_lora) == 70 * 2 * 4  # every attention projection of the 70 transformer blocks
    output = generator.generate(["a woman dancing"], [0], SamplingConfig(steps=2, width=64, height=64,
                                                                         lora_weight=0.5, lan_strength=1.0))
    assert torch.isfinite(output.latents).all() and output.images[0].size == (64, 64)
    del generator, components, output
    gc.collect()

    config = TrainConfig(model=str(sdxl_file), dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
                         resolution="64", model_options=ANY_SIZE, max_steps=1, effective_batch_size=1,
                         mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw",
                         validation_steps=0, cache_dir=str(tmp_path / "cache"))
    with safe_open(str(train(config)), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert len([key for key in keys if key.endswith(".lora_down.weight")]) == 70 * 2 * 4
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert metadata["modelspec.architecture"] == SDXL.modelspec_architecture
