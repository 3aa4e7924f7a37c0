"""HPS v2, the LAION aesthetic predictor and ImageReward on tiny random models of their reference architectures.

Each checkpoint is written in its reference layout (HPS: ``{"state_dict": ...}`` of an open_clip CLIP;
aesthetic: the ``layers.N`` keys of the reference ``nn.Sequential``; ImageReward: BLIP's
``blip.visual_encoder.*`` / ``blip.text_encoder.*`` / ``mlp.layers.*``), loaded by :mod:`hgdpo.feedback.metrics`
like the real file, and every score is checked against the reference formula computed here by hand:
the preprocessing written out as the reference code composes it, and for ImageReward the BLIP ViT and the
BERT cross-attention encoder written out in plain torch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional
from torchvision import transforms

from hgdpo.feedback.metrics import (
    AESTHETIC_FILES,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    AestheticScorer,
    HPSv2Scorer,
    ImageRewardScorer,
    RewardMLP,
)
from hgdpo.feedback.scorers import Scorer, ScorerWeightsError, load_scorer
from tests.test_scorers import make_images
from tests.tiny_clip import build_tiny_clip, build_tiny_processor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a photo of a woman smiling", "two men shaking hands, office", "a child " * 40, "portrait", ""]


def reference_clip_preprocess(size: int):
    """OpenAI CLIP's ``preprocess`` (``clip.load``) and ImageReward's ``_transform``, as they compose it."""
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), lambda image: image.convert("RGB"),
                               transforms.ToTensor(), transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])


# --------------------------------------------------------------------------- HPS v2

HPS_TINY = {"embed_dim": 16,
            "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def reference_hps_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's ``preprocess_val`` (``light_augmentation=True``): ToTensor, ResizeMaxSize (on the tensor), Normalize."""
    tensor = transforms.ToTensor()(image.convert("RGB"))
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        tensor = transforms.functional.resize(tensor, new_size, transforms.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        tensor = transforms.functional.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2])
    return transforms.Normalize(OPENAI_MEAN, OPENAI_STD)(tensor)


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """A tiny open_clip CLIP saved as HPS does (``{"state_dict": ...}``, fp16 like the compressed files)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**HPS_TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    state = {key: value.half() for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return path, model.eval()


def test_hps_matches_the_reference_formula(hps_checkpoint):
    import open_clip

    path, model = hps_checkpoint
    images = make_images() + [Image.new("RGB", (56, 56), (200, 30, 30))]  # non-square, grey, RGBA, exact size
    prompts = [*PROMPTS, "red"]
    scorer = HPSv2Scorer(path, architecture=HPS_TINY, batch_size=4)
    scores = scorer.score(prompts, images)
    assert isinstance(scorer, Scorer) and scores.dtype == torch.float32 and scores.shape == (6,)
    with torch.no_grad():
        pixels = torch.stack([reference_hps_preprocess(image, 56) for image in images])
        image_features = functional.normalize(model.encode_image(pixels), dim=-1)
        text_features = functional.normalize(model.encode_text(open_clip.tokenize(prompts)), dim=-1)
    expected = torch.diagonal(image_features @ text_features.T)  # hpsv2.img_score: no logit scale
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_hps_preprocess_pads_the_short_side_centred():
    from hgdpo.feedback.metrics import hps_preprocess

    white = Image.new("RGB", (100, 50), (255, 255, 255))
    pixels = hps_preprocess(white, 56)
    assert pixels.shape == (3, 56, 56)
    black = torch.tensor([-m / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)])[:, None].expand(3, 14)
    torch.testing.assert_close(pixels[:, :14, 28], black)  # 56 - 28 = 28 rows of padding: 14 above ...
    torch.testing.assert_close(pixels[:, 42:, 28], black)  # ... and 14 below
    assert (pixels[:, 14:42, :] > 1.5).all()  # the white picture, 100x50 -> 56x28, in between


def test_hps_weights_errors(tmp_path, hps_checkpoint):
    with pytest.raises(ScorerWeightsError, match=r"(?s)HPS_v2_compressed\.pt.*huggingface-cli download xswu/HPSv2"):
        HPSv2Scorer(tmp_path / "missing.pt", architecture=HPS_TINY)
    with pytest.raises(ScorerWeightsError, match="HPS_v2.1_compressed.pt"):
        HPSv2Scorer(tmp_path, version="v2.1", architecture=HPS_TINY)  # a folder without the file
    with pytest.raises(ScorerWeightsError, match="xswu/HPSv2"):
        HPSv2Scorer(architecture=HPS_TINY)  # the hub is off during tests
    other = dict(HPS_TINY, embed_dim=8)
    with pytest.raises(ValueError, match="not a HPS .*wrong shapes: .*text_projection"):
        HPSv2Scorer(hps_checkpoint[0], architecture=other)
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="Missing keys: .*unexpected keys: layers.0.weight"):
        HPSv2Scorer(tmp_path / "other.pt", architecture=HPS_TINY)


def test_load_scorer_builds_hps_from_a_folder(hps_checkpoint):
    scorer = load_scorer("hpsv2", model=hps_checkpoint[0].parent, architecture=HPS_TINY)
    assert isinstance(scorer, HPSv2Scorer) and scorer.name == "hpsv2"


# --------------------------------------------------------------------------- LAION aesthetic


class ReferenceAestheticMLP(nn.Module):
    """improved-aesthetic-predictor's ``MLP``: Linear/Dropout layers without activations."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    clip, processor = build_tiny_clip(seed=3), build_tiny_processor()
    clip.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    torch.manual_seed(1)
    mlp = ReferenceAestheticMLP(16).eval()
    torch.save(mlp.state_dict(), root / AESTHETIC_FILES[0])
    return root, clip.eval(), mlp


def test_aesthetic_matches_the_reference_formula(aesthetic_files):
    root, clip, mlp = aesthetic_files
    images = make_images(seed=2)
    scorer = load_scorer("aesthetic", model=root, processor=root / "clip", batch_size=2)
    scores = scorer.score(PROMPTS, images)
    with torch.no_grad():
        pixels = torch.stack([reference_clip_preprocess(32)(image) for image in images])
        features = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).numpy()
        features = features / np.linalg.norm(features, axis=-1, keepdims=True)  # simple_inference.normalized
        expected = mlp(torch.from_numpy(features).float())[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(scorer.score(["another prompt"] * 5, images), scores)  # the prompt is not used


def test_reward_mlp_has_the_reference_keys_and_no_activation():
    assert list(RewardMLP(768).state_dict()) == list(ReferenceAestheticMLP(768).state_dict())
    mlp = RewardMLP(4).eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    weights = [layer for layer in mlp.layers if isinstance(layer, nn.Linear)]
    y = x
    for layer in weights:  # a product of affine maps: the head is linear in the embedding
        y = y @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(mlp.double()(x), y)


def test_aesthetic_missing_weights_name_the_file_and_the_download(tmp_path, aesthetic_files):
    root = aesthetic_files[0]
    with pytest.raises(ScorerWeightsError, match=r"(?s)sac\+logos\+ava1-l14-linearMSE\.pth.*trl-lib/ddpo-aesthetic.*"
                                                 r"wget .*improved-aesthetic-predictor"):
        AestheticScorer(tmp_path, processor=root / "clip")
    with pytest.raises(ScorerWeightsError, match="clip-vit-large-patch14"):
        AestheticScorer(root, processor=tmp_path / "no-clip")
    with pytest.raises(ValueError, match="CLIP embedding width 16"):
        torch.save(ReferenceAestheticMLP(768).state_dict(), tmp_path / AESTHETIC_FILES[1])
        AestheticScorer(tmp_path, processor=root / "clip")


# --------------------------------------------------------------------------- ImageReward

VISION = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 48, "patch_size": 16}
TEXT = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 40,
        "max_position_embeddings": 40, "vocab_size": 30524}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "woman", "man", "two", "child", "smiling",
         "hands", ",", "."]


def reference_imagereward_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's key names (BLIP ``vit.py`` / ``med.py``, the MLP), tiny sizes."""
    d, t, ffn, tffn = VISION["hidden_size"], TEXT["hidden_size"], VISION["intermediate_size"], TEXT["intermediate_size"]
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    shapes = {"blip.visual_encoder.cls_token": (1, 1, d), "blip.visual_encoder.pos_embed": (1, patches + 1, d),
              "blip.visual_encoder.patch_embed.proj.weight": (d, 3, 16, 16),
              "blip.visual_encoder.patch_embed.proj.bias": (d,),
              "blip.visual_encoder.norm.weight": (d,), "blip.visual_encoder.norm.bias": (d,),
              "blip.vision_proj.weight": (8, d), "blip.vision_proj.bias": (8,),
              "blip.text_proj.weight": (8, t), "blip.text_proj.bias": (8,),
              "blip.text_encoder.embeddings.word_embeddings.weight": (TEXT["vocab_size"], t),
              "blip.text_encoder.embeddings.position_embeddings.weight": (TEXT["max_position_embeddings"], t),
              "blip.text_encoder.embeddings.LayerNorm.weight": (t,),
              "blip.text_encoder.embeddings.LayerNorm.bias": (t,)}
    for i in range(VISION["num_hidden_layers"]):
        block = f"blip.visual_encoder.blocks.{i}."
        shapes.update({block + "norm1.weight": (d,), block + "norm1.bias": (d,), block + "norm2.weight": (d,),
                       block + "norm2.bias": (d,), block + "attn.qkv.weight": (3 * d, d),
                       block + "attn.qkv.bias": (3 * d,),
                       block + "attn.proj.weight": (d, d), block + "attn.proj.bias": (d,),
                       block + "mlp.fc1.weight": (ffn, d), block + "mlp.fc1.bias": (ffn,),
                       block + "mlp.fc2.weight": (d, ffn), block + "mlp.fc2.bias": (d,)})
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for attention, width in (("attention", t), ("crossattention", d)):
            shapes.update({f"{layer}{attention}.self.query.weight": (t, t), f"{layer}{attention}.self.query.bias": (t,),
                           f"{layer}{attention}.self.key.weight": (t, width), f"{layer}{attention}.self.key.bias": (t,),
                           f"{layer}{attention}.self.value.weight": (t, width),
                           f"{layer}{attention}.self.value.bias": (t,),
                           f"{layer}{attention}.output.dense.weight": (t, t),
                           f"{layer}{attention}.output.dense.bias": (t,),
                           f"{layer}{attention}.output.LayerNorm.weight": (t,),
                           f"{layer}{attention}.output.LayerNorm.bias": (t,)})
        shapes.update({layer + "intermediate.dense.weight": (tffn, t), layer + "intermediate.dense.bias": (tffn,),
                       layer + "output.dense.weight": (t, tffn), layer + "output.dense.bias": (t,),
                       layer + "output.LayerNorm.weight": (t,), layer + "output.LayerNorm.bias": (t,)})
    state = {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}
    for key in state:
        if "norm" in key.lower() and key.endswith("weight"):
            state[key] += 1.0
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    for key, value in ReferenceAestheticMLP(t).state_dict().items():
        state[f"mlp.{key}"] = torch.randn(value.shape, generator=generator) * 0.3
    return state


def _attention(query, key, value, heads: int, additive_mask=None):
    batch, length, width = query.shape
    q, k, v = (x.reshape(batch, x.shape[1], heads, width // heads).transpose(1, 2) for x in (query, key, value))
    weights = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if additive_mask is not None:
        weights = weights + additive_mask
    return (weights.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)


def reference_imagereward(state: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """ImageReward.score written out: BLIP ViT (vit.py), BERT with cross-attention (med.py), [CLS], MLP."""
    s = {k: v.double() for k, v in state.items()}
    v = "blip.visual_encoder."
    x = functional.conv2d(pixels.double(), s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=16)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[v + "pos_embed"]
    d = x.shape[-1]
    for i in range(VISION["num_hidden_layers"]):
        b = f"{v}blocks.{i}."
        h = functional.layer_norm(x, (d,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        q, k, w = functional.linear(h, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + functional.linear(_attention(q, k, w, VISION["num_attention_heads"]), s[b + "attn.proj.weight"],
                                  s[b + "attn.proj.bias"])
        h = functional.layer_norm(x, (d,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        h = functional.linear(functional.gelu(functional.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])),
                              s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
        x = x + h
    image = functional.layer_norm(x, (d,), s[v + "norm.weight"], s[v + "norm.bias"], eps=1e-6)

    e, t = "blip.text_encoder.", TEXT["hidden_size"]
    def norm(y, name):
        return functional.layer_norm(y, (t,), s[name + ".weight"], s[name + ".bias"], eps=1e-12)

    def linear(y, name):
        return functional.linear(y, s[name + ".weight"], s[name + ".bias"])

    y = s[e + "embeddings.word_embeddings.weight"][ids] + s[e + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    y = norm(y, e + "embeddings.LayerNorm")
    additive = (1.0 - mask.double())[:, None, None, :] * -10000.0  # med.py's extended attention mask
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"{e}encoder.layer.{i}."
        for attention, context, context_mask in (("attention", None, additive), ("crossattention", image, None)):
            source = y if context is None else context
            a = _attention(linear(y, f"{layer}{attention}.self.query"), linear(source, f"{layer}{attention}.self.key"),
                           linear(source, f"{layer}{attention}.self.value"), TEXT["num_attention_heads"], context_mask)
            y = norm(linear(a, f"{layer}{attention}.output.dense") + y, f"{layer}{attention}.output.LayerNorm")
        h = linear(functional.gelu(linear(y, layer + "intermediate.dense")), layer + "output.dense")
        y = norm(h + y, layer + "output.LayerNorm")
    reward = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        reward = linear(reward, f"mlp.layers.{index}")
    return ((reward[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).float()


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    import json

    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("imagereward")
    state = reference_imagereward_state(torch.Generator().manual_seed(5))
    torch.save(state, root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps({**TEXT, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                                                      "encoder_width": 768, "add_cross_attention": True,
                                                      "type_vocab_size": 2, "pad_token_id": 0}))
    BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(root / "bert")
    return root, state


def test_imagereward_matches_the_reference_formula(imagereward_files):
    root, state = imagereward_files
    images = make_images(seed=4)[:4]
    prompts = ["a photo of a woman smiling", "two men, hands [ENC]", "a child " * 30, ""]
    scorer = load_scorer("imagereward", model=root, processor=root / "bert", vision_config=VISION, batch_size=3)
    scores = scorer.score(prompts, images)
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (4, 35) and (tokens["input_ids"][:, 0] == VOCAB.index("[CLS]")).all()
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]  # BLIP's tokens
    pixels = torch.stack([reference_clip_preprocess(48)(image) for image in images])
    expected = reference_imagereward(state, pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(scorer, ImageRewardScorer) and scorer.name == "imagereward"
    assert scorer.vision.config.layer_norm_eps == 1e-6  # BLIP's ViT, not transformers' default 1e-5


def test_imagereward_errors(tmp_path, imagereward_files):
    root, _ = imagereward_files
    with pytest.raises(ScorerWeightsError, match=r"(?s)ImageReward\.pt.*huggingface-cli download THUDM/ImageReward"):
        ImageRewardScorer(tmp_path, processor=root / "bert", vision_config=VISION)
    with pytest.raises(ScorerWeightsError, match=r"(?s)bert-base-uncased.*google-bert/bert-base-uncased"):
        ImageRewardScorer(root, processor=tmp_path / "no-tokenizer", vision_config=VISION)
    with pytest.raises(ValueError, match=r"not a ImageReward \(vision part\)"):
        ImageRewardScorer(root, processor=root / "bert", vision_config={**VISION, "num_hidden_layers": 3})
