"""Shared fixtures: tiny random SD1.5-structured models on disk, and a small triplet dataset.

Everything is built offline here; the hub is switched off for the whole test session so that no
code path can silently depend on a download.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import sd15_factory  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the tokenizer files and latent caches of the tests out of the user's ~/.cache."""
    os.environ["HGDPO_CACHE"] = str(tmp_path_factory.mktemp("hgdpo-cache"))


@pytest.fixture(scope="session")
def tiny_models():
    configs = sd15_factory.tiny_sd15_configs(layers_per_block=1)
    return configs, sd15_factory.build_models(configs, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models, tmp_path_factory):
    """A diffusers folder of the tiny model (also the config folder for its single-file form)."""
    configs, models = tiny_models
    return sd15_factory.save_diffusers_folder(models, configs, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_single_file(tiny_models, tmp_path_factory):
    """The tiny model as a Civitai-style single-file checkpoint (LDM keys, fp32)."""
    _, models = tiny_models
    return sd15_factory.save_single_file(models, tmp_path_factory.mktemp("tiny-file") / "tiny.safetensors", dtype=None)


@pytest.fixture(scope="session")
def tiny_components(tiny_model_dir):
    """The tiny model loaded once (SD15Components)."""
    from hgdpo.models.loading import load_sd15

    return load_sd15(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_lora(tiny_models, tmp_path_factory):
    """A random kohya LoRA for the tiny UNet, written by hgdpo's LoRA writer."""
    _, models = tiny_models
    return sd15_factory.save_random_lora(models["unet"], tmp_path_factory.mktemp("lora") / "hgdpo.safetensors")


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory):
    """A tiny random CLIP saved like the real folders: ``model`` (weights only), ``processor`` (processor
    only), ``combined`` (both, like a CLIP repo). Loads as PickScore or CLIP score."""
    from tests.tiny_clip import build_tiny_clip, build_tiny_processor

    root = tmp_path_factory.mktemp("tiny-clip")
    model, processor = build_tiny_clip(), build_tiny_processor()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "processor")
    model.save_pretrained(root / "combined")
    processor.save_pretrained(root / "combined")
    return {name: root / name for name in ("model", "processor", "combined")}


def write_triplets(directory, num_pairs: int = 8):
    from hgdpo.data.synthetic import write_synthetic_triplets

    return write_synthetic_triplets(directory, num_pairs=num_pairs)


@pytest.fixture(scope="session")
def triplet_dataset(tmp_path_factory):
    return write_triplets(tmp_path_factory.mktemp("data") / "triplets")
