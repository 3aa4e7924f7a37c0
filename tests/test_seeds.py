"""One seed, one image: a pool image of the builder regenerates from its record through every core entry point."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hgdpo.data.builder import BuildConfig, PoolGenerator, build_dataset
from hgdpo.evaluation.evaluate import ImageCache, ModelSpec, generate_missing, load_generator
from hgdpo.feedback.scorers import FunctionScorer
from hgdpo.inference.generate import GenerateJob, run_generate_job
from hgdpo.inference.sampling import ImageGenerator, SamplingConfig, seed_noise
from hgdpo.models.lora import add_lora
from hgdpo.training.config import TrainConfig
from hgdpo.training.validation import validation_images

PROMPT = "a woman singing on the stage"
NEGATIVE = "blurry"


def warmth(prompts, images):
    return torch.tensor([float(np.asarray(image, dtype=np.float32)[..., 0].mean()) for image in images])


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model_dir, tiny_components):
    """A built pool of 3 images (one per UNet batch, as every entry point below regenerates them)."""
    root = tmp_path_factory.mktemp("seeds")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPT + "\n", encoding="utf-8")
    config = BuildConfig(model=str(tiny_model_dir), prompts=str(prompts), output_dir=str(root / "out"), pool_size=3,
                         steps=3, resolution="64x48", batch_size=1, seed=5, negative_prompt=NEGATIVE)
    build_dataset(config, FunctionScorer(warmth, "warmth"), components=tiny_components, show_progress=False)
    out = Path(config.output_dir)
    record = json.loads((out / "records" / "000000.json").read_text(encoding="utf-8"))
    settings = json.loads((out / "build_config.json").read_text(encoding="utf-8"))["settings"]
    stored = np.asarray(Image.open(out / record["win_image"]).convert("RGB"))
    return config, record, settings, stored


@pytest.fixture(scope="module")
def sampling(pool):
    """The record's settings as the inference side's SamplingConfig."""
    _, _, settings, _ = pool
    width, height = (int(v) for v in settings["resolution"].split("x"))
    return SamplingConfig(steps=settings["steps"], guidance_scale=settings["guidance_scale"], sampler="dpmpp_2m",
                          width=width, height=height, negative_prompt=settings["negative_prompt"], lora_weight=0.0)


def test_the_seed_rule_draws_each_image_alone_on_the_cpu():
    noise, generators = seed_noise([7, 9], (4, 6, 8), "cpu")
    alone = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(9))
    assert noise.dtype == torch.float32 and torch.equal(noise[1:], alone)
    assert torch.equal(seed_noise([9], (4, 6, 8), "cpu")[0], alone)  # batch position does not matter
    reference = torch.Generator().manual_seed(9)
    torch.randn((1, 4, 6, 8), generator=reference)
    # the per-step noise of stochastic samplers continues the image's own generator
    assert torch.equal(torch.randn(3, generator=generators[1]), torch.randn(3, generator=reference))


def test_the_builder_regenerates_its_pool_image(pool, tiny_components):
    config, record, _, stored = pool
    generator = PoolGenerator(tiny_components, config, "cpu", torch.float32)
    assert np.array_equal(np.asarray(generator.generate(record["prompt"], [record["win_seed"]])[0]), stored)
    other = generator.generate(record["prompt"], [record["lose_seed"]])[0]
    assert np.abs(np.asarray(other, dtype=np.int16) - stored).max() > 8  # the seed does decide the image


def test_the_image_generator_and_the_generate_job_regenerate_it(pool, sampling, tiny_components, tiny_model_dir,
                                                                 tmp_path):
    _, record, _, stored = pool
    image = ImageGenerator(tiny_components, device="cpu").generate([record["prompt"]], [record["win_seed"]],
                                                                   sampling).images[0]
    assert np.array_equal(np.asarray(image), stored)
    job = GenerateJob(model=str(tiny_model_dir), prompt=[record["prompt"]], output_dir=tmp_path, config=sampling,
                      seed=record["win_seed"], batch_size=1, device="cpu", dtype="fp32")
    [path] = run_generate_job(job, show_progress=False)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), stored)


def test_the_evaluation_regenerates_it(pool, sampling, tiny_model_dir, tmp_path):
    _, record, _, stored = pool
    spec = ModelSpec(model=str(tiny_model_dir))
    cache = ImageCache(tmp_path, "digest")
    pair = (record["prompt"], record["win_seed"])
    assert generate_missing(spec, cache, [pair], sampling, lambda s: load_generator(s, torch.device("cpu"),
                                                                                    torch.float32)) == 1
    assert np.array_equal(np.asarray(cache.load(*pair).image), stored)


def test_the_trainers_validation_regenerates_it(pool, sampling, tiny_components):
    """A fresh trainer LoRA (zero up weights) at weights 0 and 0.5 leaves the model as built from."""
    _, record, settings, stored = pool
    config = TrainConfig(model="unused", dataset="unused", output_dir="unused", resolution=settings["resolution"],
                         validation_seeds=[record["win_seed"]], validation_lora_weights=[0.0, 0.5],
                         validation_inference_steps=sampling.steps,
                         validation_guidance_scale=sampling.guidance_scale)
    unet = copy.deepcopy(tiny_components.unet)
    add_lora(unet, rank=4, alpha=4.0)
    with torch.no_grad():
        text = tiny_components.encode_prompts([record["prompt"]])
        negative = tiny_components.encode_prompts([settings["negative_prompt"]])
    rows = validation_images(config, tiny_components, unet.eval(), text, negative)
    assert [len(row) for row in rows] == [1, 1]
    for row in rows:
        assert np.array_equal(np.asarray(row[0]), stored)
