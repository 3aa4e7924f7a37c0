"""Model loading: single files offline, diffusers folders, the offline tokenizer, wrong families."""

import pickle

import open_clip
import pytest
import torch

from hgdpo.models.loading import ModelFamilyError, clip_tokenizer, load_model, load_sd15
from tests import sd15_factory


def _unet_output(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context).sample


def test_single_file_loads_offline_and_matches_the_original(tiny_models, tiny_model_dir, tiny_single_file):
    _, models = tiny_models
    loaded = load_sd15(tiny_single_file, config_dir=tiny_model_dir)
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(models["unet"]))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.vae.encode(image).latent_dist.mean, models["vae"].encode(image).latent_dist.mean
        )
        ids = loaded.tokenizer(["a portrait of a woman"], padding="max_length", return_tensors="pt").input_ids
        torch.testing.assert_close(loaded.text_encoder(ids)[0], models["text_encoder"](ids)[0])
    assert loaded.noise_scheduler.config.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_diffusers_folder_loads(tiny_models, tiny_model_dir):
    _, models = tiny_models
    loaded = load_sd15(tiny_model_dir)
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(models["unet"]))
    assert loaded.tokenizer.model_max_length == 77


@pytest.mark.parametrize("source", ["tiny_single_file", "tiny_model_dir"])
def test_unet_loads_straight_into_the_training_dtype(source, tiny_model_dir, request):
    """A UNet loaded in bf16 is bf16 throughout and holds exactly the float32 load's weights rounded to bf16;
    released text encoders hold only meta tensors, and encoding afterwards is refused in one line."""
    reference = load_model(request.getfixturevalue(source), config_dir=tiny_model_dir)
    loaded = load_model(request.getfixturevalue(source), config_dir=tiny_model_dir, unet_dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in loaded.unet.parameters()} == {torch.bfloat16}
    assert {parameter.dtype for parameter in loaded.vae.parameters()} == {torch.float32}
    expected = reference.unet.to(torch.bfloat16).state_dict()
    for name, tensor in loaded.unet.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    loaded.release_text_encoders()
    assert all(parameter.is_meta for parameter in loaded.text_encoder.parameters())
    with pytest.raises(RuntimeError, match="text encoders were released"):
        loaded.encode_prompts(["a woman"])


def test_tokenizer_built_offline_matches_open_clip():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    prompts = ["A photo of a smiling woman, (bust shot:1.2), 8k!", "two kids playing football in the park"]
    ours = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    reference = open_clip.tokenize(prompts)  # pads with 0 after the end token
    for mine, theirs in zip(ours, reference.tolist()):
        length = theirs.index(49407) + 1
        assert mine[:length] == theirs[:length]
        assert mine[0] == 49406 and set(mine[length:]) <= {49407}  # SD1.5 pads with <|endoftext|>


@pytest.mark.parametrize(
    ("writer", "expected"),
    [
        (sd15_factory.save_fake_sdxl_checkpoint, "SDXL"),
        (sd15_factory.save_fake_sd2_checkpoint, "Stable Diffusion 2"),
        (sd15_factory.save_fake_lora, "LoRA file"),
    ],
)
def test_other_families_are_refused_by_name(tmp_path, writer, expected):
    path = writer(tmp_path / "model.safetensors")
    with pytest.raises(ModelFamilyError, match=expected):
        load_sd15(path)


def test_inpainting_checkpoint_is_refused(tmp_path):
    path = sd15_factory.save_inpainting_checkpoint(tmp_path / "inpaint.safetensors")
    with pytest.raises(ModelFamilyError, match="inpainting"):
        load_sd15(path)


def test_missing_and_invalid_sources_explain_themselves(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sd15(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_sd15(tmp_path / "empty")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_sd15(broken)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_checkpoint_with_code_is_refused(tmp_path, tiny_single_file):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"x": _Payload()}}, handle)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_sd15(path)


def test_relative_missing_checkpoint_is_not_taken_for_a_hub_id():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sd15("models/missing.safetensors")


def test_unreachable_hub_id_says_what_to_do():
    with pytest.raises(FileNotFoundError, match="hub id"):
        load_sd15("nobody-here/no-such-model")
