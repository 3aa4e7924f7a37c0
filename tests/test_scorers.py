"""Scorers on a tiny random CLIPModel saved to disk and loaded like the real PickScore/CLIP folders.

No mocks: the scores of :mod:`hgdpo.feedback.scorers` are checked against the CLIP towers computed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hgdpo.feedback.scorers import (
    CLIPScoreScorer,
    FunctionScorer,
    PickScoreScorer,
    Scorer,
    ScorerWeightsError,
    load_scorer,
)

PROMPTS = [
    "a photo of a woman smiling, close-up portrait",
    "two men shaking hands in an office",
    "a child holding a red balloon",
    "an elderly man reading a newspaper on a park bench " * 12,  # far past 77 tokens: truncated
    "hands",
]


# --------------------------------------------------------------------------- tiny models on disk


@pytest.fixture(scope="module")
def tiny_dirs(tiny_clip_dirs):
    return tiny_clip_dirs


@pytest.fixture(scope="module")
def pickscore(tiny_dirs):
    return PickScoreScorer(model=tiny_dirs["model"], processor=tiny_dirs["processor"], batch_size=2)


def make_images(seed: int = 0) -> list[Image.Image]:
    """Random images of several sizes and modes (RGB, grayscale, RGBA), one per prompt."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 48, "RGB"), (64, 32, "RGB"), (33, 33, "L"), (48, 40, "RGBA"), (32, 32, "RGB")]
    images = []
    for height, width, mode in shapes:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        images.append(Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode))
    return images


def hand_cosines(model_dir, processor_dir, prompts, images) -> torch.Tensor:
    """cos(text, image) per pair from the towers and projections, without get_*_features."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(processor_dir)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert tokens["input_ids"].shape == (len(prompts), 77)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(
            model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        )
    assert image_embeds.shape == text_embeds.shape == (len(prompts), 16)  # projected (towers are 32 wide)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (text_embeds * image_embeds).sum(-1), model.logit_scale.detach().exp()


# --------------------------------------------------------------------------- PickScore


def test_pickscore_matches_reference_formula(pickscore, tiny_dirs):
    images = make_images()
    scores = pickscore.score(PROMPTS, images)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (5,)
    cosines, scale = hand_cosines(tiny_dirs["model"], tiny_dirs["processor"], PROMPTS, images)
    assert scale.item() == pytest.approx(np.exp(2.6592), rel=1e-5)
    torch.testing.assert_close(scores, scale * cosines, rtol=1e-5, atol=1e-5)
    assert isinstance(pickscore, Scorer) and pickscore.name == "pickscore"


def test_pickscore_independent_of_batching_and_not_softmaxed(pickscore, tiny_dirs):
    images = make_images(seed=1)
    batched = pickscore.score(PROMPTS, images)  # batch_size 2: batches of 2, 2, 1
    one_by_one = torch.cat([pickscore.score([p], [i]) for p, i in zip(PROMPTS, images)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    whole = PickScoreScorer(model=tiny_dirs["model"], processor=tiny_dirs["processor"], batch_size=16)
    torch.testing.assert_close(whole.score(PROMPTS, images), batched, rtol=1e-5, atol=1e-5)
    reordered = pickscore.score(PROMPTS[::-1], images[::-1])
    torch.testing.assert_close(reordered, batched.flip(0), rtol=1e-5, atol=1e-5)
    # a raw logit, not a probability: one pair alone would softmax to exactly 1.0
    assert abs(one_by_one[0].item() - 1.0) > 1e-3 and abs(one_by_one[0].item()) > 1e-4
    assert abs(batched.sum().item() - 1.0) > 1e-3
    assert batched.abs().max() <= np.exp(2.6592) + 1e-4


def test_pickscore_holds_one_batch_of_pixels_at_a_time(pickscore):
    seen = []
    hook = pickscore.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        pickscore.score(PROMPTS, make_images())
    finally:
        hook.remove()
    assert seen == [2, 2, 1]


def test_pickscore_input_checks_and_empty(pickscore):
    images = make_images()
    assert pickscore.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="3 prompts for 5 images"):
        pickscore.score(PROMPTS[:3], images)
    with pytest.raises(TypeError, match="not a single string"):
        pickscore.score("a prompt", images[:1])
    with pytest.raises(TypeError, match="images\\[0\\]"):
        pickscore.score(PROMPTS[:1], ["not-an-image.png"])
    with pytest.raises(ValueError, match="batch_size"):
        PickScoreScorer(model="unused", processor="unused", batch_size=0)


def test_pickscore_bfloat16_returns_float32(tiny_dirs, pickscore):
    low = PickScoreScorer(model=tiny_dirs["model"], processor=tiny_dirs["processor"], dtype=torch.bfloat16)
    assert next(low.model.parameters()).dtype == torch.bfloat16
    images = make_images()
    scores = low.score(PROMPTS, images)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, pickscore.score(PROMPTS, images), atol=0.5, rtol=0.05)


# --------------------------------------------------------------------------- CLIP score


def test_clip_score_is_100_times_clamped_cosine(tiny_dirs):
    scorer = CLIPScoreScorer(model=tiny_dirs["combined"], batch_size=3)  # processor from the same folder
    images = make_images(seed=2)
    cosines, _ = hand_cosines(tiny_dirs["combined"], tiny_dirs["combined"], PROMPTS, images)
    torch.testing.assert_close(scorer.score(PROMPTS, images), 100 * cosines.clamp(min=0), rtol=1e-5, atol=1e-4)
    # flip the sign of every cosine: the pairs that were positive now score exactly 0 and vice versa
    with torch.no_grad():
        scorer.model.text_projection.weight.neg_()
    flipped = scorer.score(PROMPTS, images)
    torch.testing.assert_close(flipped, 100 * (-cosines).clamp(min=0), rtol=1e-5, atol=1e-4)
    assert (flipped == 0).any() or (cosines <= 0).all()
    assert scorer.name == "clip" and isinstance(scorer, Scorer)


# --------------------------------------------------------------------------- load_scorer and plug-ins


def brightness_scorer(prompts, images):
    """A real plug-in scoring function: mean brightness of the image in [0, 1], prompt ignored."""
    return [float(np.asarray(image.convert("L"), dtype=np.float32).mean() / 255.0) for image in images]


class BrightnessScorer:
    """A plug-in scorer class taking ``model`` and ``device`` like a real one would."""

    name = "brightness"

    def __init__(self, model=None, device="cpu", gain: float = 1.0):
        self.model, self.device, self.gain, self.batch_size = model, device, gain, 16

    def score(self, prompts, images):
        return self.gain * torch.tensor(brightness_scorer(prompts, images), dtype=torch.float32)


NOT_A_SCORER = 42


def make_factory_without_score():
    return object()


def solid(value: int) -> Image.Image:
    return Image.new("RGB", (24, 24), (value, value, value))


def test_load_scorer_builtins_from_local_folders(tiny_dirs, pickscore):
    loaded = load_scorer("pickscore", model=tiny_dirs["model"], processor=tiny_dirs["processor"], batch_size=4)
    assert isinstance(loaded, PickScoreScorer) and loaded.batch_size == 4
    images = make_images()
    torch.testing.assert_close(loaded.score(PROMPTS, images), pickscore.score(PROMPTS, images))
    clip = load_scorer("CLIP", model=str(tiny_dirs["combined"]), device="cpu")
    assert isinstance(clip, CLIPScoreScorer) and clip.device == torch.device("cpu")


def test_load_scorer_plugin_function_ranks_bright_above_dark():
    scorer = load_scorer("tests.test_scorers:brightness_scorer", batch_size=1)
    assert isinstance(scorer, FunctionScorer) and isinstance(scorer, Scorer)
    scores = scorer.score(["a bright room", "a dark room"], [solid(230), solid(20)])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] > scores[1]
    torch.testing.assert_close(scores, torch.tensor([230 / 255, 20 / 255]))


def test_load_scorer_plugin_class_gets_model_device_and_options():
    # __name__: this module as imported here (the repository root is also a ComfyUI package, so pytest may
    # name it main.tests.test_scorers); a second import under another name would be another class
    scorer = load_scorer(f"{__name__}:BrightnessScorer", model="hands.ckpt", device="cpu", gain=2.0)
    assert isinstance(scorer, BrightnessScorer)
    assert (scorer.model, scorer.device, scorer.gain) == ("hands.ckpt", "cpu", 2.0)
    scores = scorer.score(["x", "y"], [solid(200), solid(100)])
    assert scores[0] > scores[1]
    with pytest.raises(TypeError, match="does not accept the options \\['colour'\\]"):
        load_scorer("tests.test_scorers:BrightnessScorer", colour="red")


def test_load_scorer_errors():
    with pytest.raises(ValueError, match="Unknown scorer 'hpsv9'.*pickscore.*clip.*package.module:callable"):
        load_scorer("hpsv9")
    with pytest.raises(ValueError, match="cannot import module 'no_such_package_xyz.scorer'"):
        load_scorer("no_such_package_xyz.scorer:score")
    with pytest.raises(ValueError, match="has no attribute 'missing_scorer'"):
        load_scorer("tests.test_scorers:missing_scorer")
    with pytest.raises(ValueError, match="package.module:callable"):
        load_scorer("tests.test_scorers:")
    with pytest.raises(TypeError, match="neither callable nor a scorer"):
        load_scorer("tests.test_scorers:NOT_A_SCORER")
    with pytest.raises(TypeError, match="without a score"):
        load_scorer("tests.test_scorers:make_factory_without_score")


def test_function_scorer_checks_the_number_of_values():
    scorer = FunctionScorer(lambda prompts, images: [1.0], name="broken")
    with pytest.raises(ValueError, match="returned 1 values for 2 pairs"):
        scorer.score(["a", "b"], [solid(1), solid(2)])


# --------------------------------------------------------------------------- missing weights


def test_missing_pickscore_folder_names_the_download_commands(tmp_path, tiny_dirs):
    with pytest.raises(ScorerWeightsError) as raised:
        PickScoreScorer(model=tmp_path / "PickScore_v1", processor=tiny_dirs["processor"])
    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError)
    assert "no such folder" in message
    assert "huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir models/pickscore/PickScore_v1" in message
    assert "hf download yuvalkirstain/PickScore_v1" in message
    assert 'huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include "*.json" "*.txt"' in message
    assert 'hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include "*.json" --include "*.txt"' in message
    assert "--scorer-model models/pickscore/PickScore_v1" in message and "--scorer-processor" in message


def test_incomplete_folders_are_refused(tmp_path, tiny_dirs):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_dirs["model"] / "config.json").read_text())
    with pytest.raises(ScorerWeightsError, match="no weights file"):
        PickScoreScorer(model=config_only, processor=tiny_dirs["processor"])
    with pytest.raises(ScorerWeightsError, match="cannot load the processor.*preprocessor_config.json is missing"):
        PickScoreScorer(model=tiny_dirs["model"], processor=tiny_dirs["model"])
    with pytest.raises(ScorerWeightsError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        load_scorer("clip", model=tmp_path / "nothing-here")


def test_offline_hub_id_raises_weights_error():
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("yuvalkirstain/PickScore_v1", "config.json"), str):
        pytest.skip("PickScore is in this machine's hub cache; the offline error cannot be provoked.")
    with pytest.raises(ScorerWeightsError, match="huggingface-cli download yuvalkirstain/PickScore_v1"):
        PickScoreScorer()  # HF_HUB_OFFLINE=1 (tests/conftest.py) and nothing cached
