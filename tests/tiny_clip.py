"""A tiny random CLIPModel and processor shaped like PickScore's (77 text positions, the real vocab)."""

from __future__ import annotations

import torch


def build_tiny_clip(seed: int = 0):
    """A random CLIPModel with SD/PickScore-shaped text input (77 positions, the 49,408-token vocab)."""
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 16},
        vision_config={**tower, "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
        logit_scale_init_value=2.6592,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def build_tiny_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    from hgdpo.models.loading import clip_tokenizer

    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
